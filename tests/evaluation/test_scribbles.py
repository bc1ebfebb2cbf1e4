"""Scribble generation and the scribble benchmark end to end (its metric: tests/evaluation/test_metrics.py)."""

import json
import shutil

import numpy as np
import pytest
from scipy import ndimage

from alibi_dinov2.io.images import write_image, write_mask
from alibi_dinov2.synthetic.microstructures import generate_microstructure, generate_microstructure_dataset
from evaluation.scribble_benchmark import (
    find_image_mask_pairs,
    main,
    random_scribble,
    run_scribble_benchmark,
    simulate_scribble_rounds,
)


CROSS = ndimage.generate_binary_structure(2, 1)


# ---------------------------------------------------------------- scribbles
@pytest.mark.parametrize("seed", range(4))
def test_scribbles_never_disagree_with_ground_truth_and_accumulate(seed):
    truths = [labels for _, labels in generate_microstructure_dataset(3, size=(64, 80), n_phases=3, seed=seed)]
    rounds = simulate_scribble_rounds(truths, n_rounds=4, seed=seed)
    assert len(rounds) == 4 and all(len(r) == 3 for r in rounds)
    for index, truth in enumerate(truths):
        previous = np.zeros_like(truth)
        for round_labels in rounds:
            scribbles = round_labels[index]
            labelled = scribbles > 0
            np.testing.assert_array_equal(scribbles[labelled], truth[labelled])
            np.testing.assert_array_equal(scribbles[previous > 0], previous[previous > 0])  # kept
            assert np.count_nonzero(scribbles) > np.count_nonzero(previous)  # grows
            assert np.count_nonzero(scribbles) < 0.25 * scribbles.size  # still sparse
            previous = scribbles
        # Round 1 already holds one scribble per class present in the image.
        assert set(np.unique(rounds[0][index])) - {0} == set(np.unique(truth))


def test_scribbles_stay_inside_the_eroded_class_region():
    _, truth = generate_microstructure((96, 96), n_phases=2, seed=7)
    rng = np.random.default_rng(0)
    for class_value in (1, 2):
        for _ in range(5):
            stroke = random_scribble(truth, class_value, rng, length=20, thickness=3)
            assert stroke.sum() > 20
            # Thickness 3 with a 1-pixel margin: every scribble pixel's 4-neighbours share its class.
            inner = ndimage.binary_erosion(truth == class_value, CROSS)
            assert np.all(inner[stroke])


def test_thin_regions_get_thin_scribbles_and_absent_classes_none():
    truth = np.ones((30, 30), dtype=np.int32)
    truth[:, 15] = 2  # a one-pixel-wide phase
    rng = np.random.default_rng(1)
    stroke = random_scribble(truth, 2, rng, length=10, thickness=5)
    assert stroke.any() and np.all(truth[stroke] == 2)
    assert not random_scribble(truth, 3, rng).any()


# ---------------------------------------------------------------- benchmark
def _check_results(results, n_rounds, run_names):
    assert results["rounds"] == list(range(1, n_rounds + 1))
    assert [run["name"] for run in results["runs"]] == run_names
    for run in results["runs"]:
        assert len(run["miou"]) == n_rounds
        assert all(0.0 <= value <= 1.0 for value in run["miou"])
        assert run["labelled_pixels"] == sorted(run["labelled_pixels"])


