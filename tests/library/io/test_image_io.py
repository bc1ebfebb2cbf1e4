"""Reading and writing microscopy images, label images and masks."""

import numpy as np
import pytest

from alibi_dinov2.io.images import (
    ImageReadError,
    read_image,
    read_labels,
    read_pages,
    to_float01,
    to_grayscale,
    write_image,
    write_mask,
)


def test_16bit_tiff_round_trip_keeps_dtype_and_values(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 65536, size=(33, 47), dtype=np.uint16)
    path = tmp_path / "sem.tif"
    write_image(path, image)
    loaded = read_image(path)
    assert loaded.dtype == np.uint16
    np.testing.assert_array_equal(loaded, image)


def test_multipage_tiff_gives_pages_or_the_chosen_page(tmp_path):
    pages = [np.full((10, 12), value, dtype=np.uint16) for value in (100, 2000, 40000)]
    path = tmp_path / "stack.tiff"
    write_image(path, pages)
    loaded = read_pages(path)
    assert len(loaded) == 3
    for original, page in zip(pages, loaded):
        np.testing.assert_array_equal(page, original)
    np.testing.assert_array_equal(read_image(path, page=1), pages[1])
    np.testing.assert_array_equal(read_image(path, page=-1), pages[2])
    with pytest.raises(ValueError, match="3 pages"):
        read_image(path)
    with pytest.raises(IndexError, match="3 page"):
        read_image(path, page=3)


def test_png_8bit_rgb_and_16bit_gray_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, size=(9, 11, 3), dtype=np.uint8)
    gray16 = rng.integers(0, 65536, size=(9, 11), dtype=np.uint16)
    write_image(tmp_path / "rgb.png", rgb)
    write_image(tmp_path / "gray16.png", gray16)
    np.testing.assert_array_equal(read_image(tmp_path / "rgb.png"), rgb)
    loaded = read_image(tmp_path / "gray16.png")
    assert loaded.dtype == np.uint16
    np.testing.assert_array_equal(loaded, gray16)


def test_jpeg_reads_as_uint8(tmp_path):
    image = np.tile(np.arange(0, 256, 8, dtype=np.uint8), (16, 1))
    write_image(tmp_path / "photo.jpg", image)
    loaded = read_image(tmp_path / "photo.jpg")
    assert loaded.dtype == np.uint8 and loaded.shape == image.shape
    assert np.abs(loaded.astype(int) - image).max() < 12  # lossy, but close


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_mask_dtype_follows_value_range_and_round_trips(tmp_path, suffix):
    small = np.array([[0, 1, 2], [3, 255, 1]])
    large = np.array([[0, 1, 2], [3, 256, 1000]])
    write_mask(tmp_path / f"small{suffix}", small)
    write_mask(tmp_path / f"large{suffix}", large)
    assert read_image(tmp_path / f"small{suffix}").dtype == np.uint8
    assert read_image(tmp_path / f"large{suffix}").dtype == np.uint16
    for name, mask in (("small", small), ("large", large)):
        labels = read_labels(tmp_path / f"{name}{suffix}")
        assert labels.dtype == np.int32
        np.testing.assert_array_equal(labels, mask)


def test_mask_writer_refuses_lossy_or_invalid_masks(tmp_path):
    with pytest.raises(ValueError, match="lossless"):
        write_mask(tmp_path / "mask.jpg", np.zeros((4, 4), dtype=np.uint8))
    with pytest.raises(ValueError, match="0, 65535"):
        write_mask(tmp_path / "mask.png", np.array([[-1, 0]]))
    with pytest.raises(ValueError, match="integers"):
        write_mask(tmp_path / "mask.png", np.array([[0.5, 1.0]]))
    with pytest.raises(ValueError, match="2-D"):
        write_mask(tmp_path / "mask.png", np.zeros((2, 2, 2), dtype=np.uint8))


