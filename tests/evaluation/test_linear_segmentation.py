"""Semantic-segmentation linear probes: scores, training, cached features, resume, robustness and input errors.

Everything runs on CPU with a tiny random ALiBi-DINOv2 and a generated data set of noisy colour regions (red,
green, blue; 1-pixel unlabelled boundaries), written as a local image/mask folder.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from alibi_dinov2.cli import load_config_file
from alibi_dinov2.hub import push
from alibi_dinov2.training import runs as training_runs
from configuration_alibi_dinov2 import AlibiDinov2Config
from conftest import REPO_ROOT
from evaluation import linear_segmentation as linseg
from evaluation.linear_segmentation.datasets import SegmentationDataset, load_segmentation_split, prepare_labels
from modeling_alibi_dinov2 import AlibiDinov2Model


# Same sizes as conftest's `tiny_kwargs`, needed by module-scoped fixtures (which cannot use function fixtures).
TINY_BACKBONE = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, patch_size=14, image_size=56)
COLOURS = np.array([(200, 40, 40), (40, 190, 60), (50, 60, 210)], dtype=np.float64)
IGNORE = 255
# Measured: 0.966 validation mIoU at 112 px after 10 epochs (24 training images); a majority-class guess gives ~0.2.
MIN_PROBE_MIOU = 0.90


def make_image_and_mask(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A 56-112 px image of 2-3 noisy colour regions (half-plane, optional disk) and its uint8 mask."""
    height, width = rng.choice([56, 70, 84, 98, 112], size=2)
    rows, columns = np.mgrid[0:height, 0:width]
    classes = rng.permutation(3)
    mask = np.full((height, width), classes[0])
    angle, offset = rng.uniform(0, np.pi), rng.uniform(-0.2, 0.2)
    projection = (columns / width - 0.5) * np.cos(angle) + (rows / height - 0.5) * np.sin(angle)
    mask[projection > offset] = classes[1]
    if rng.random() < 0.6:
        centre_y, centre_x = rng.uniform(0.25, 0.75) * height, rng.uniform(0.25, 0.75) * width
        radius = rng.uniform(0.15, 0.3) * min(height, width)
        mask[(rows - centre_y) ** 2 + (columns - centre_x) ** 2 < radius**2] = classes[2]
    image = np.clip(COLOURS[mask] + rng.normal(0, 20, (height, width, 3)), 0, 255).astype(np.uint8)
    boundary = np.zeros(mask.shape, dtype=bool)
    boundary[1:] |= mask[1:] != mask[:-1]
    boundary[:, 1:] |= mask[:, 1:] != mask[:, :-1]
    return image, np.where(boundary, IGNORE, mask).astype(np.uint8)


def write_split(root: Path, split: str, count: int, seed: int) -> None:
    """ROOT/<split>/images/sNNN.png + ROOT/<split>/masks/sNNN.png."""
    rng = np.random.default_rng(seed)
    (root / split / "images").mkdir(parents=True)
    (root / split / "masks").mkdir(parents=True)
    for index in range(count):
        image, mask = make_image_and_mask(rng)
        Image.fromarray(image).save(root / split / "images" / f"s{index:03d}.png")
        Image.fromarray(mask).save(root / split / "masks" / f"s{index:03d}.png")


