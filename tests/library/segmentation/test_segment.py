"""The batch segmentation command: train from scribbles, apply to stacks and folders, skip and resume."""

import hashlib
import shutil

import numpy as np
import pytest
import skimage.io
import tifffile

from alibi_dinov2.cli import run_command
from alibi_dinov2.errors import InputError
from alibi_dinov2.io.images import read_labels, read_pages, write_image, write_mask
from alibi_dinov2.io.tiff_stacks import StackMetadata, read_stack_metadata
from alibi_dinov2.segmentation import command as segment
from alibi_dinov2.segmentation.pairs import parse_pages, training_pairs
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


# --------------------------------------------------------------------------------------------------
# Stacks as other tools read them, and the segmenter that made each output
# --------------------------------------------------------------------------------------------------
def five_page_stack(material, folder):
    """The material's 3 pages and 2 more, as a 5-page stack with a pixel size (skimage reads 3 or 4 pages as RGB)."""
    source, _, _ = material
    pages = read_pages(source / "stack.tif")
    pages = pages + pages[:2]
    write_image(folder / "five.tif", pages, StackMetadata(resolution=(5.0, 5.0), unit="um"))
    return folder / "five.tif", np.stack(pages)


def test_a_mask_stack_is_one_series_with_the_sources_pixel_size_and_its_segmenter(material, tmp_path):
    _, segmenter, truths = material
    source, pages = five_page_stack(material, tmp_path)
    assert apply(segmenter, source, tmp_path / "masks.tif") == 1
    masks = tifffile.imread(tmp_path / "masks.tif")
    assert masks.shape == pages.shape and masks.dtype == np.uint8
    np.testing.assert_array_equal(skimage.io.imread(tmp_path / "masks.tif"), masks)
    for mask, truth in zip(masks, truths):
        assert segmentation_scores(mask, truth, 2, ignore_index=0, first_class=1)["miou"] >= 0.8
    metadata = read_stack_metadata(tmp_path / "masks.tif")
    assert (metadata.resolution, metadata.unit) == ((5.0, 5.0), "um")
    assert segment.recorded_segmenter(tmp_path / "masks.tif") == hashlib.sha256(segmenter.read_bytes()).hexdigest()


def test_another_segmenter_is_refused_unless_overwrite_and_the_same_one_skips(material, tmp_path, capsys):
    folder, segmenter, _ = material
    output = tmp_path / "masks.tif"
    apply(segmenter, folder / "stack.tif", output)
    other = tmp_path / "other.zip"
    scribbles = read_labels(folder / "scribbles.png")
    write_mask(tmp_path / "fewer.png", np.where(np.arange(scribbles.shape[1]) < 64, scribbles, 0))
    segment.main(["train", "--images", str(folder / "train.tif"), "--labels", str(tmp_path / "fewer.png"),
                  "--output", str(other)])
    before = output.read_bytes()
    with pytest.raises(SystemExit):
        run_command(segment.main, ["apply", "--segmenter", str(other), "--input", str(folder / "stack.tif"),
                                   "--output", str(output)], prog="alibi-segment")
    error = capsys.readouterr().err
    assert "masks.tif exists and was made by another segmenter" in error and "pass --overwrite" in error
    assert output.read_bytes() == before
    assert segment.main(["apply", "--segmenter", str(other), "--input", str(folder / "stack.tif"), "--output",
                         str(output), "--overwrite"]) == 1
    assert segment.recorded_segmenter(output) == hashlib.sha256(other.read_bytes()).hexdigest()
    assert segment.main(["apply", "--segmenter", str(other), "--input", str(folder / "stack.tif"), "--output",
                         str(output), "--overwrite"]) == 0  # the same segmenter still skips
    assert "complete, made by this segmenter (other.zip)" in capsys.readouterr().out


def test_a_resumed_run_says_where_it_resumes(material, tmp_path, monkeypatch, capsys):
    folder, segmenter, _ = material
    predict, calls = TrainableSegmenter.predict, []

    def killed_on_the_third_page(self, image):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return predict(self, image)

    monkeypatch.setattr(TrainableSegmenter, "predict", killed_on_the_third_page)
    with pytest.raises(KeyboardInterrupt):
        apply(segmenter, folder / "stack.tif", tmp_path / "masks.tif")
    monkeypatch.setattr(TrainableSegmenter, "predict", predict)
    capsys.readouterr()
    assert apply(segmenter, folder / "stack.tif", tmp_path / "masks.tif") == 1
    assert "masks.tif: resuming at page 2 of 3" in capsys.readouterr().out