def test_colour_coded_label_image_maps_black_to_unlabelled(tmp_path):
    mask = np.zeros((4, 4, 3), dtype=np.uint8)
    mask[0, :] = (255, 0, 0)
    mask[1, :] = (0, 255, 0)
    write_image(tmp_path / "colours.png", mask)
    labels = read_labels(tmp_path / "colours.png")
    # Sorted RGB order: (0, 255, 0) -> 1, (255, 0, 0) -> 2; black -> 0.
    np.testing.assert_array_equal(labels[:, 0], [2, 1, 0, 0])


@pytest.mark.parametrize("name", ["broken.png", "broken.tif", "broken.jpg"])
def test_corrupt_file_raises_error_naming_the_file(tmp_path, name):
    path = tmp_path / name
    headers = {".png": b"\x89PNG\r\n\x1a\n", ".tif": b"II*\x00", ".jpg": b"\xff\xd8\xff\xe0"}
    path.write_bytes(headers[path.suffix] + b" truncated garbage")
    with pytest.raises(ImageReadError, match=name):
        read_image(path)


def test_missing_file_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.png"):
        read_image(tmp_path / "absent.png")


def test_to_float01_scales_by_dtype_or_minmax():
    np.testing.assert_allclose(to_float01(np.array([0, 51, 255], dtype=np.uint8)), [0, 0.2, 1])
    np.testing.assert_allclose(to_float01(np.array([0, 65535], dtype=np.uint16)), [0, 1])
    already = np.array([0.1, 0.7], dtype=np.float64)
    np.testing.assert_allclose(to_float01(already), already)
    np.testing.assert_allclose(to_float01(np.array([-2.0, 0.0, 2.0])), [0, 0.5, 1])
    np.testing.assert_allclose(to_float01(np.array([100, 4095], dtype=np.uint16), method="minmax"), [0, 1])
    assert np.all(to_float01(np.full(5, 7.0)) == 0)
    assert to_float01(np.zeros(3, dtype=np.uint8)).dtype == np.float32
    with pytest.raises(ValueError, match="NaN"):
        to_float01(np.array([np.nan, 1.0]))


def test_to_grayscale_uses_luma_and_rejects_odd_channel_counts():
    rgb = np.zeros((2, 2, 3), dtype=np.float32)
    rgb[..., 1] = 1.0
    np.testing.assert_allclose(to_grayscale(rgb), 0.7154, atol=1e-6)
    rgba = np.concatenate([rgb, np.zeros((2, 2, 1), np.float32)], axis=-1)
    np.testing.assert_allclose(to_grayscale(rgba), 0.7154, atol=1e-6)  # alpha ignored
    with pytest.raises(ValueError, match="2"):
        to_grayscale(np.zeros((2, 2, 2)))


def test_one_page_of_a_stack_decodes_that_page_only(tmp_path, monkeypatch):
    import tifffile

    from alibi_dinov2.io.images import load_image, write_image

    pages = [np.full((8, 9), k, dtype=np.uint16) for k in range(5)]
    write_image(tmp_path / "stack.tif", pages)
    decoded = []
    original = tifffile.TiffPage.asarray
    monkeypatch.setattr(
        tifffile.TiffPage, "asarray", lambda page, *a, **k: decoded.append(page.index) or original(page, *a, **k)
    )
    np.testing.assert_array_equal(read_image(tmp_path / "stack.tif", page=3), pages[3])
    np.testing.assert_array_equal(load_image(tmp_path / "stack.tif"), pages[0])
    np.testing.assert_array_equal(load_image((tmp_path / "stack.tif").read_bytes(), page=-1), pages[4])
    assert decoded == [3, 0, 4]
    with pytest.raises(IndexError, match="holds 5 page"):
        load_image(tmp_path / "stack.tif", page=5)
    with pytest.raises(ValueError, match="holds 5 pages"):
        read_image(tmp_path / "stack.tif")


def test_a_missing_label_file_is_named_as_a_label_file(tmp_path):
    from alibi_dinov2.io.images import read_labels

    with pytest.raises(FileNotFoundError, match="^Label file not found: .*labels.png$"):
        read_labels(tmp_path / "labels.png")
