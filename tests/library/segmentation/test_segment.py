"""The batch segmentation command: train from scribbles, apply to stacks and folders, skip and resume."""

import numpy as np
import pytest

from alibi_dinov2.cli import run_command
from alibi_dinov2.io.images import read_pages, write_image, write_mask
from alibi_dinov2.segmentation import command as segment
from alibi_dinov2.segmentation.trainable import TrainableSegmenter
from alibi_dinov2.synthetic.microstructures import generate_microstructure_dataset
from evaluation.metrics import segmentation_scores
from evaluation.scribble_benchmark import simulate_scribble_rounds


def as_uint16(image):
    return np.round(image * 65535).astype(np.uint16)


@pytest.fixture(scope="module")
def material(tmp_path_factory):
    """A 16-bit two-phase micrograph with scribbles, a trained segmenter, and a 3-page stack with its truth."""
    folder = tmp_path_factory.mktemp("material")
    pairs = generate_microstructure_dataset(4, size=(128, 128), n_phases=2, seed=3)
    (train_image, train_truth), *stack = pairs
    scribbles = simulate_scribble_rounds([train_truth], n_rounds=3, seed=0)[-1][0]
    write_image(folder / "train.tif", as_uint16(train_image))
    write_mask(folder / "scribbles.png", scribbles)
    write_image(folder / "stack.tif", [as_uint16(image) for image, _ in stack])
    segmenter = folder / "segmenter.zip"
    segment.main(["train", "--images", str(folder / "train.tif"), "--labels", str(folder / "scribbles.png"),
                  "--output", str(segmenter)])
    return folder, segmenter, [truth for _, truth in stack]


def apply(segmenter, source, output):
    return segment.main(["apply", "--segmenter", str(segmenter), "--input", str(source), "--output", str(output)])


def test_train_then_apply_to_a_stack_segments_every_page(material, tmp_path):
    folder, segmenter, truths = material
    assert apply(segmenter, folder / "stack.tif", tmp_path / "masks.tif") == 1
    masks = read_pages(tmp_path / "masks.tif")
    assert len(masks) == 3
    for mask, truth in zip(masks, truths):
        assert mask.shape == truth.shape
        assert segmentation_scores(mask, truth, 2, ignore_index=0, first_class=1)["miou"] >= 0.8
    assert [path.name for path in tmp_path.iterdir()] == ["masks.tif"]  # no partial pages left behind


def test_a_second_apply_writes_nothing_new(material, tmp_path):
    folder, segmenter, _ = material
    output = tmp_path / "masks.tif"
    apply(segmenter, folder / "stack.tif", output)
    before = output.stat().st_mtime_ns
    assert apply(segmenter, folder / "stack.tif", output) == 0
    assert output.stat().st_mtime_ns == before


def test_a_killed_run_resumes_with_identical_output(material, tmp_path, monkeypatch):
    folder, segmenter, _ = material
    apply(segmenter, folder / "stack.tif", tmp_path / "clean.tif")
    predict, calls = TrainableSegmenter.predict, []

    def killed_on_the_second_page(self, image):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # as a kill mid-stack
        return predict(self, image)

    monkeypatch.setattr(TrainableSegmenter, "predict", killed_on_the_second_page)
    with pytest.raises(KeyboardInterrupt):
        apply(segmenter, folder / "stack.tif", tmp_path / "resumed.tif")
    assert not (tmp_path / "resumed.tif").exists()
    monkeypatch.setattr(TrainableSegmenter, "predict", predict)
    calls.clear()
    assert apply(segmenter, folder / "stack.tif", tmp_path / "resumed.tif") == 1
    np.testing.assert_array_equal(read_pages(tmp_path / "resumed.tif"), read_pages(tmp_path / "clean.tif"))


def test_a_folder_gets_one_mask_per_file_and_unreadable_files_are_skipped(material, tmp_path, caplog):
    folder, segmenter, truths = material
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    for index, page in enumerate(read_pages(folder / "stack.tif")):
        write_image(images / "sub" / f"image_{index}.png", page)
    (images / "broken.png").write_bytes(b"not a png")
    assert apply(segmenter, images, tmp_path / "masks") == 3
    for index, truth in enumerate(truths):
        (mask,) = read_pages(tmp_path / "masks" / "sub" / f"image_{index}.tif")
        assert segmentation_scores(mask, truth, 2, ignore_index=0, first_class=1)["miou"] >= 0.8
    assert "Skipped 1 of 4 images: " in caplog.text and "broken.png" in caplog.text
    assert apply(segmenter, images, tmp_path / "masks") == 0