def stack_with_scribbled_pages(material, folder, scribbled=(0, 2)):
    """A 3-page stack of the material's images and a label stack scribbling only `scribbled` pages."""
    pairs = generate_microstructure_dataset(3, size=(128, 128), n_phases=2, seed=5)
    write_image(folder / "train_stack.tif", [as_uint16(image) for image, _ in pairs])
    rounds = simulate_scribble_rounds([truth for _, truth in pairs], n_rounds=3, seed=0)[-1]
    labels = [rounds[index] if index in scribbled else np.zeros_like(rounds[index]) for index in range(3)]
    write_image(folder / "train_labels.tif", [label.astype(np.uint8) for label in labels])
    return folder / "train_stack.tif", folder / "train_labels.tif", labels


def test_training_takes_the_scribbled_pages_of_a_stack(material, tmp_path, caplog, capsys):
    _, _, truths = material
    stack, label_stack, labels = stack_with_scribbled_pages(material, tmp_path)
    with caplog.at_level("WARNING", logger="alibi_dinov2.segmentation.pairs"):
        segment.main(["train", "--images", str(stack), "--labels", str(label_stack), "--output",
                      str(tmp_path / "s.zip")])
    assert "Training on 2 scribbled image(s) or page(s)" in capsys.readouterr().out
    assert "train_stack.tif page 1: no scribble, left out" in caplog.text
    apply(tmp_path / "s.zip", material[0] / "stack.tif", tmp_path / "masks.tif")
    for mask, truth in zip(read_pages(tmp_path / "masks.tif"), truths):
        assert segmentation_scores(mask, truth, 2, ignore_index=0, first_class=1)["miou"] >= 0.8
    # The same pages picked with --pages and given one label file each make the same segmenter.
    for page in (0, 2):
        write_mask(tmp_path / f"page_{page}.png", labels[page])
    segment.main(["train", "--images", str(stack), "--labels", str(tmp_path / "page_0.png"),
                  str(tmp_path / "page_2.png"), "--pages", "0,2", "--output", str(tmp_path / "p.zip")])
    apply(tmp_path / "p.zip", material[0] / "stack.tif", tmp_path / "p.tif")
    np.testing.assert_array_equal(read_pages(tmp_path / "p.tif"), read_pages(tmp_path / "masks.tif"))


def test_training_takes_folders_of_images_and_labels_paired_by_name(material, tmp_path, caplog):
    folder, _, _ = material
    images, labels = tmp_path / "images", tmp_path / "labels"
    (images / "a").mkdir(parents=True)
    (labels / "a").mkdir(parents=True)
    shutil.copy(folder / "train.tif", images / "a" / "grain.tif")
    shutil.copy(folder / "scribbles.png", labels / "a" / "grain.png")
    shutil.copy(folder / "train.tif", images / "unlabelled.tif")
    with caplog.at_level("WARNING", logger="alibi_dinov2.segmentation.pairs"):
        pairs = training_pairs([str(images)], [str(labels)])
    assert [pair.name for pair in pairs] == [str(images / "a" / "grain.tif")]
    assert "1 of 2 images in" in caplog.text and "unlabelled.tif" in caplog.text


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda f, d: ([f / "train.tif"], [d / "small.png"]), "small.png is 64 x 64 px but .*train.tif is 128 x 128"),
        (lambda f, d: ([f / "stack.tif"], [f / "scribbles.png"]), "holds 1 page\\(s\\) for the 3 of .*stack.tif"),
        (lambda f, d: ([f / "stack.tif"], [f / "scribbles.png", f / "scribbles.png"]), "2 label files for the 3"),
        (lambda f, d: ([f / "train.tif"], [d / "empty.png"]), "No scribble in any of the 1 label image"),
        (lambda f, d: ([f / "train.tif", f / "train.tif"], [f / "scribbles.png"]), "one --labels file or folder"),
        (lambda f, d: ([f / "train.tif"], [d / "missing.png"]),
         "label file not found: .*missing.png \\(the labels of .*train.tif\\)"),
        (lambda f, d: ([f / "stack.tif"], [f / "scribbles.png", d / "missing.png", f / "scribbles.png"]),
         "label file not found: .*missing.png \\(the labels of .*stack.tif\\)"),
        (lambda f, d: ([d / "missing.tif"], [f / "scribbles.png"]), "image file not found: .*missing.tif"),
    ],
)
def test_pairs_that_do_not_fit_are_named(material, tmp_path, make, message):
    folder, _, _ = material
    write_mask(tmp_path / "small.png", np.ones((64, 64), np.uint8))
    write_mask(tmp_path / "empty.png", np.zeros((128, 128), np.uint8))
    images, labels = make(folder, tmp_path)
    with pytest.raises(InputError, match=message):
        training_pairs([str(path) for path in images], [str(path) for path in labels])