def tiny_model(wrap: bool = True, seed: int = 0) -> AlibiDinov2Model:
    torch.manual_seed(seed)
    return AlibiDinov2Model(AlibiDinov2Config(**TINY_BACKBONE, alibi_wrap=wrap)).eval()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A saved tiny backbone folder and a colour-region data set (24 train, 8 val images)."""
    root = tmp_path_factory.mktemp("linseg")
    write_split(root / "data", "train", 24, seed=0)
    write_split(root / "data", "val", 8, seed=1)
    tiny_model().save_pretrained(root / "model")
    return root


def run_settings(workspace: Path, output_dir: Path, **overrides) -> dict:
    settings = dict(
        model=str(workspace / "model"),
        data_dir=str(workspace / "data"),
        val_split="val",
        num_classes=3,
        image_size=112,
        num_train_epochs=10,
        per_device_train_batch_size=8,
        per_device_eval_batch_size=8,
        dataloader_num_workers=0,
        output_dir=str(output_dir),
        no_progress=True,
    )
    settings.update(overrides)
    return settings


@pytest.fixture(scope="module")
def trained_run(workspace):
    """One command-line run with the robustness mode; returns (results, output_dir)."""
    output_dir = workspace / "run"
    arguments = []
    for key, value in run_settings(workspace, output_dir, robustness=True, num_example_images=2).items():
        arguments += [f"--{key}"] if value is True else [f"--{key}", str(value)]
    return linseg.main(arguments), output_dir


# --------------------------------------------------------------------------------------------------
# Estimator
# --------------------------------------------------------------------------------------------------
def test_probe_estimator_fits_predicts_and_round_trips(tmp_path):
    rng = np.random.default_rng(0)
    patch_labels = rng.integers(0, 3, size=(12, 4, 4))
    # Class-dependent means in 8 channels plus noise; labels at 4x the patch resolution.
    centres = rng.normal(0, 1, size=(3, 8))
    features = (centres[patch_labels].transpose(0, 3, 1, 2) + rng.normal(0, 0.3, (12, 8, 4, 4))).astype(np.float32)
    labels = np.kron(patch_labels, np.ones((4, 4), dtype=np.int64))
    probe = linseg.LinearSegmentationProbe(num_classes=3, epochs=60, batch_size=4, learning_rate=1e-2, device="cpu")
    probe.fit(features, labels)
    assert probe.loss_curve_[-1] < 0.5 * probe.loss_curve_[0]
    predictions = probe.predict(features, output_size=(4, 4))
    assert predictions.shape == (12, 4, 4) and predictions.dtype == np.int64
    assert (predictions == patch_labels).mean() > 0.95

    probe.save(tmp_path / "probe")
    loaded = linseg.LinearSegmentationProbe.load(tmp_path / "probe", device="cpu")
    np.testing.assert_array_equal(loaded.predict(features, (16, 16)), probe.predict(features, (16, 16)))
    assert loaded.evaluate(features, labels) == probe.evaluate(features, labels)


def test_probe_is_a_scikit_learn_estimator():
    from sklearn.base import BaseEstimator, clone
    from sklearn.exceptions import NotFittedError

    probe = linseg.LinearSegmentationProbe(num_classes=3, epochs=2, class_names=["a", "b", "c"], device="cpu")
    assert probe.get_params()["class_names"] == ["a", "b", "c"] and probe.get_params()["epochs"] == 2
    probe.set_params(epochs=5, learning_rate=0.1)
    copy = clone(probe)
    assert copy.get_params() == probe.get_params() and copy is not probe
    assert not any(name.endswith("_") and not name.startswith("_") for name in vars(copy))
    # The constructor stores its parameters as given; fit checks them.
    assert linseg.LinearSegmentationProbe(num_classes="3").num_classes == "3"
    for method, arguments in (("predict", (np.zeros((1, 4, 2, 2), np.float32),)), ("save", ("nowhere",))):
        with pytest.raises(NotFittedError, match="not fitted"):
            getattr(probe, method)(*arguments)
    # Nothing of BaseEstimator's is overridden.
    assert set(vars(linseg.LinearSegmentationProbe)) & set(dir(BaseEstimator)) <= {"__init__", "__doc__", "__module__"}

    rng = np.random.default_rng(1)
    features, labels = rng.normal(size=(4, 4, 2, 2)).astype(np.float32), rng.integers(0, 3, size=(4, 2, 2))
    fitted = clone(probe).fit(features, labels)
    assert fitted.in_channels_ == 4 and len(fitted.loss_curve_) == 5
    assert fitted.score(features, labels) == fitted.evaluate(features, labels)["miou"]
    assert not hasattr(clone(fitted), "head_")


# --------------------------------------------------------------------------------------------------
# A full run on the tiny backbone
# --------------------------------------------------------------------------------------------------
def test_probe_on_tiny_backbone_separates_colour_regions(trained_run):
    results, output_dir = trained_run
    assert results["validation"]["miou"] >= MIN_PROBE_MIOU
    assert results["training"]["epochs_completed"] == 10 and results["training"]["global_step"] == 30
    losses = results["training"]["loss_per_epoch"]
    assert len(losses) == 10 and losses[-1] < losses[0]
    stored = json.loads((output_dir / "results.json").read_text())
    assert stored["validation"]["miou"] == pytest.approx(results["validation"]["miou"])
    # The figure holds 2 rows of image | ground truth | prediction (300 px per row at 100 dpi).
    figure = np.asarray(Image.open(output_dir / "examples.png"))
    assert figure.shape[0] == 600 and figure.shape[1] == 900


def test_saved_probe_reproduces_the_reported_scores(trained_run):
    results, output_dir = trained_run
    cache = linseg.CachedFeatureDataset(output_dir / "feature_cache" / "val")
    features = np.stack([cache[index]["features"].numpy() for index in range(len(cache))])
    labels = np.stack([cache[index]["labels"].numpy() for index in range(len(cache))])
    probe = linseg.LinearSegmentationProbe.load(output_dir / "probe", device="cpu")
    scores = probe.evaluate(features, labels)
    assert scores["miou"] == pytest.approx(results["validation"]["miou"], abs=1e-12)
    assert scores["pixel_accuracy"] == pytest.approx(results["validation"]["pixel_accuracy"], abs=1e-12)
    # The saved probe records the run's settings under the estimator's names, and its loss curve.
    params = probe.get_params()
    assert (params["epochs"], params["batch_size"], params["learning_rate"], params["seed"]) == (10, 8, 1e-3, 0)
    assert probe.loss_curve_ == pytest.approx(results["training"]["loss_per_epoch"])


def test_a_trained_head_becomes_a_fitted_probe():
    head = linseg.make_segmentation_head(4, 3, seed=0).eval()
    probe = linseg.LinearSegmentationProbe.from_head(head, [0.5, 0.25], learning_rate=0.1)
    assert probe.head_ is head and probe.in_channels_ == 4 and probe.loss_curve_ == [0.5, 0.25]
    assert probe.num_classes == 3 and probe.learning_rate == 0.1
    features = np.random.default_rng(0).normal(size=(2, 4, 3, 3)).astype(np.float32)
    with torch.no_grad():
        expected = head(torch.from_numpy(features)).argmax(dim=1).numpy()
    np.testing.assert_array_equal(probe.predict(features), expected)
    with pytest.raises(ValueError, match="num_classes=5 for a head with 3 outputs"):
        linseg.LinearSegmentationProbe.from_head(head, num_classes=5)


def test_roll_by_whole_patches_leaves_miou_unchanged_with_wrapped_alibi(trained_run):
    results, _ = trained_run
    robustness = results["robustness"]
    assert set(robustness) == {"none", "flip_ud", "roll", "rot90"}
    assert results["roll_shift_patches"] == 4  # half of the 8 x 8 patch grid
    assert robustness["roll"]["miou"] == pytest.approx(robustness["none"]["miou"], abs=1e-6)
    assert robustness["roll"]["pixel_accuracy"] == pytest.approx(robustness["none"]["pixel_accuracy"], abs=1e-6)
    # The live untransformed baseline scores what the cached features score.
    assert robustness["none"]["miou"] == pytest.approx(results["validation"]["miou"], abs=1e-3)


def test_cached_features_equal_live_features_up_to_float16(trained_run, workspace):
    _, output_dir = trained_run
    cache = linseg.CachedFeatureDataset(output_dir / "feature_cache" / "val")
    split, image_column, mask_column = load_segmentation_split("val", data_dir=workspace / "data")
    images = SegmentationDataset(split, image_column, mask_column, num_classes=3, image_size=112)
    model = AlibiDinov2Model.from_pretrained(workspace / "model").eval()
    assert len(cache) == len(images) == 8
    for index in (0, 5):
        live = linseg.patch_feature_maps(model, images[index]["pixel_values"][None])[0].numpy()
        cached = cache[index]["features"].numpy()
        assert cached.shape == live.shape == (32, 8, 8)
        np.testing.assert_allclose(cached, live, rtol=2**-10, atol=1e-4)  # float16: 11 significant bits
        np.testing.assert_array_equal(cache[index]["labels"].numpy(), images[index]["labels"].numpy())


# --------------------------------------------------------------------------------------------------
# Resume
# --------------------------------------------------------------------------------------------------
def test_resume_after_a_stop_gives_the_same_weights(workspace, tmp_path):
    from safetensors.torch import load_file

    common = dict(image_size=56, num_train_epochs=3, per_device_train_batch_size=3, max_train_samples=8,
                  max_eval_samples=2, num_example_images=0,
                  feature_cache_dir=str(tmp_path / "cache"))
    straight = linseg.make_config(run_settings(workspace, tmp_path / "straight", **common))
    linseg.run_linear_segmentation(straight)

    # 3 steps per epoch: stop in the middle of the second epoch, then resume from the newest checkpoint.
    stopped = linseg.run_linear_segmentation(
        linseg.make_config(run_settings(workspace, tmp_path / "resumed", max_train_steps=4, **common))
    )
    assert stopped["training"]["global_step"] == 4 and stopped["training"]["stopped_at_max_steps"]
    assert [path.name for path in training_runs.list_checkpoints(tmp_path / "resumed")] == [
        "checkpoint_00000003",
        "checkpoint_00000004",
    ]
    resumed = linseg.run_linear_segmentation(
        linseg.make_config(run_settings(workspace, tmp_path / "resumed", resume_from_checkpoint="latest", **common))
    )
    assert resumed["training"]["global_step"] == 9 and resumed["training"]["epochs_completed"] == 3

    expected = load_file(str(tmp_path / "straight" / "probe" / "head.safetensors"))
    actual = load_file(str(tmp_path / "resumed" / "probe" / "head.safetensors"))
    assert expected.keys() == actual.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=0, msg=name)
    straight_losses = json.loads((tmp_path / "straight" / "results.json").read_text())["training"]["loss_per_epoch"]
    assert resumed["training"]["loss_per_epoch"] == pytest.approx(straight_losses, rel=1e-6)


def test_checkpoints_every_n_steps_and_the_loss_in_tensorboard(workspace, tmp_path):
    settings = run_settings(workspace, tmp_path / "every2", image_size=56, num_train_epochs=2,
                            per_device_train_batch_size=3, max_train_samples=9, max_eval_samples=2,
                            num_example_images=0, checkpointing_steps="2", checkpoints_total_limit=None,
                            feature_cache_dir=str(tmp_path / "cache"), report_to="tensorboard", logging_steps=2)
    results = linseg.run_linear_segmentation(linseg.make_config(settings))
    assert results["training"]["global_step"] == 6  # 3 steps per epoch
    assert [path.name for path in training_runs.list_checkpoints(tmp_path / "every2")] == [
        "checkpoint_00000002", "checkpoint_00000004", "checkpoint_00000006"
    ]
    # The shared tracking options reach this job too: the loss every --logging_steps, the epoch loss per epoch.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logs = training_runs.run_folder(tmp_path / "every2") / training_runs.LOGS_FOLDER
    events = EventAccumulator(str(logs / "linear_segmentation")).Reload()
    assert [event.step for event in events.Scalars("train/loss")] == [2, 4, 6]
    epoch_losses = [event.value for event in events.Scalars("train/epoch_loss")]
    assert epoch_losses == pytest.approx(results["training"]["loss_per_epoch"], rel=1e-6)


# --------------------------------------------------------------------------------------------------
# Transforms
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("transform", linseg.TRANSFORMS)
def test_undoing_a_transform_on_features_restores_the_grid(transform):
    # Patch-wise average pooling commutes with flips, rot90 and rolls by whole patches: a perfect "backbone".
    pixel_values = torch.randn(2, 3, 56, 70)
    patchwise = lambda images: torch.nn.functional.avg_pool2d(images, 14)  # noqa: E731
    moved = linseg.transform_images(pixel_values, transform, patch_size=14, shift_patches=2)
    if transform != "none":
        assert not torch.equal(moved, pixel_values)
    restored = linseg.undo_transform_on_features(patchwise(moved), transform, shift_patches=2)
    torch.testing.assert_close(restored, patchwise(pixel_values))


# --------------------------------------------------------------------------------------------------
# Configs and input errors
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, epochs, classes", [("voc2007", 75, 21), ("voc2012", 50, 21), ("ade20k", 50, 150)])
def test_configs_follow_the_paper(name, epochs, classes):
    path = REPO_ROOT / "configs" / f"linear_seg_{name}.json"
    config = linseg.make_config(load_config_file(path), {"model": "any"})
    assert (config.image_size, config.learning_rate, config.weight_decay) == (518, 1e-3, 0.01)
    assert config.num_train_epochs == epochs and config.num_classes == classes and len(config.class_names) == classes
    assert config.ignore_index == 255 and config.reduce_labels == (name == "ade20k")


def test_help_documents_every_setting():
    text = linseg.build_parser().format_help()
    for setting in linseg.FIELD_HELP:
        assert f"--{setting}" in text


def test_unknown_option_message(capsys):
    with pytest.raises(SystemExit):
        linseg.parse_args(["--model", "m", "--data_dir", "d", "--num_classes", "3", "--learning_rat", "3"])
    error = capsys.readouterr().err
    assert "unknown option '--learning_rat'" in error and "did you mean '--learning_rate'" in error


@pytest.mark.parametrize("old, new", sorted(linseg.RENAMED_SETTINGS.items()))
def test_an_old_option_name_is_refused_naming_the_shared_one(old, new, tmp_path, capsys):
    with pytest.raises(SystemExit):
        linseg.parse_args(["--model", "m", "--data_dir", "d", "--num_classes", "3", f"--{old}", "3"])
    assert f"unknown option '--{old}' (renamed '--{new}')" in capsys.readouterr().err
    config_file = tmp_path / "old.json"
    config_file.write_text(json.dumps({"num_classes": 3, old: 3}))
    with pytest.raises(SystemExit):
        linseg.parse_args([str(config_file), "--model", "m", "--data_dir", "d"])
    assert f"'{old}' (renamed '{new}')" in capsys.readouterr().err
    with pytest.raises(ValueError, match=f"Unknown key '{old}' \\(renamed '{new}'\\)"):
        linseg.make_config({"model": "m", "num_classes": 3, "data_dir": "d", old: 3})


def test_the_probe_takes_one_optimiser_step_per_batch():
    with pytest.raises(ValueError, match="--gradient_accumulation_steps: the linear probe takes one optimiser step"):
        linseg.make_config({"model": "m", "num_classes": 3, "data_dir": "d", "gradient_accumulation_steps": 2})


def test_unknown_config_key_and_missing_data_source(tmp_path, capsys):
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps({"num_classes": 3, "learning_rat": 0.1}))
    with pytest.raises(SystemExit):
        linseg.parse_args([str(config_file), "--model", "m"])
    assert "unknown option(s) in" in capsys.readouterr().err
    with pytest.raises(ValueError, match="Unknown key 'learning_rat'.*'learning_rate'"):
        linseg.make_config(load_config_file(config_file))
    with pytest.raises(ValueError, match="No data source"):
        linseg.make_config({"model": "m", "num_classes": 3})
    with pytest.raises(ValueError, match="ignore_index 2 is a class index"):
        linseg.make_config({"model": "m", "num_classes": 3, "data_dir": "d", "ignore_index": 2})


def test_command_line_data_source_replaces_the_files(tmp_path):
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps({"dataset_name": "some/hub-dataset", "num_classes": 21}))
    config = linseg.parse_args([str(config_file), "--model", "m", "--data_dir", "local"])
    assert config.data_dir == "local" and config.dataset_name is None and config.num_classes == 21


def test_label_values_out_of_range_are_refused(tmp_path):
    write_split(tmp_path, "train", 1, seed=3)
    mask_path = tmp_path / "train" / "masks" / "s000.png"
    mask = np.asarray(Image.open(mask_path)).copy()
    mask[:5, :5] = 7
    Image.fromarray(mask).save(mask_path)
    split, image_column, mask_column = load_segmentation_split("train", data_dir=tmp_path)
    dataset = SegmentationDataset(split, image_column, mask_column, num_classes=3, image_size=56)
    with pytest.raises(ValueError, match=r"s000.*label values \[7\] outside 0..2"):
        dataset[0]


def test_reduce_labels_maps_ade20k_masks():
    raw = np.array([[0, 1, 150], [255, 2, 0]])
    reduced = prepare_labels(raw, num_classes=150, reduce_labels=True)
    assert reduced.tolist() == [[255, 0, 149], [255, 1, 255]]
    with pytest.raises(ValueError, match="151"):
        prepare_labels(np.array([[151]]), num_classes=150, reduce_labels=True)


def test_missing_masks_and_folders_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_segmentation_split("train", data_dir=tmp_path / "nowhere")
    write_split(tmp_path, "train", 2, seed=4)
    (tmp_path / "train" / "masks" / "s001.png").unlink()
    with pytest.raises(FileNotFoundError, match="no mask of the same name.*s001"):
        load_segmentation_split("train", data_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="splits found in .*train"):
        load_segmentation_split("val", data_dir=tmp_path)



def write_pairs(image_folder: Path, mask_folder: Path, names: list[str], seed: int, image_suffix=".jpg") -> None:
    rng = np.random.default_rng(seed)
    image_folder.mkdir(parents=True, exist_ok=True)
    mask_folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        image, mask = make_image_and_mask(rng)
        Image.fromarray(image).save(image_folder / f"{name}{image_suffix}")
        Image.fromarray(mask).save(mask_folder / f"{name}.png")


def test_voc_devkit_folder_reads_the_split_lists(tmp_path):
    write_pairs(
        tmp_path / "JPEGImages", tmp_path / "SegmentationClass", ["2007_000032", "2007_000039", "2007_000063"], 6
    )
    (tmp_path / "ImageSets" / "Segmentation").mkdir(parents=True)
    (tmp_path / "ImageSets" / "Segmentation" / "train.txt").write_text("2007_000032\n2007_000063\n")
    (tmp_path / "ImageSets" / "Segmentation" / "val.txt").write_text("2007_000039\n")
    split, image_column, mask_column = load_segmentation_split("train", data_dir=tmp_path)
    assert split["name"] == ["2007_000032", "2007_000063"]
    mask = np.asarray(split[1][mask_column])
    np.testing.assert_array_equal(mask, np.asarray(Image.open(tmp_path / "SegmentationClass" / "2007_000063.png")))
    with pytest.raises(FileNotFoundError, match=r"splits \['train', 'val'\]"):
        load_segmentation_split("validation", data_dir=tmp_path)


def test_ade_challenge_folder_maps_the_split_names(tmp_path):
    write_pairs(
        tmp_path / "images" / "training", tmp_path / "annotations" / "training", ["ADE_train_1", "ADE_train_2"], 7
    )
    write_pairs(tmp_path / "images" / "validation", tmp_path / "annotations" / "validation", ["ADE_val_1"], 8)
    assert load_segmentation_split("train", data_dir=tmp_path)[0]["name"] == ["ADE_train_1", "ADE_train_2"]
    for split_name in ("validation", "val"):
        split, image_column, _ = load_segmentation_split(split_name, data_dir=tmp_path)
        assert split["name"] == ["ADE_val_1"]
        assert np.asarray(split[0][image_column]).shape[-1] == 3
    with pytest.raises(FileNotFoundError, match=r"splits found in .*\['training', 'validation'\]"):
        load_segmentation_split("test", data_dir=tmp_path)


def test_hub_datasets_get_the_revision_and_a_way_out_of_loading_scripts(monkeypatch):
    import datasets

    calls = []

    def script_only(name, config_name=None, split=None, revision=None):
        calls.append(revision)
        if revision is None:
            raise RuntimeError(f"Dataset scripts are no longer supported, but found {name.split('/')[-1]}.py")
        return datasets.Dataset.from_dict(
            {"image": [np.zeros((4, 4, 3), np.uint8)], "annotation": [np.zeros((4, 4), np.uint8)]}
        )

    monkeypatch.setattr(datasets, "load_dataset", script_only)
    with pytest.raises(RuntimeError, match="--dataset_revision refs/convert/parquet.*--data_dir"):
        load_segmentation_split("train", dataset_name="zhoubolei/scene_parse_150", mask_column="annotation")
    split, _, _ = load_segmentation_split(
        "train",
        dataset_name="zhoubolei/scene_parse_150",
        mask_column="annotation",
        dataset_revision="refs/convert/parquet",
    )
    assert len(split) == 1 and calls == [None, "refs/convert/parquet"]

def test_colour_masks_are_refused(tmp_path):
    write_split(tmp_path, "train", 1, seed=5)
    mask_path = tmp_path / "train" / "masks" / "s000.png"
    Image.open(mask_path).convert("RGB").save(mask_path)
    split, image_column, mask_column = load_segmentation_split("train", data_dir=tmp_path)
    with pytest.raises(ValueError, match="RGB colour image"):
        SegmentationDataset(split, image_column, mask_column, num_classes=3, image_size=56)[0]


def test_image_size_must_be_a_multiple_of_the_patch(workspace, tmp_path):
    config = linseg.make_config(run_settings(workspace, tmp_path / "out", image_size=60, num_train_epochs=1))
    with pytest.raises(ValueError, match="not a multiple of the patch size 14"):
        linseg.run_linear_segmentation(config)


def test_feature_cache_built_from_other_settings_is_refused(workspace, tmp_path):
    common = dict(num_train_epochs=1, image_size=56, max_train_samples=2, max_eval_samples=2, num_example_images=0,
                  feature_cache_dir=str(tmp_path / "cache"))
    linseg.run_linear_segmentation(linseg.make_config(run_settings(workspace, tmp_path / "a", **common)))
    other = dict(common, image_size=70)
    with pytest.raises(ValueError, match="built with other settings.*image_size"):
        linseg.run_linear_segmentation(linseg.make_config(run_settings(workspace, tmp_path / "b", **other)))


def test_saved_datasets_folder_gives_the_same_samples_as_the_image_folder(workspace, tmp_path):
    import datasets

    local, _, _ = load_segmentation_split("val", data_dir=workspace / "data", max_samples=3)
    renamed = local.rename_columns({"image": "picture", "mask": "annotation"})
    datasets.DatasetDict({"validation": renamed}).save_to_disk(str(tmp_path / "saved"))
    saved, image_column, mask_column = load_segmentation_split(
        "validation", dataset_name=str(tmp_path / "saved"), image_column="picture", mask_column="annotation"
    )
    assert len(saved) == 3
    from_saved = SegmentationDataset(saved, image_column, mask_column, num_classes=3, image_size=56)
    from_folder = SegmentationDataset(local, "image", "mask", num_classes=3, image_size=56)
    for index in range(3):
        torch.testing.assert_close(from_saved[index]["pixel_values"], from_folder[index]["pixel_values"])
        torch.testing.assert_close(from_saved[index]["labels"], from_folder[index]["labels"])
    with pytest.raises(ValueError, match="mask column 'label' not in .*Set --mask_column"):
        load_segmentation_split("validation", dataset_name=str(tmp_path / "saved"), image_column="picture")


@pytest.mark.multiprocess
def test_two_processes_share_the_work_without_double_counting(workspace, tmp_path):
    """Two CPU processes in one gloo group, launched through torchrun (accelerate's `--multi_gpu`)."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as probe:  # a free port: the default one may be taken by another group on this machine
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    output_dir = tmp_path / "two"
    command = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--multi_gpu"]
    command += ["--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    command += ["--main_process_port", str(port), "-m", "evaluation.linear_segmentation"]
    settings = run_settings(workspace, output_dir, image_size=56, num_train_epochs=1, per_device_train_batch_size=4,
                            num_example_images=0)
    for key, value in settings.items():
        command += [f"--{key}"] if value is True else [f"--{key}", str(value)]
    environment = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO_ROOT))
    finished = subprocess.run(command, cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-4000:]

    results = json.loads((output_dir / "results.json").read_text())
    assert results["training"]["steps_per_epoch"] == 3  # 24 images in batches of 4 on each of 2 processes
    split, image_column, mask_column = load_segmentation_split("val", data_dir=workspace / "data")
    images = SegmentationDataset(split, image_column, mask_column, num_classes=3, image_size=56)
    labelled = sum(int((images[index]["labels"] != IGNORE).sum()) for index in range(len(images)))
    assert results["validation"]["num_pixels"] == labelled  # every validation pixel scored exactly once
    assert len(list((output_dir / "feature_cache" / "train" / "features").glob("*.npy"))) == 24
    assert (training_runs.checkpoint_path(output_dir, 3) / "random_states_1.pkl").is_file()


