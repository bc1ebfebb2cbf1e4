"""The run layer of the Accelerate jobs: complete-or-absent checkpoints, pruning, resume, progress objects, push."""

import dataclasses
from pathlib import Path

import pytest
import torch

from alibi_dinov2.errors import SourceNotFoundError
from alibi_dinov2.hub.push import push_to_hub
from alibi_dinov2.training import runs


@dataclasses.dataclass
class Progress(runs.StateDictDataclass):
    global_step: int = 0
    losses: list = dataclasses.field(default_factory=list)
    note: str | None = None


@pytest.fixture
def job(tmp_path):
    """A CPU accelerator with a prepared linear model and optimizer, and a registered Progress."""
    accelerator = runs.make_accelerator(tmp_path / "run", cpu=True, seed=0)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    progress = Progress()
    accelerator.register_for_checkpointing(progress)
    yield accelerator, model, optimizer, progress, tmp_path / "run"
    runs.release_accelerator()


def train_one_step(model, optimizer, progress) -> None:
    loss = model(torch.ones(4, 3)).square().mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    progress.global_step += 1
    progress.losses.append(float(loss.detach()))


def test_checkpoint_names_and_layout(job):
    accelerator, model, optimizer, progress, output_dir = job
    train_one_step(model, optimizer, progress)
    saved = runs.save_checkpoint(accelerator, output_dir, 1)
    run_files = output_dir.with_name("run-run")  # beside the output folder, which keeps the results only
    assert runs.run_folder(output_dir) == run_files and runs.run_folder(f"{output_dir}/") == run_files
    assert saved == run_files / "checkpoints" / "checkpoint_00000001"
    assert runs.checkpoint_step(saved) == 1
    assert (saved / "custom_checkpoint_0.pkl").is_file() and (saved / "random_states_0.pkl").is_file()
    assert accelerator.project_configuration.logging_dir == str(run_files / "logs")
    assert [path.name for path in (run_files / "checkpoints").iterdir()] == ["checkpoint_00000001"]
    assert not output_dir.exists() or not any(output_dir.iterdir())


def test_a_save_killed_midway_leaves_nothing_latest_picks(job, monkeypatch):
    accelerator, model, optimizer, progress, output_dir = job
    train_one_step(model, optimizer, progress)
    first = runs.save_checkpoint(accelerator, output_dir, 1)
    train_one_step(model, optimizer, progress)

    original = type(accelerator).save_state

    def dies_after_the_weights(self, output_dir=None, **kwargs):
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        (Path(output_dir) / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt("killed while saving")

    monkeypatch.setattr(type(accelerator), "save_state", dies_after_the_weights)
    # A kill runs no clean-up: the temporary folder stays where it was.
    monkeypatch.setattr(runs, "_remove_tree", lambda path: None)
    with pytest.raises(KeyboardInterrupt):
        runs.save_checkpoint(accelerator, output_dir, 2)
    monkeypatch.undo()
    assert type(accelerator).save_state is original

    leftovers = sorted(path.name for path in runs.checkpoints_root(output_dir).iterdir())
    assert leftovers == [".tmp_checkpoint_00000002", "checkpoint_00000001"]
    assert runs.list_checkpoints(output_dir) == [first]
    assert runs.resolve_resume_checkpoint("latest", output_dir) == first
    with pytest.raises(SourceNotFoundError, match="not found: .*tmp_checkpoint_00000002"):
        runs.resolve_resume_checkpoint(str(runs.checkpoints_root(output_dir) / ".tmp_checkpoint_00000002"),
                                       output_dir)

    runs.remove_incomplete_checkpoints(output_dir)
    assert [path.name for path in runs.checkpoints_root(output_dir).iterdir()] == ["checkpoint_00000001"]


def test_an_error_while_saving_removes_the_temporary_folder(job, monkeypatch):
    accelerator, model, optimizer, progress, output_dir = job

    def fails(self, output_dir=None, **kwargs):
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        raise OSError("disk full")

    monkeypatch.setattr(type(accelerator), "save_state", fails)
    with pytest.raises(OSError, match="disk full"):
        runs.save_checkpoint(accelerator, output_dir, 5)
    assert list(runs.checkpoints_root(output_dir).iterdir()) == []
    assert runs.resolve_resume_checkpoint("latest", output_dir) is None


def test_pruning_keeps_the_newest_total_limit(job):
    accelerator, model, optimizer, progress, output_dir = job
    for step in (1, 2, 3, 10):
        train_one_step(model, optimizer, progress)
        runs.save_checkpoint(accelerator, output_dir, step, total_limit=2)
    assert [path.name for path in runs.list_checkpoints(output_dir)] == ["checkpoint_00000003", "checkpoint_00000010"]
    for step in (11, 12):
        runs.save_checkpoint(accelerator, output_dir, step, total_limit=0)  # 0 keeps all
    assert len(runs.list_checkpoints(output_dir)) == 4
    # Saving a step again replaces the folder.
    progress.note = "again"
    runs.save_checkpoint(accelerator, output_dir, 12, total_limit=None)
    assert [runs.checkpoint_step(path) for path in runs.list_checkpoints(output_dir)] == [3, 10, 11, 12]


def test_registered_progress_and_weights_round_trip(job):
    accelerator, model, optimizer, progress, output_dir = job
    for _ in range(3):
        train_one_step(model, optimizer, progress)
    progress.note = "three steps"
    saved = runs.save_checkpoint(accelerator, output_dir, progress.global_step)
    expected_progress = dataclasses.replace(progress, losses=list(progress.losses))
    expected_weights = {name: value.clone() for name, value in model.state_dict().items()}
    expected_optimizer_steps = optimizer.state_dict()["state"][0]["step"].clone()

    train_one_step(model, optimizer, progress)
    progress.note = "changed"
    assert progress != expected_progress

    runs.load_checkpoint(accelerator, runs.resolve_resume_checkpoint("latest", output_dir))
    assert runs.resolve_resume_checkpoint("latest", output_dir) == saved
    assert progress == expected_progress
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, expected_weights[name], rtol=0, atol=0)
    assert torch.equal(optimizer.state_dict()["state"][0]["step"], expected_optimizer_steps)


