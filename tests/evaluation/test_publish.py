"""The publish step on a converted tiny model: measured numbers in the card's Hub metadata and table, a Space folder
whose app builds its interface offline without serving, and the upload (dry run, and against a recording Hub)."""

import json
import re

import huggingface_hub
import pytest
import torch
from huggingface_hub import ModelCard, SpaceCard

from alibi_dinov2.conversion.convert import convert
from alibi_dinov2.conversion.families import family_of
from alibi_dinov2.conversion.model_card import FOLDER_PLACEHOLDER
from evaluation import publish
from hub_cache import put_folder_in_hub_cache
from test_convert_checkpoint import hf_model


REPO_ID = "test-owner/alibi-tiny"


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """A tiny DINOv2 with registers converted to ALiBi, published (dry run, naming REPO_ID) with the stock model
    as its base; the images are small so that the whole evaluation takes seconds."""
    from conftest import TINY_DINOV2

    root = tmp_path_factory.mktemp("publish")
    base = hf_model(dict(TINY_DINOV2))
    with torch.no_grad():  # a clearly positional base: a strong learned embedding
        base.embeddings.position_embeddings.normal_(0, 3.0)
    base.save_pretrained(root / "base")
    folder = root / "alibi-tiny"
    convert(str(root / "base"), folder)
    argv = [str(folder), "--base_model", str(root / "base"), "--push_to_hub", "--hub_model_id", REPO_ID, "--dry_run",
            "--max_images", "2", "--size", "280", "280", "--no_progress"]
    summary = publish.main(argv)
    return {"root": root, "folder": folder, "base": root / "base", "summary": summary}


def test_the_card_holds_the_measured_numbers(published):
    folder, evaluation = published["folder"], published["summary"]["evaluation"]
    assert json.loads((folder / publish.RESULTS_FILE).read_text())["scores"] == evaluation["scores"]
    card = ModelCard.load(folder / "README.md")
    assert card.data.model_name == REPO_ID
    results = card.data.eval_results
    assert len(results) == 3 * 3  # micro, textures, noise x (lr+ud, random, roll)
    by_key = {(r.dataset_type, r.metric_type, r.metric_name.split(" ")[0]): r.metric_value for r in results}
    for source, dataset_type in (("micro", "synthetic-micrographs"), ("textures", "skimage-textures"),
                                 ("noise", "uniform-noise")):
        for ramp in ("lr+ud", "random"):
            measured = evaluation["scores"][REPO_ID][source][ramp]["mean"]
            assert by_key[(dataset_type, "r_squared", ramp)] == round(measured, 4)
        assert by_key[(dataset_type, "relative_l2", "roll")] == round(evaluation["roll"][REPO_ID][source], 4)
        # Wrapped ALiBi without an embedding is exactly roll-equivariant; the positional base is not.
        assert evaluation["roll"][REPO_ID][source] < 1e-4 < 0.01 < evaluation["roll"][str(published["base"])][source]
    assert all(isinstance(r.metric_value, float) for r in results)
    assert all(r.task_type == "image-feature-extraction" for r in results)
    text = card.text
    micro = evaluation["scores"][REPO_ID]["micro"]["lr+ud"]
    assert f"| micro (2) | lr+ud R² | {micro['mean']:+.3f} ± {micro['std']:.3f} |" in text
    command = f"python -m evaluation.publish {folder} --base_model {published['base']} --push_to_hub"
    assert f"{command} --hub_model_id {REPO_ID}" in text
    assert "not evaluated yet" not in text and FOLDER_PLACEHOLDER not in text
    assert f'AutoModel.from_pretrained("{REPO_ID}", trust_remote_code=True)' in text
    assert card.data.pipeline_tag == "image-feature-extraction"  # the converter's metadata is kept


@pytest.mark.slow
@pytest.mark.multiprocess
def test_the_space_folder_names_the_model_and_builds_offline_without_serving(published, tmp_path, monkeypatch,
                                                                              run_isolated):
    space = published["summary"]["space_dir"]
    metadata = SpaceCard.load(space / "README.md").data
    assert (metadata.sdk, metadata.app_file, metadata.models) == ("gradio", "app.py", [REPO_ID])
    assert "torch>=2.4" in (space / "requirements.txt").read_text()
    cache = tmp_path / "hub-cache"
    put_folder_in_hub_cache(cache, REPO_ID, published["folder"])
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    # A fresh process where the project itself cannot be imported: the Space's own copies of the demo modules serve,
    # and the model comes from the (offline) Hub cache with its own code.
    result = run_isolated(
        f"""
        import sys
        sys.path.insert(0, {str(space)!r})
        import numpy as np, gradio
        import app, demo.app, evaluation
        assert demo.app.__file__.startswith({str(space)!r}) and evaluation.__file__.startswith({str(space)!r})
        assert isinstance(app.demo, gradio.Blocks) and app.demo.is_running is False
        (run,) = [f.fn for f in app.demo.fns.values() if f.fn.__name__ == "run"]
        gallery, table = run(np.random.default_rng(0).random((84, 84, 3)), None, 2)
        print("built", sorted(app.MODELS.values()), [row[0] for row in table])
        """
    )
    assert f"built [{str(published['base'])!r}, {REPO_ID!r}]" in result.stdout