# --------------------------------------------------------------------------------------------------
# Batch input policy, command-line errors, Hub push
# --------------------------------------------------------------------------------------------------
def write_split_with_bad_images(root: Path) -> None:
    """ROOT/train with 4 good images, one that is no image and one smaller than a patch; ROOT/val with 2."""
    write_split(root, "train", 4, seed=10)
    write_split(root, "val", 2, seed=11)
    (root / "train" / "images" / "broken.png").write_bytes(b"not a png at all")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "train" / "masks" / "broken.png")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "train" / "images" / "tiny.png")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "train" / "masks" / "tiny.png")


def test_unreadable_and_too_small_images_are_skipped_and_named(workspace, tmp_path, caplog):
    write_split_with_bad_images(tmp_path / "data")
    settings = run_settings(workspace, tmp_path / "out", data_dir=str(tmp_path / "data"), image_size=56,
                            num_train_epochs=1, num_example_images=0)
    with caplog.at_level("WARNING", logger="alibi_dinov2.io.images"):
        results = linseg.run_linear_segmentation(linseg.make_config(settings))
    assert results["num_train_samples"] == 4 and results["num_val_samples"] == 2
    skipped = {item["name"]: item["reason"] for item in results["skipped_inputs"]["train"]}
    assert sorted(skipped) == ["sample 0 (broken)", "sample 5 (tiny)"]
    assert "broken.png" in skipped["sample 0 (broken)"]
    assert "tiny.png: image of 8 x 8 px is smaller than one 14 x 14 patch" in skipped["sample 5 (tiny)"]
    assert results["skipped_inputs"]["val"] == []
    assert "Skipped 2 of 6 images" in caplog.text and "--strict" in caplog.text

    from alibi_dinov2.io.images import ImageReadError

    with pytest.raises(ImageReadError, match="broken.png"):
        linseg.run_linear_segmentation(linseg.make_config(dict(settings, strict=True, output_dir=str(tmp_path / "s"))))


