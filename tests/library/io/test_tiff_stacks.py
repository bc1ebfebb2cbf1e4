"""TIFF stacks as other tools read them: one series, ImageJ or BigTIFF, pixel size and info kept; planar and
interleaved colour pages read alike."""

import numpy as np
import pytest
import skimage.io
import tifffile

from alibi_dinov2.io import tiff_stacks
from alibi_dinov2.io.images import count_pages, read_image, read_pages, read_rgb01, write_image, write_mask
from alibi_dinov2.io.tiff_stacks import StackMetadata, read_stack_metadata, write_stack


def twelve_bit_stack(pages=5, seed=0):
    return np.random.default_rng(seed).integers(0, 4096, size=(pages, 40, 56), dtype=np.uint16)


def test_a_stack_is_one_series_that_every_reader_returns_whole(tmp_path):
    stack = twelve_bit_stack()
    metadata = StackMetadata(resolution=(4.0, 4.0), unit="um", info='{"made_by": "test"}')
    write_image(tmp_path / "stack.tif", list(stack), metadata)
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "stack.tif"), stack)
    np.testing.assert_array_equal(skimage.io.imread(tmp_path / "stack.tif"), stack)
    np.testing.assert_array_equal(read_pages(tmp_path / "stack.tif"), stack)
    assert count_pages(tmp_path / "stack.tif") == 5
    with tifffile.TiffFile(tmp_path / "stack.tif") as tif:  # what Fiji reads: an ImageJ hyperstack of 5 slices
        assert tif.is_imagej and tif.imagej_metadata["slices"] == 5 and len(tif.series) == 1
        assert tif.series[0].axes == "ZYX"
    assert read_stack_metadata(tmp_path / "stack.tif") == metadata


def test_above_4_gb_a_stack_is_one_bigtiff_series(tmp_path, monkeypatch):
    monkeypatch.setattr(tiff_stacks, "BIGTIFF_BYTES", 1000)  # the stack below is 22 kB
    stack = twelve_bit_stack()
    metadata = StackMetadata(page_axis="T", resolution=(2.0, 0.5), unit="nm", info="frames")
    write_stack(tmp_path / "big.tif", stack, metadata)
    with tifffile.TiffFile(tmp_path / "big.tif") as tif:
        assert tif.is_bigtiff and len(tif.series) == 1 and tif.series[0].axes == "TYX"
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "big.tif"), stack)
    np.testing.assert_array_equal(skimage.io.imread(tmp_path / "big.tif"), stack)
    assert read_stack_metadata(tmp_path / "big.tif") == metadata


@pytest.mark.parametrize("dtype", [np.uint8, np.float64, np.int32])
def test_one_page_is_an_ordinary_image_with_its_metadata(tmp_path, dtype):
    mask = np.arange(12, dtype=dtype).reshape(3, 4)
    metadata = StackMetadata(resolution=(10.0, 10.0), unit="um", info="one")
    write_image(tmp_path / "one.tif", mask, metadata)
    read = tifffile.imread(tmp_path / "one.tif")
    assert read.shape == (3, 4) and read.dtype == dtype
    assert read_stack_metadata(tmp_path / "one.tif") == metadata


def test_pages_of_different_shapes_are_refused_by_write_stack_and_kept_apart_by_write_image(tmp_path):
    pages = [np.zeros((4, 4), np.uint8), np.zeros((5, 4), np.uint8)]
    with pytest.raises(ValueError, match=r"Page 1 is uint8 \(5, 4\) but page 0 is uint8 \(4, 4\)"):
        write_stack(tmp_path / "bad.tif", pages)
    write_image(tmp_path / "apart.tif", pages)
    assert [page.shape for page in read_pages(tmp_path / "apart.tif")] == [(4, 4), (5, 4)]


def test_a_mask_stack_keeps_the_sources_pixel_size(tmp_path):
    write_image(tmp_path / "source.tif", list(twelve_bit_stack()), StackMetadata(resolution=(3.0, 3.0), unit="um"))
    source = read_stack_metadata(tmp_path / "source.tif")
    write_mask(tmp_path / "mask.tif", np.ones((40, 56), np.uint8), source.with_info("x"))
    assert read_stack_metadata(tmp_path / "mask.tif") == StackMetadata(resolution=(3.0, 3.0), unit="um", info="x")


def test_planar_and_interleaved_colour_pages_read_alike_through_every_route(tmp_path):
    rgb = np.random.default_rng(1).integers(0, 4096, size=(48, 64, 3), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "planar.tif", np.moveaxis(rgb, -1, 0), photometric="rgb", planarconfig="separate")
    tifffile.imwrite(tmp_path / "contiguous.tif", rgb, photometric="rgb")
    with tifffile.TiffFile(tmp_path / "planar.tif") as tif:
        assert tif.pages[0].asarray().shape == (3, 48, 64)  # as stored
    for path in (tmp_path / "planar.tif", tmp_path / "contiguous.tif"):
        (page,) = read_pages(path)
        np.testing.assert_array_equal(page, rgb)
        np.testing.assert_array_equal(read_image(path), rgb)
    np.testing.assert_array_equal(read_rgb01(tmp_path / "planar.tif"), read_rgb01(tmp_path / "contiguous.tif"))