def test_pages_take_lists_and_ranges(material):
    assert parse_pages("0,3,7") == [0, 3, 7] and parse_pages("2-4,0") == [0, 2, 3, 4] and parse_pages(None) is None
    for bad in ("a", "3-1", "-2"):
        with pytest.raises(InputError, match="--pages takes page indices from 0"):
            parse_pages(bad)
    with pytest.raises(InputError, match="--pages 5: .*stack.tif holds 3 page"):
        training_pairs([str(material[0] / "stack.tif")], [str(material[0] / "stack.tif")], pages="0,5")


def test_apply_in_blocks_writes_the_whole_image_masks(material, tmp_path):
    folder, segmenter, _ = material
    apply(segmenter, folder / "stack.tif", tmp_path / "whole.tif")
    assert segment.main(["apply", "--segmenter", str(segmenter), "--input", str(folder / "stack.tif"), "--output",
                         str(tmp_path / "blocks.tif"), "--block_size", "96", "--num_workers", "2"]) == 1
    np.testing.assert_array_equal(read_pages(tmp_path / "blocks.tif"), read_pages(tmp_path / "whole.tif"))


def test_a_zarr_image_is_read_lazily_and_segmented_into_a_zarr_mask(material, tmp_path, capsys):
    import dask.array as da
    import zarr

    folder, segmenter, _ = material
    page = read_pages(folder / "stack.tif")[0]
    da.from_array(page, chunks=64).to_zarr(str(tmp_path / "image.zarr"))
    arguments = ["apply", "--segmenter", str(segmenter), "--input", str(tmp_path / "image.zarr"), "--output",
                 str(tmp_path / "mask.zarr"), "--block_size", "96"]
    assert segment.main(arguments) == 1
    mask = zarr.open(str(tmp_path / "mask.zarr"), mode="r")
    assert mask.dtype == np.uint8
    assert mask.attrs["segmenter_sha256"] == hashlib.sha256(segmenter.read_bytes()).hexdigest()
    np.testing.assert_array_equal(mask[:], TrainableSegmenter.load(segmenter).predict(page))
    assert segment.main(arguments) == 0  # made by this segmenter: skipped
    assert not list(tmp_path.glob(".*tmp"))
    # An OME-Zarr image (a group with multiscales, singleton t, c, z axes) reads its full-resolution level.
    group = zarr.open_group(str(tmp_path / "ome.zarr"), mode="w")
    group.attrs["multiscales"] = [{"version": "0.4", "datasets": [{"path": "0"}]}]
    da.from_array(page[None, None, None], chunks=64).to_zarr(str(tmp_path / "ome.zarr"), component="0")
    segment.main(["apply", "--segmenter", str(segmenter), "--input", str(tmp_path / "ome.zarr"), "--output",
                  str(tmp_path / "ome_mask.zarr")])
    np.testing.assert_array_equal(zarr.open(str(tmp_path / "ome_mask.zarr"), mode="r")[:], mask[:])
    with pytest.raises(InputError, match="a zarr input gives a zarr output: --output .*wrong.zarr"):
        segment.main(["apply", "--segmenter", str(segmenter), "--input", str(tmp_path / "image.zarr"), "--output",
                      str(tmp_path / "wrong.tif")])


def test_blocks_run_on_a_dask_distributed_scheduler_and_a_bad_address_is_named(material, tmp_path, monkeypatch):
    distributed = pytest.importorskip("distributed")
    folder, segmenter, _ = material
    apply(segmenter, folder / "stack.tif", tmp_path / "whole.tif")
    with distributed.LocalCluster(processes=False, n_workers=1, threads_per_worker=2, protocol="tcp",
                                  host="127.0.0.1", dashboard_address=None) as cluster:  # fmt: skip
        assert cluster.scheduler_address.startswith("tcp://127.0.0.1:")
        assert segment.main(["apply", "--segmenter", str(segmenter), "--input", str(folder / "stack.tif"),
                             "--output", str(tmp_path / "cluster.tif"), "--block_size", "96",
                             "--scheduler", cluster.scheduler_address]) == 1  # fmt: skip
        assert "to_float01" in cluster.scheduler.task_prefixes  # the blocks' graph ran on the cluster
    np.testing.assert_array_equal(read_pages(tmp_path / "cluster.tif"), read_pages(tmp_path / "whole.tif"))
    monkeypatch.setattr("alibi_dinov2.segmentation.blocks.SCHEDULER_TIMEOUT_S", 1)
    with pytest.raises(InputError, match="cannot reach the dask scheduler at tcp://127.0.0.1:9 "):
        segment.main(["apply", "--segmenter", str(segmenter), "--input", str(folder / "stack.tif"), "--output",
                      str(tmp_path / "never.tif"), "--scheduler", "tcp://127.0.0.1:9"])
    assert not list(tmp_path.glob("*never*"))  # refused before any work: not even a folder of finished pages


