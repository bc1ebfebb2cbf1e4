"""The browser demo's analysis: image preparation, per-model maps, positional probe, the page's wiring."""

import sys

import numpy as np
import pytest
import torch
from skimage import data
from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

from configuration_alibi_dinov2 import AlibiDinov2Config
from demo.app import (
    analyse_features,
    analyse_image,
    build_demo,
    parse_args,
    patches_to_pixels,
    prepare_image,
    render_comparison,
)
from evaluation.image_io import ImageReadError, ImageTooSmallError, to_rgb01
from modeling_alibi_dinov2 import AlibiDinov2Model


@pytest.fixture
def tiny_models(tiny_kwargs):
    torch.manual_seed(0)
    alibi = AlibiDinov2Model(AlibiDinov2Config(**tiny_kwargs)).eval()
    stock = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(**tiny_kwargs, num_register_tokens=4)).eval()
    return {"ALiBi": (alibi, None), "DINOv2": (stock, None)}


def test_prepare_image_shrinks_the_longer_side_and_scales_16_bit_values():
    image = np.linspace(0, 65535, 1000 * 600).reshape(1000, 600).astype(np.uint16)
    prepared = prepare_image(image, max_side=300)
    assert prepared.shape == (300, 180, 3) and prepared.dtype == np.float32
    assert 0.0 <= prepared.min() < 0.01 and 0.99 < prepared.max() <= 1.0
    small = data.gravel()[:100, :120]
    np.testing.assert_array_equal(prepare_image(small, max_side=300), to_rgb01(small))


def test_prepare_image_names_what_is_wrong():
    with pytest.raises(ImageReadError, match="unsupported image layout"):
        prepare_image(np.zeros((32, 32, 5), np.uint8))
    with pytest.raises(ValueError, match="max_side"):
        prepare_image(np.zeros((32, 32), np.uint8), max_side=0)


def test_patches_to_pixels_makes_constant_blocks_that_sample_back_to_the_map():
    patch_map = np.random.default_rng(0).random((3, 4, 3))
    pixels = patches_to_pixels(patch_map, 14)
    assert pixels.shape == (42, 56, 3)
    np.testing.assert_array_equal(pixels[::14, ::14], patch_map)
    np.testing.assert_array_equal(pixels[13::14, 13::14], patch_map)


def test_probe_reports_x_and_y_separately():
    rng = np.random.default_rng(0)
    height, width = 24, 30
    columns = np.broadcast_to(np.arange(width, dtype=float), (height, width))
    noise = rng.normal(size=(height, width, 16))
    column_only = np.concatenate([columns[..., None], noise], axis=-1)
    r2 = analyse_features(column_only, n_clusters=2).position_r2
    assert r2["x"] > 0.9 and r2["y"] < 0.2
    assert max(analyse_features(noise, n_clusters=2).position_r2.values()) < 0.2
    assert all(np.isnan(value) for value in analyse_features(noise[:6, :6], n_clusters=2).position_r2.values())


def test_kmeans_finds_two_materials():
    rng = np.random.default_rng(1)
    features = rng.normal(scale=0.1, size=(10, 12, 8))
    features[:, 6:, 0] += 3.0  # right half is another material
    clusters = analyse_features(features, n_clusters=2).clusters
    assert clusters.shape == (10, 12)
    assert len(np.unique(clusters[:, :6])) == 1 and len(np.unique(clusters[:, 6:])) == 1
    assert clusters[0, 0] != clusters[0, -1]
    with pytest.raises(ValueError, match="n_clusters"):
        analyse_features(features, n_clusters=1)


def test_maps_of_the_alibi_model_move_with_the_content(tiny_models):
    """With wrap-around ALiBi and no position embedding, rolling the image by whole patches rolls the PCA map."""
    model, _ = tiny_models["ALiBi"]
    image = data.gravel()[:84, :112]
    shift = (2, 3)  # patches
    rolled = np.roll(image, (14 * shift[0], 14 * shift[1]), axis=(0, 1))
    original, moved = analyse_image(model, image), analyse_image(model, rolled)
    np.testing.assert_allclose(moved.pca_rgb, np.roll(original.pca_rgb, shift, axis=(0, 1)), atol=1e-4)