def test_the_space_carries_every_project_module_the_demo_imports():
    files = publish.demo_source_files()
    for name in (
        "demo/app.py",
        "demo/__init__.py",
        "evaluation/__init__.py",
        "evaluation/positional_probe.py",
        "alibi_dinov2/__init__.py",
        "alibi_dinov2/features/__init__.py",
        "alibi_dinov2/hub/models.py",
        "alibi_dinov2/features/extraction.py",
        "alibi_dinov2/features/visualisation.py",
        "alibi_dinov2/cli.py",
        "demo/segmentation_view.py",
        "alibi_dinov2/segmentation/trainable.py",
        "alibi_dinov2/segmentation/segmenter_file.py",
    ):
        assert name in files
    assert "evaluation/publish.py" not in files and "evaluation/scribble_benchmark.py" not in files


def test_space_requirements_are_the_declared_ones_the_demo_imports(monkeypatch):
    import importlib.metadata

    def names(requirements):
        return {re.split(r"[<>=!~]", requirement)[0].replace("_", "-").lower() for requirement in requirements}

    required = names(publish.space_requirements())
    assert {"torch", "transformers", "numpy", "pillow", "scikit-learn", "scikit-image", "matplotlib", "xgboost",
            "skops"} <= required  # the segmentation tab trains XGBoost and writes safe segmenter files
    assert not required & {"gradio", "accelerate", "datasets"}
    installed = publish.declared_requirements()

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "requires", not_installed)  # a source tree that was never installed
    assert names(publish.declared_requirements()) == names(installed)


def test_the_dry_run_lists_the_upload(published, capsys, tmp_path):
    plan = published["summary"]["plan"]
    assert not published["summary"]["uploaded"] and published["summary"]["urls"] == []
    assert [(item.repo_id, item.repo_type) for item in plan] == [(REPO_ID, "model"), (f"{REPO_ID}-demo", "space")]
    model_files = dict(plan[0].files)
    assert {
        "README.md", "config.json", "model.safetensors", "modeling_alibi_dinov2.py", publish.RESULTS_FILE
    } <= set(model_files)
    assert model_files["model.safetensors"] == (published["folder"] / "model.safetensors").stat().st_size
    listing = publish.format_plan(plan)
    assert listing.startswith(f"would upload to model repository {REPO_ID}: ")
    assert f"would upload to space repository {REPO_ID}-demo: " in listing and "    app.py  " in listing


def test_upload_sends_both_folders_and_leaves_training_files_out(published, monkeypatch, tmp_path):
    calls = []

    class RecordingHub:
        def create_repo(self, repo_id, **options):
            calls.append(("create", repo_id, options))
            return f"https://huggingface.co/{'spaces/' if options.get('repo_type') == 'space' else ''}{repo_id}"

        def upload_folder(self, folder_path, repo_id, **options):
            calls.append(("upload", repo_id, dict(options, folder_path=folder_path)))

    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingHub)
    folder = tmp_path / "distilled"
    (folder / "checkpoint-500").mkdir(parents=True)
    (folder / "checkpoint-500" / "optimizer.bin").write_bytes(b"x")
    (folder / "train_distill").mkdir()
    (folder / "train_distill" / "events.out").write_bytes(b"x")
    (folder / "config.json").write_text("{}")
    plan = publish.upload_plan(folder, published["summary"]["space_dir"], REPO_ID, "test-owner/space")
    assert [path for path, _ in plan[0].files] == ["config.json"]
    urls = publish.upload(plan, private=True)
    assert urls == [f"https://huggingface.co/{REPO_ID}", "https://huggingface.co/spaces/test-owner/space"]
    creates = [(repo, options["repo_type"], options["private"]) for kind, repo, options in calls if kind == "create"]
    assert creates == [(REPO_ID, "model", True), ("test-owner/space", "space", True)]
    space_create = [options for kind, repo, options in calls if kind == "create"][1]
    assert space_create["space_sdk"] == "gradio"
    uploads = [
        (repo, options["repo_type"], options["folder_path"]) for kind, repo, options in calls if kind == "upload"
    ]
    assert uploads == [
        (REPO_ID, "model", str(folder)),
        ("test-owner/space", "space", str(published["summary"]["space_dir"])),
    ]
    for kind, _, options in calls:
        if kind == "upload":
            assert "checkpoint-*" in options["ignore_patterns"] and "train_distill/*" in options["ignore_patterns"]


def test_publish_refuses_a_folder_that_is_no_model(tmp_path):
    from alibi_dinov2.errors import InputError

    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="not a model folder"):
        publish.main([str(tmp_path / "empty")])


def test_the_space_names_each_family_by_its_own_model_type(published):
    from conftest import tiny_alibi_model

    summary = published["summary"]
    readme = (summary["space_dir"] / "README.md").read_text()
    assert "# ALiBi-DINOv2: alibi-tiny" in readme and f"- DINOv2 ({published['base']})" in readme
    assert family_of(tiny_alibi_model("alibi_dinov3").config).title == "ALiBi-DINOv3"
    assert family_of(tiny_alibi_model("alibi_dinov3").config).stock_name == "DINOv3"