def test_a_rerun_on_the_cache_reads_the_image_check_instead_of_decoding_again(
    workspace, tmp_path, monkeypatch, caplog
):
    from evaluation.linear_segmentation import data

    write_split_with_bad_images(tmp_path / "data")
    settings = run_settings(workspace, tmp_path / "first", data_dir=str(tmp_path / "data"), image_size=56,
                            num_train_epochs=1, num_example_images=0, feature_cache_dir=str(tmp_path / "cache"))
    first = linseg.run_linear_segmentation(linseg.make_config(settings))
    checked = []
    check = data._ImageCheck.__getitem__
    monkeypatch.setattr(
        data._ImageCheck, "__getitem__", lambda self, position: checked.append(position) or check(self, position)
    )
    with caplog.at_level("WARNING", logger="alibi_dinov2.io.images"):
        second = linseg.run_linear_segmentation(
            linseg.make_config(dict(settings, output_dir=str(tmp_path / "second")))
        )
    assert checked == []  # no image decoded to find the unusable ones
    assert second["skipped_inputs"] == first["skipped_inputs"] and len(second["skipped_inputs"]["train"]) == 2
    assert second["num_train_samples"] == first["num_train_samples"] == 4
    assert "sample 0 (broken)" in caplog.text and "Skipped 2 of 6 images" in caplog.text
    # Another subset of the split is checked again (and then refused by the feature cache built from the whole one).
    with pytest.raises(ValueError, match="built with other settings"):
        linseg.run_linear_segmentation(linseg.make_config(dict(settings, output_dir=str(tmp_path / "third"),
                                                               max_train_samples=5)))
    assert len(checked) == 5  # the 5 training samples (the validation split's record still matches)