def test_an_image_with_another_channel_count_is_refused_in_one_line(material, tmp_path, capsys):
    folder, segmenter, _ = material
    (page, *_) = read_pages(folder / "stack.tif")
    write_image(tmp_path / "rgb.tif", np.repeat((page >> 8).astype(np.uint8)[..., None], 3, axis=-1))
    with pytest.raises(SystemExit) as exit_info:
        run_command(segment.main, ["apply", "--segmenter", str(segmenter), "--input", str(tmp_path / "rgb.tif"),
                                   "--output", str(tmp_path / "mask.tif")], prog="alibi-segment")
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "3 channel(s) but this segmenter was trained on images with 1" in error
    assert not (tmp_path / "mask.tif").exists()


def test_a_pickle_given_as_segmenter_is_refused(tmp_path, material, capsys):
    folder, _, _ = material
    planted = tmp_path / "segmenter.zip"
    planted.write_bytes(b"\x80\x04K\x01.")  # a pickle
    with pytest.raises(SystemExit):
        run_command(segment.main, ["apply", "--segmenter", str(planted), "--input", str(folder / "stack.tif"),
                                   "--output", str(tmp_path / "m.tif")], prog="alibi-segment")
    assert "pickles are refused" in capsys.readouterr().err


def test_classical_plus_vit_records_the_model_folder_and_reloads_it(material, tmp_path):
    import json
    import zipfile

    import torch
    from transformers import Dinov2Config, Dinov2Model

    from conftest import TINY_DINOV2

    folder, _, truths = material
    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(**TINY_DINOV2)).save_pretrained(tmp_path / "vit")
    segmenter = tmp_path / "vit_segmenter.zip"
    segment.main(["train", "--images", str(folder / "train.tif"), "--labels", str(folder / "scribbles.png"),
                  "--output", str(segmenter), "--model", str(tmp_path / "vit"), "--features", "classical+vit",
                  "--n_components", "3"])
    with zipfile.ZipFile(segmenter) as archive:
        settings = json.loads(archive.read("settings.json"))
    assert settings["model_name"] == str(tmp_path / "vit") and settings["params"]["features"] == "classical+vit"
    assert len(settings["feature_names"]) == len(TrainableSegmenter().feature_names()) + 3
    apply(segmenter, folder / "stack.tif", tmp_path / "masks.tif")
    for mask, truth in zip(read_pages(tmp_path / "masks.tif"), truths):
        assert segmentation_scores(mask, truth, 2, ignore_index=0, first_class=1)["miou"] >= 0.8


def test_vit_features_use_the_model_folders_own_image_statistics(material, tmp_path):
    import json
    import zipfile

    import torch
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    from alibi_dinov2.features.vit import vit_feature_channels
    from conftest import TINY_DINOV2

    folder, _, _ = material
    statistics = {"image_mean": [0.2, 0.3, 0.4], "image_std": [0.05, 0.1, 0.2]}
    torch.manual_seed(0)
    model = Dinov2Model(Dinov2Config(**TINY_DINOV2)).eval()
    model.save_pretrained(tmp_path / "vit")
    BitImageProcessor(**statistics).save_pretrained(tmp_path / "vit")
    segmenter = tmp_path / "vit_segmenter.zip"
    segment.main(["train", "--images", str(folder / "train.tif"), "--labels", str(folder / "scribbles.png"),
                  "--output", str(segmenter), "--model", str(tmp_path / "vit"), "--features", "classical+vit",
                  "--n_components", "3"])
    with zipfile.ZipFile(segmenter) as archive:
        recorded = json.loads(archive.read("settings.json"))["image_statistics"]
    for name, values in statistics.items():
        np.testing.assert_allclose(recorded[name], values, atol=1e-6)
    (page, *_) = read_pages(folder / "stack.tif")
    loaded = segment.load_segmenter(str(segmenter))
    vit_channels = loaded.extract_features(page)[..., -3:]
    np.testing.assert_allclose(
        vit_channels, vit_feature_channels(model, page, 3, image_processor=statistics), atol=1e-5
    )
    assert not np.allclose(vit_channels, vit_feature_channels(model, page, 3), atol=1e-3)  # ImageNet's differ