def test_render_comparison_gives_aligned_pictures_and_one_row_per_model(tiny_models):
    image = data.gravel()  # 512 x 512, shrunk to 150 px: a 10 x 10 grid cropped to 140 px
    gallery, table = render_comparison(tiny_models, image, n_clusters=3, max_side=150)
    assert len(gallery) == 1 + 2 * len(tiny_models)
    for picture, caption in gallery:
        assert picture.dtype == np.uint8 and picture.shape == (140, 140, 3), caption
    assert [row[:2] for row in table] == [["ALiBi", "10 x 10"], ["DINOv2", "10 x 10"]]
    assert [caption for _, caption in gallery][1:3] == [
        "ALiBi: PCA colours (gradients across the frame = position)",
        "ALiBi: k-means, k = 3 (bands or rings = position)",
    ]
    assert all(row[4].startswith("its features ") for row in table)


def test_render_comparison_refuses_an_image_smaller_than_a_patch(tiny_models):
    with pytest.raises(ImageTooSmallError, match="10 x 40 px is smaller than one 14 x 14 patch"):
        render_comparison(tiny_models, np.zeros((10, 40), np.uint8))


def test_command_line_errors():
    with pytest.raises(SystemExit):
        parse_args(["--models", "a", "b", "--names", "only-one"])
    with pytest.raises(SystemExit):
        parse_args(["--models", "a", "--max-side", "0"])
    assert parse_args(["--models", "a"]).max_side == 896


def test_build_demo_without_gradio_says_how_to_install_it(tiny_models, monkeypatch):
    monkeypatch.setitem(sys.modules, "gradio", None)
    with pytest.raises(ImportError, match=r"\.\[demo\]"):
        build_demo(tiny_models)


def test_the_page_runs_the_comparison_and_reports_bad_input(tiny_models, tmp_path):
    gradio = pytest.importorskip("gradio")
    page = build_demo(tiny_models, max_side=150)
    (compare,) = [function.fn for function in page.fns.values() if function.fn.__name__ == "run"]
    gallery, table = compare(data.gravel(), None, 2)
    assert len(gallery) == 5 and len(table) == 2
    corrupt = tmp_path / "broken.tif"
    corrupt.write_bytes(b"II*\x00not a tiff")
    with pytest.raises(gradio.Error, match="broken.tif"):
        compare(None, str(corrupt), 2)
    with pytest.raises(gradio.Error, match="Drop an image"):
        compare(None, None, 2)


def test_dinov3_models_get_their_rows_and_alibi_dinov3_maps_move_with_the_content():
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    from conftest import TINY_DINOV3, tiny_alibi_model

    torch.manual_seed(0)
    alibi = tiny_alibi_model("alibi_dinov3")
    models = {"ALiBi-DINOv3": (alibi, None),
              "DINOv3": (DINOv3ViTModel(DINOv3ViTConfig(**TINY_DINOV3, num_register_tokens=4)).eval(), None)}
    gallery, table = render_comparison(models, data.gravel(), n_clusters=3, max_side=150)  # 9 x 9 patches of 16 px
    assert [row[:2] for row in table] == [["ALiBi-DINOv3", "9 x 9"], ["DINOv3", "9 x 9"]]
    assert all(picture.shape == (144, 144, 3) for picture, _ in gallery)
    image = data.gravel()[:96, :128]
    rolled = np.roll(image, (16 * 2, 16 * 3), axis=(0, 1))
    original, moved = analyse_image(alibi, image), analyse_image(alibi, rolled)
    np.testing.assert_allclose(moved.pca_rgb, np.roll(original.pca_rgb, (2, 3), axis=(0, 1)), atol=1e-4)