def test_command_line_errors_are_one_line_and_exit_2(tmp_path, capsys):
    from alibi_dinov2.cli import run_command

    with pytest.raises(SystemExit) as stopped:
        run_command(
            linseg.main, ["--model", str(tmp_path / "no-model"), "--data_dir", str(tmp_path), "--num_classes", "3"]
        )
    assert stopped.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "error: not found: " in error[0] and "no-model" in error[0]


def test_yaml_config_file_first_and_flags_win(tmp_path):
    config_file = tmp_path / "probe.yaml"
    config_file.write_text("num_classes: 4\nnum_train_epochs: 7\ndata_dir: d\nrobustness_transforms: [roll]\n")
    config = linseg.parse_args([str(config_file), "--model", "m", "--num_train_epochs", "2", "--push_to_hub"])
    assert (config.num_classes, config.num_train_epochs, config.robustness_transforms) == (4, 2, ["roll"])
    assert config.push_to_hub is True and config.data_dir == "d"
    help_text = linseg.build_parser().format_help()
    assert "--output_dir" in help_text and "--output-dir" not in help_text and "--push_to_hub" in help_text


def test_push_to_hub_uploads_the_run_without_cache_or_checkpoints(workspace, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(push, "push_to_hub", lambda folder, repo_id, **options: calls.append(
        (Path(folder), repo_id, options)) or f"https://huggingface.co/{repo_id}")
    settings = run_settings(workspace, tmp_path / "pushed", image_size=56, num_train_epochs=1, max_train_samples=4,
                            max_eval_samples=2, num_example_images=0, push_to_hub=True, hub_model_id="me/probe")
    linseg.run_linear_segmentation(linseg.make_config(settings))
    ((folder, repo_id, options),) = calls
    assert folder == tmp_path / "pushed" and repo_id == "me/probe"
    assert options["ignore_patterns"] == ["feature_cache/"] and options["private"] is False
    assert (folder / "results.json").is_file() and (folder / "probe" / "head.safetensors").is_file()