def test_benchmark_cli_runs_end_to_end_with_classical_features(tmp_path):
    output = tmp_path / "scribbles"
    results = main(
        ["--rounds", "2", "--size", "64", "--n_train", "2", "--n_test", "2", "--n_phases", "2",
         "--output_dir", str(output), "--no_progress"]
    )
    saved = json.loads((output / "scribble_benchmark.json").read_text())
    assert saved["runs"] == json.loads(json.dumps(results["runs"]))
    _check_results(saved, 2, ["classical"])
    assert saved["config"]["n_train"] == 2 and saved["config"]["n_test"] == 2
    assert saved["runs"][0]["miou"][-1] > 0.7  # easy two-phase material
    assert (output / "scribble_benchmark.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_benchmark_reads_image_mask_pairs_from_a_folder(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for index, (image, labels) in enumerate(generate_microstructure_dataset(3, size=(48, 48), seed=2)):
        write_image(data / f"sample{index}.png", (image * 255).astype(np.uint8))
        write_mask(data / f"sample{index}_mask.png", labels)
    assert [p[0].name for p in find_image_mask_pairs(data)] == ["sample0.png", "sample1.png", "sample2.png"]
    results = main(
        [
            "--data", str(data), "--n_train", "2", "--rounds", "1", "--output_dir", str(tmp_path / "out"),
            "--no_progress",
        ]
    )
    assert results["config"]["n_train"] == 2 and results["config"]["n_test"] == 1
    _check_results(results, 1, ["classical"])

    (data / "sample2_mask.png").unlink()
    with pytest.raises(FileNotFoundError, match="sample2"):
        find_image_mask_pairs(data)


def test_images_and_masks_folder_layout(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    write_image(tmp_path / "images" / "a.tif", np.zeros((8, 8), dtype=np.uint16))
    write_mask(tmp_path / "masks" / "a.png", np.ones((8, 8), dtype=np.uint8))
    pairs = find_image_mask_pairs(tmp_path)
    assert [(image.name, mask.name) for image, mask in pairs] == [("a.tif", "a.png")]


def test_vit_feature_sets_need_models():
    pairs = generate_microstructure_dataset(2, size=(32, 32), seed=0)
    with pytest.raises(ValueError, match="needs at least one model"):
        run_scribble_benchmark(pairs[:1], pairs[1:], feature_sets=["classical+vit"], progress=False)


@pytest.fixture(scope="module")
def tiny_dinov2_folder(tmp_path_factory):
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.Dinov2WithRegistersConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, patch_size=14, image_size=56, num_register_tokens=4
    )
    folder = tmp_path_factory.mktemp("models") / "tiny-dinov2-registers"
    transformers.Dinov2WithRegistersModel(config).save_pretrained(folder)
    return folder


def test_benchmark_cli_with_a_tiny_local_vit(tmp_path, tiny_dinov2_folder):
    output = tmp_path / "vit"
    results = main(
        ["--models", str(tiny_dinov2_folder), "--names", "tiny", "--feature_sets", "classical", "classical+vit",
         "--rounds", "2", "--size", "56", "--n_train", "2", "--n_test", "1", "--n_phases", "2", "--device", "cpu",
         "--output_dir", str(output), "--no_progress"]
    )
    _check_results(results, 2, ["classical", "classical+vit [tiny]"])
    assert (output / "scribble_benchmark.png").exists()


def test_benchmark_normalises_each_model_with_its_stored_statistics(tmp_path, tiny_dinov2_folder):
    """The ViT channels of a model with its own image statistics are made with them, not ImageNet's; the JSON says
    which statistics each model's features used."""
    folder = tmp_path / "gray-model"
    shutil.copytree(tiny_dinov2_folder, folder)
    statistics = {"image_mean": [0.3, 0.3, 0.3], "image_std": [0.1, 0.1, 0.1]}
    (folder / "preprocessor_config.json").write_text(
        json.dumps({"image_processor_type": "BitImageProcessor", **statistics})
    )
    arguments = ["--models", str(folder), "--feature_sets", "vit", "--rounds", "1", "--size", "56", "--n_train", "2",
                 "--n_test", "1", "--n_phases", "2", "--device", "cpu", "--output_dir", str(tmp_path / "out"),
                 "--no_progress"]
    results = main(arguments)
    recorded = results["config"]["image_statistics"][folder.name]
    assert recorded == {key: pytest.approx(value) for key, value in statistics.items()}
    saved = json.loads((tmp_path / "out" / "scribble_benchmark.json").read_text())
    assert saved["config"]["image_statistics"][folder.name] == recorded


def test_benchmark_with_an_alibi_model_object():
    torch = pytest.importorskip("torch")
    alibi = pytest.importorskip("modeling_alibi_dinov2")
    from configuration_alibi_dinov2 import AlibiDinov2Config

    torch.manual_seed(0)
    config = AlibiDinov2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, patch_size=14, image_size=56
    )
    model = alibi.AlibiDinov2Model(config).eval()
    pairs = generate_microstructure_dataset(3, size=(42, 56), n_phases=2, seed=1)
    results = run_scribble_benchmark(
        pairs[:2], pairs[2:], feature_sets=["vit", "classical+vit"], models={"alibi-tiny": model},
        n_rounds=1, classifier="random_forest", progress=False,
    )
    _check_results(results, 1, ["vit [alibi-tiny]", "classical+vit [alibi-tiny]"])


def test_the_benchmark_computes_each_stack_once_for_all_runs_that_share_it(monkeypatch):
    from alibi_dinov2.segmentation import extractors
    from conftest import tiny_alibi_model

    computed = {"classical": 0, "vit": 0}
    classical, vit = extractors.classical_features, extractors.vit_feature_channels
    monkeypatch.setattr(extractors, "classical_features",
                        lambda *a, **k: computed.__setitem__("classical", computed["classical"] + 1)
                        or classical(*a, **k))
    monkeypatch.setattr(extractors, "vit_feature_channels",
                        lambda *a, **k: computed.__setitem__("vit", computed["vit"] + 1) or vit(*a, **k))
    pairs = generate_microstructure_dataset(3, size=(42, 56), n_phases=2, seed=1)
    results = run_scribble_benchmark(
        pairs[:2], pairs[2:], feature_sets=["classical", "vit", "classical+vit"],
        models={"tiny": tiny_alibi_model("alibi_dinov2")}, n_rounds=2, classifier="random_forest", progress=False,
    )
    assert computed == {"classical": 3, "vit": 3}  # one stack of each kind per image, shared by the runs
    _check_results(results, 2, ["classical", "vit [tiny]", "classical+vit [tiny]"])
