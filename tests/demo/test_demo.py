"""The browser demo's analysis: image preparation, per-model maps, positional probe, the page's wiring."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from skimage import data
from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

from alibi_dinov2.io.images import ImageReadError, ImageTooSmallError, to_rgb01
from configuration_alibi_dinov2 import AlibiDinov2Config
from demo.app import (
    DEMO_PROBE,
    analyse_features,
    analyse_image,
    build_demo,
    input_caption,
    launch_message,
    parse_args,
    patches_to_pixels,
    position_r2,
    prepare_image,
    render_comparison,
    user_error,
)
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
    assert r2["x"] > 0.8 and r2["y"] < 0.2  # one sampling of 20 patches: x is 0.75 to 0.97 over seeds 0-9
    assert np.median([position_r2(column_only, seed=seed)["x"] for seed in range(10)]) > 0.9
    # The demo's number is the project's probe protocol, scored on the held-out patches of one sampling.
    assert r2["x"] == DEMO_PROBE.estimator("lr+ud").fit(column_only).score_per_ramp(column_only)[0]
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
    # Short captions (the gallery shows one line each): 150 px shrunk, 140 px of whole patches kept.
    assert [caption for _, caption in gallery][:3] == [
        "input 140x140 of 150x150 px",
        "ALiBi: PCA",
        "ALiBi: k-means, k = 3",
    ]
    assert max(len(caption) for _, caption in gallery) <= 28
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


def test_input_caption_names_the_crop_only_when_there_is_one():
    assert input_caption((300, 451), (294, 448)) == "input 448x294 of 451x300 px"
    assert input_caption((294, 448), (294, 448)) == "input 448x294 px"


def test_the_console_names_the_share_flag_of_this_command():
    assert launch_message("http://127.0.0.1:7860/", None, False) == (
        "Running on http://127.0.0.1:7860/ (add --share for a public link)")
    assert "share=True" not in launch_message("http://127.0.0.1:7860/", None, True)
    assert "https://x.gradio.live" in launch_message("http://127.0.0.1:7860/", "https://x.gradio.live", True)


def test_a_user_mistake_is_one_line_in_the_server_log(caplog):
    gradio = pytest.importorskip("gradio")
    with caplog.at_level("WARNING", logger="demo.app"):
        error = user_error(gradio, "No scribbles: draw on the image with the brush")
    assert isinstance(error, gradio.Error) and not error.print_exception  # Gradio prints no traceback
    assert [record.getMessage() for record in caplog.records] == [
        "refused: No scribbles: draw on the image with the brush"]


def test_the_editor_spans_the_page_with_a_thin_brush_in_the_class_colours(tiny_models):
    gradio = pytest.importorskip("gradio")
    from demo import segmentation_view as view

    page = build_demo(tiny_models)
    (editor,) = [block for block in page.blocks.values() if isinstance(block, gradio.ImageEditor)]
    assert editor.brush.default_size == view.BRUSH_SIZE <= 8
    assert editor.brush.colors == view.hex_colours() and editor.brush.default_color == view.hex_colours()[0]
    ancestors, parent = [], editor.parent
    while parent is not None:
        ancestors.append(parent)
        parent = parent.parent
    assert not any(isinstance(block, gradio.Row) for block in ancestors)  # not squeezed into a column beside others
    assert "random ramp" not in "".join(
        block.value for block in page.blocks.values() if isinstance(block, gradio.Markdown) and block.value)


def test_build_demo_without_gradio_says_how_to_install_it(tiny_models, monkeypatch):
    monkeypatch.setitem(sys.modules, "gradio", None)
    with pytest.raises(ImportError, match=r"\.\[demo\]"):
        build_demo(tiny_models)


@pytest.mark.slow
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


# ---------------------------------------------------------------- the segmentation tab, as a script calls the Space
@pytest.fixture(scope="module")
def download_root(tmp_path_factory):
    return tmp_path_factory.mktemp("downloads")


@pytest.fixture(scope="module")
def served_page(download_root):
    """The page on two tiny models, served on a free localhost port; a gradio_client Client of it."""
    import socket

    from gradio_client import Client

    from conftest import TINY_DINOV2

    torch.manual_seed(0)
    alibi = AlibiDinov2Model(AlibiDinov2Config(**TINY_DINOV2)).eval()
    stock = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(**TINY_DINOV2, num_register_tokens=4)).eval()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    page = build_demo({"ALiBi": (alibi, None), "DINOv2": (stock, None)}, max_side=150, download_root=download_root)
    page.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield Client(f"http://127.0.0.1:{port}/", verbose=False)
    finally:
        page.close()


@pytest.fixture(scope="module")
def scribbled(tmp_path_factory):
    """A two-phase micrograph (PNG) with its truth and a scribble layer (RGBA PNG) in the class colours."""
    from alibi_dinov2.io.images import write_image
    from alibi_dinov2.synthetic.microstructures import generate_microstructure_dataset
    from demo.segmentation_view import scribble_layer
    from evaluation.scribble_benchmark import simulate_scribble_rounds

    folder = tmp_path_factory.mktemp("scribbled")
    ((image, truth),) = generate_microstructure_dataset(1, size=(120, 150), n_phases=2, seed=3)
    scribbles = simulate_scribble_rounds([truth], n_rounds=3, seed=0)[-1][0]
    write_image(folder / "micrograph.png", np.round(image * 255).astype(np.uint8))
    write_image(folder / "scribbles.png", scribble_layer(scribbles))
    return folder, truth, scribbles


def editor_payload(background, *layers):
    from gradio_client import handle_file

    return {"background": background and handle_file(str(background)),
            "layers": [handle_file(str(layer)) for layer in layers], "composite": None}


def test_a_script_gets_a_mask_of_the_image_whose_scribbles_keep_their_classes(served_page, scribbled, download_root):
    from alibi_dinov2.io.images import read_labels
    from evaluation.metrics import segmentation_scores

    folder, truth, scribbles = scribbled
    gallery, table, files = served_page.predict(
        editor_payload(folder / "micrograph.png", folder / "scribbles.png"), None, ["ALiBi", "DINOv2"],
        "classical+vit", "PNG", api_name="/segment")
    assert [item["caption"] for item in gallery] == ["ALiBi: classical + ViT features",
                                                     "DINOv2: classical + ViT features"]
    assert table["headers"] == ["model", "class 1 (blue) area", "class 2 (orange) area"]
    assert [row[0] for row in table["data"]] == ["ALiBi", "DINOv2"]
    names = [Path(path).name for path in files]
    assert names == ["ALiBi-segmenter.zip", "ALiBi-mask.png", "DINOv2-segmenter.zip", "DINOv2-mask.png"]
    newest = max(download_root.glob("run-*"))  # the files the page served copies of
    assert sorted(path.name for path in newest.iterdir()) == sorted(names)
    for path in files[1::2]:
        mask = read_labels(path)
        assert mask.shape == truth.shape
        np.testing.assert_array_equal(mask[scribbles > 0], scribbles[scribbles > 0])
        assert segmentation_scores(mask, truth, 2, ignore_index=0, first_class=1)["miou"] >= 0.8


def test_a_script_sends_a_16_bit_file_segmented_in_full_precision(served_page, scribbled, tmp_path):
    from gradio_client import handle_file

    from alibi_dinov2.io.images import read_labels, write_image
    from evaluation.metrics import segmentation_scores

    folder, truth, scribbles = scribbled
    write_image(tmp_path / "phases.tif", np.where(truth == 1, 30000, 30040).astype(np.uint16))  # one 8-bit level
    _, _, files = served_page.predict(
        editor_payload(None, folder / "scribbles.png"),
        handle_file(str(tmp_path / "phases.tif")),
        [],
        "classical",
        "TIFF",
        api_name="/segment",
    )
    assert [Path(path).name for path in files] == ["classical-features-segmenter.zip", "classical-features-mask.tif"]
    mask = read_labels(files[1])
    assert mask.shape == truth.shape
    assert segmentation_scores(mask, truth, 2, ignore_index=0, first_class=1)["miou"] >= 0.95


def test_the_page_says_what_is_missing(served_page, scribbled, tmp_path):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    from alibi_dinov2.io.images import write_image
    from demo.segmentation_view import scribble_layer

    folder, truth, _ = scribbled
    write_image(tmp_path / "blank.png", scribble_layer(np.zeros_like(truth)))
    with pytest.raises(AppError, match="No scribbles: draw on the image"):
        served_page.predict(editor_payload(folder / "micrograph.png", tmp_path / "blank.png"), None, ["ALiBi"],
                            "classical", "PNG", api_name="/segment")
    with pytest.raises(AppError, match="Upload a micrograph"):
        served_page.predict(editor_payload(None), None, ["ALiBi"], "classical", "PNG", api_name="/segment")
    with pytest.raises(AppError, match="The editor shows another picture than the chosen file micrograph.png"):
        served_page.predict(
            editor_payload(tmp_path / "blank.png", folder / "scribbles.png"),
            handle_file(str(folder / "micrograph.png")),
            ["ALiBi"],
            "classical",
            "PNG",
            api_name="/segment",
        )
    (tmp_path / "broken.tif").write_bytes(b"II*\x00not a tiff")
    with pytest.raises(AppError, match="Could not read .*broken.tif"):
        served_page.predict(editor_payload(None, folder / "scribbles.png"), handle_file(str(tmp_path / "broken.tif")),
                            ["ALiBi"], "classical", "PNG", api_name="/segment")


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