def test_a_tiled_tiff_in_blocks_is_read_by_tiles_and_gives_the_whole_image_mask(material, tmp_path, monkeypatch):
    import alibi_dinov2.io.chunked_images as chunked

    folder, segmenter, _ = material
    pages = read_pages(folder / "stack.tif")
    tifffile.imwrite(tmp_path / "tiled.tif", np.stack(pages), tile=(32, 32), photometric="minisblack")
    apply(segmenter, folder / "stack.tif", tmp_path / "whole.tif")
    opened = []
    monkeypatch.setattr(chunked.TiffPageChunks, "_open", lambda self, _open=chunked.TiffPageChunks._open: (
        opened.append(self.page), _open(self))[1])  # fmt: skip
    assert segment.main(["apply", "--segmenter", str(segmenter), "--input", str(tmp_path / "tiled.tif"), "--output",
                         str(tmp_path / "blocks.tif"), "--block_size", "96"]) == 1  # fmt: skip
    assert opened == [0, 1, 2]  # every page through the chunked reader, none read whole
    np.testing.assert_array_equal(read_pages(tmp_path / "blocks.tif"), read_pages(tmp_path / "whole.tif"))


def test_an_ome_zarr_mask_keeps_the_pixel_size_and_equals_the_tiff_routes(material, tmp_path):
    import dask.array as da
    import zarr

    from alibi_dinov2.io.chunked_images import read_zarr_image

    _, segmenter, _ = material
    source, pages = five_page_stack(material, tmp_path)
    apply(segmenter, source, tmp_path / "masks.tif")
    tiff_masks = tifffile.imread(tmp_path / "masks.tif")
    arguments = ["apply", "--segmenter", str(segmenter), "--input", str(source), "--output",
                 str(tmp_path / "masks.ome.zarr"), "--block_size", "96"]  # fmt: skip
    assert segment.main(arguments) == 1
    image, metadata = read_zarr_image(tmp_path / "masks.ome.zarr")
    assert isinstance(image, da.Array) and image.shape == (5, 128, 128) and image.chunksize == (1, 96, 96)
    np.testing.assert_array_equal(image.compute(), tiff_masks)
    assert metadata.resolution == (5.0, 5.0) and metadata.unit == "um"
    group = zarr.open_group(str(tmp_path / "masks.ome.zarr"), mode="r")
    assert [axis["name"] for axis in group.attrs["multiscales"][0]["axes"]] == ["z", "y", "x"]
    assert group.attrs["segmenter_sha256"] == hashlib.sha256(segmenter.read_bytes()).hexdigest()
    assert segment.main(arguments) == 0  # made by this segmenter: skipped
    # An OME-Zarr image in, one page of it: its mask as an OME-Zarr image (yx), the pixel size passed on.
    segment.main(["apply", "--segmenter", str(segmenter), "--input", str(tmp_path / "masks.ome.zarr"), "--output",
                  str(tmp_path / "again.ome.zarr")])  # fmt: skip
    again, again_metadata = read_zarr_image(tmp_path / "again.ome.zarr")
    assert again.shape == (5, 128, 128) and again_metadata == metadata
    assert not list(tmp_path.glob(".*tmp"))


def test_in_blocks_a_damaged_tiff_of_a_folder_is_skipped_by_name_or_stops_a_strict_run(material, tmp_path, caplog):
    from alibi_dinov2.io.images import ImageReadError

    folder, segmenter, _ = material
    images = tmp_path / "images"
    images.mkdir()
    for index, page in enumerate(read_pages(folder / "stack.tif")[:2]):
        tifffile.imwrite(images / f"image_{index}.tif", page, tile=(32, 32), compression="zlib")
    data = (images / "image_1.tif").read_bytes()
    (images / "damaged.tif").write_bytes(data[: len(data) - 2000])  # its header is whole, its last tiles cut
    blocks = ["--block_size", "96"]
    assert segment.main(["apply", "--segmenter", str(segmenter), "--input", str(images), "--output",
                         str(tmp_path / "masks"), *blocks]) == 2  # fmt: skip
    assert "Skipped 1 of 3 images: " in caplog.text and "damaged.tif" in caplog.text
    assert sorted(path.name for path in (tmp_path / "masks").iterdir()) == ["image_0.tif", "image_1.tif"]
    with pytest.raises(ImageReadError, match="damaged.tif: page 0 cannot be read"):
        segment.main(["apply", "--segmenter", str(segmenter), "--input", str(images), "--output",
                      str(tmp_path / "strict"), "--strict", *blocks])  # fmt: skip
    assert not (tmp_path / "strict" / "damaged.tif").exists()