def test_state_dict_dataclass_ignores_unknown_keys():
    progress = Progress(global_step=4, losses=[1.0])
    state = progress.state_dict()
    assert state == {"global_step": 4, "losses": [1.0], "note": None}
    state["losses"].append(2.0)  # a copy, not the live list
    assert progress.losses == [1.0]
    fresh = Progress()
    fresh.load_state_dict({"global_step": 7, "from_a_newer_version": True})
    assert fresh == Progress(global_step=7)


def test_resolve_resume_checkpoint(tmp_path):
    output_dir = tmp_path / "out"
    assert runs.resolve_resume_checkpoint(None, output_dir) is None
    assert runs.resolve_resume_checkpoint("latest", output_dir) is None  # nothing saved yet
    with pytest.raises(SourceNotFoundError, match="not found: .*nowhere"):
        runs.resolve_resume_checkpoint(str(tmp_path / "nowhere"), output_dir)
    empty = tmp_path / "out-run" / "checkpoints" / "checkpoint_00000004"
    empty.mkdir(parents=True)  # named like one, but accelerate never finished writing it
    assert runs.list_checkpoints(output_dir) == []
    with pytest.raises(SourceNotFoundError, match="checkpoint_00000004"):
        runs.resolve_resume_checkpoint(str(empty), output_dir)
    (empty / "random_states_0.pkl").write_bytes(b"")
    assert runs.resolve_resume_checkpoint(str(empty), output_dir) == empty
    assert runs.resolve_resume_checkpoint("latest", output_dir) == empty


def test_a_second_job_in_the_same_process_may_change_settings(tmp_path):
    first = runs.make_accelerator(tmp_path / "a", cpu=True)
    assert first.mixed_precision == "no"
    runs.release_accelerator()
    second = runs.make_accelerator(tmp_path / "b", cpu=True, mixed_precision="bf16")
    assert second.mixed_precision == "bf16"
    runs.release_accelerator()


def test_push_to_hub_never_uploads_checkpoints_logs_or_temporary_files(tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub.utils import filter_repo_objects

    folder = tmp_path / "run"
    files = [
        "results.json",
        "probe/head.safetensors",
        "probe/probe_config.json",
        "feature_cache/train/info.json",
        "checkpoints/checkpoint_00000003/model.safetensors",
        "checkpoints/.tmp_checkpoint_00000004/optimizer.bin",
        "logs/events.out.tfevents",
        ".results.1a2b3c4d.tmp.json",
        "probe/.head.safetensors.tmp",
        "examples.png",
    ]
    for name in files:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text("x")
    calls = {}

    class FakeApi:
        def create_repo(self, repo_id, **kwargs):
            calls["create_repo"] = (repo_id, kwargs)
            return f"https://huggingface.co/{repo_id}"

        def upload_folder(self, **kwargs):
            calls["upload_folder"] = kwargs

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    url = push_to_hub(folder, "someone/probe", private=True, ignore_patterns=["feature_cache/"])
    assert url == "https://huggingface.co/someone/probe"
    assert calls["create_repo"] == ("someone/probe", {"private": True, "exist_ok": True, "repo_type": "model"})
    upload = calls["upload_folder"]
    assert upload["folder_path"] == str(folder) and upload["repo_id"] == "someone/probe"
    uploaded = sorted(filter_repo_objects(files, ignore_patterns=upload["ignore_patterns"]))
    assert uploaded == ["examples.png", "probe/head.safetensors", "probe/probe_config.json", "results.json"]
