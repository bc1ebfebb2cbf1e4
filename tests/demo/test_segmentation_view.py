"""The demo's segmentation view: scribble layers to labels, one segmenter per model on cached features, overlays,
area fractions and the files to download."""

import json
import re
import zipfile

import numpy as np
import pytest
import torch
from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

from alibi_dinov2.features.cache import FeatureCache
from alibi_dinov2.features.visualisation import CLASS_COLOURS
from alibi_dinov2.io.images import read_labels
from alibi_dinov2.segmentation import extractors
from alibi_dinov2.segmentation.trainable import TrainableSegmenter
from alibi_dinov2.synthetic.microstructures import generate_microstructure_dataset
from configuration_alibi_dinov2 import AlibiDinov2Config
from demo import segmentation_view as view
from evaluation.metrics import segmentation_scores
from evaluation.scribble_benchmark import simulate_scribble_rounds
from modeling_alibi_dinov2 import AlibiDinov2Model


UNUSUAL_STATISTICS = {"image_mean": [0.2, 0.3, 0.4], "image_std": [0.05, 0.1, 0.2]}


@pytest.fixture(scope="module")
def models():
    from conftest import TINY_DINOV2

    torch.manual_seed(0)
    alibi = AlibiDinov2Model(AlibiDinov2Config(**TINY_DINOV2)).eval()
    stock = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(**TINY_DINOV2, num_register_tokens=4)).eval()
    return {"ALiBi": (alibi, UNUSUAL_STATISTICS), "DINOv2": (stock, None)}


@pytest.fixture(scope="module")
def material():
    """A 16-bit two-phase micrograph, its truth and two rounds of scribbles (the second adds to the first)."""
    ((image, truth),) = generate_microstructure_dataset(1, size=(112, 140), n_phases=2, seed=3)
    first, second = simulate_scribble_rounds([truth], n_rounds=2, seed=0)
    return np.round(image * 65535).astype(np.uint16), truth, first[0], second[0]


def mean_iou(mask, truth):
    return segmentation_scores(mask, truth, 2, ignore_index=0, first_class=1)["miou"]


def test_a_layer_pixel_takes_the_nearest_class_colour_when_half_opaque():
    blue, orange, purple, pink = (CLASS_COLOURS[index][1] for index in (0, 1, 4, 6))
    layer = np.zeros((1, 7, 4), np.uint8)
    layer[0] = [
        (*blue, 255),                    # the brush's own colour
        (orange[0] - 20, orange[1] + 15, orange[2], 200),  # an antialiased edge pixel, a little off
        (*blue, 100),                    # the faint rim: unlabelled
        (255, 255, 255, 255),            # a foreign colour: unlabelled
        (*purple, 128),                  # exactly half opaque
        (*pink, 255),
        (0, 0, 0, 0),                    # transparent
    ]
    np.testing.assert_array_equal(view.layer_classes(layer), [[1, 2, 0, 0, 5, 7, 0]])
    with pytest.raises(ValueError, match="RGBA"):
        view.layer_classes(layer[..., :3])


def test_the_palette_and_the_legend_name_eight_classes():
    assert len(view.hex_colours()) == 8 and view.hex_colours()[0] == "#1f77b4"
    legend = view.legend_html()
    # Numbered swatches in the brush's colours, class 1 to 8 in the palette's order.
    swatches = re.findall(r"background:(#[0-9a-f]{6});[^>]*>(\d)</span>class (\d) \((\w+)\)", legend)
    assert [code for code, *_ in swatches] == view.hex_colours()
    assert [(int(a), int(b)) for _, a, b, _ in swatches] == [(k, k) for k in range(1, 9)]
    assert swatches[0][3] == "blue" and swatches[-1][3] == "cyan"
    labels = np.arange(9).reshape(3, 3)
    np.testing.assert_array_equal(view.layer_classes(view.scribble_layer(labels)), labels)


def test_scribbles_on_the_shrunk_picture_are_scaled_to_the_image():
    image_shape = (1300, 2600)  # shown as 512 x 1024 in the editor
    assert view.editor_picture(np.zeros(image_shape, np.uint16)).shape == (512, 1024, 3)
    drawn = np.zeros((512, 1024), np.int32)
    drawn[100:110, 200:220] = 3
    later = np.zeros((512, 1024), np.int32)
    later[105:110, 200:205] = 1  # drawn over the first layer
    labels = view.scribble_labels([view.scribble_layer(drawn), view.scribble_layer(later)], image_shape)
    assert labels.shape == image_shape and labels.dtype == np.int32
    rows, columns = np.nonzero(labels)
    assert (rows.min(), rows.max(), columns.min(), columns.max()) == (254, 278, 508, 558)
    assert labels[270, 510] == 1 and labels[260, 550] == 3
    same_size = view.scribble_labels([view.scribble_layer(np.pad(drawn, ((0, 788), (0, 1576))))], image_shape)
    assert same_size[105, 205] == 3 and same_size.shape == image_shape
    with pytest.raises(ValueError, match="drawn on a 1024 x 500 px picture but the image is 2600 x 1300 px"):
        view.scribble_labels([view.scribble_layer(drawn[:500])], image_shape)


def test_too_few_scribbles_and_small_images_say_what_to_do():
    labels = np.zeros((40, 40), np.int32)
    with pytest.raises(ValueError, match="No scribbles: draw on the image"):
        view.check_scribbles(labels)
    labels[3, 3] = 2
    with pytest.raises(ValueError, match=r"Only class 2 \(orange\) is scribbled"):
        view.check_scribbles(labels)
    labels[5, 5] = 4
    assert view.check_scribbles(labels) == [2, 4]
    with pytest.raises(ValueError, match="10 x 40 px is too small"):
        view.check_image(np.zeros((40, 10), np.uint8))


def test_the_editor_background_becomes_the_image_it_shows():
    gray = np.random.default_rng(0).integers(0, 256, (20, 30), dtype=np.uint8)
    rgba = np.dstack([gray, gray, gray, np.full_like(gray, 255)])
    np.testing.assert_array_equal(view.image_of_background(rgba), gray)
    colour = rgba.copy()
    colour[..., 0] = 7
    assert view.image_of_background(colour).shape == (20, 30, 3)
    transparent = rgba.copy()
    transparent[0, 0, 3] = 0
    assert view.image_of_background(transparent).shape == (20, 30, 4)
    chosen = gray.astype(np.uint16) * 257  # a 16-bit file whose 8-bit picture the editor shows
    assert view.image_to_segment(rgba, chosen).dtype == np.uint16
    np.testing.assert_array_equal(view.image_to_segment(None, chosen), chosen)
    np.testing.assert_array_equal(view.image_to_segment(rgba), gray)
    with pytest.raises(ValueError, match="another picture than the chosen file a.tif: clear the file box"):
        view.image_to_segment(colour, chosen, "a.tif")
    with pytest.raises(ValueError, match="Upload a micrograph"):
        view.image_to_segment(None)


def test_features_are_computed_once_while_scribbles_are_added(material, models, monkeypatch):
    image, truth, first, second = material
    calls = []

    def counted(function):
        def wrapper(*args, **kwargs):
            calls.append(function.__name__)
            return function(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(extractors, "classical_features", counted(extractors.classical_features))
    monkeypatch.setattr(extractors, "vit_feature_channels", counted(extractors.vit_feature_channels))
    cache, stages = FeatureCache(), []
    results = view.segment_image(image, first, models, "classical+vit", cache, lambda done, text: stages.append(text))
    assert [result.name for result in results] == ["ALiBi", "DINOv2"]
    assert sorted(calls) == ["classical_features", "vit_feature_channels", "vit_feature_channels"]  # classical shared
    assert stages == ["ALiBi: computing features (once)", "DINOv2: computing features (once)"]
    calls.clear(), stages.clear()
    more = view.segment_image(image, second, models, "classical+vit", cache, lambda done, text: stages.append(text))
    assert calls == [] and stages == ["ALiBi: training on the scribbles", "DINOv2: training on the scribbles"]
    for result in more:
        assert result.mask.shape == image.shape and mean_iou(result.mask, truth) >= 0.8
        np.testing.assert_array_equal(result.mask[second > 0], second[second > 0])
    uncached = view.segment_image(image, second, models, "classical+vit")
    np.testing.assert_array_equal(uncached[1].mask, more[1].mask)


def test_classical_features_give_one_result_whatever_the_models(material, models):
    image, truth, _, scribbles = material
    (result,) = view.segment_image(image, scribbles, models, "classical")
    assert result.name == view.CLASSICAL_ONLY and result.segmenter.model is None
    assert mean_iou(result.mask, truth) >= 0.8
    # Its caption says what it is once ("classical features: classical features" said it twice).
    assert view.result_caption(result) == "classical features (no model)"
    with pytest.raises(ValueError, match="Pick at least one model"):
        view.segment_image(image, scribbles, {}, "classical+vit")
    with pytest.raises(ValueError, match="feature set must be one of classical, classical\\+vit"):
        view.segment_image(image, scribbles, models, "vit")


def test_the_view_shows_overlays_and_area_fractions_and_writes_the_files(material, models, tmp_path):
    image, truth, _, scribbles = material
    gallery, headers, rows, files = view.run_segmentation(
        image, [view.scribble_layer(scribbles)], {"ALiBi": models["ALiBi"]}, "classical+vit", tmp_path, "TIFF"
    )
    assert headers == ["model", "class 1 (blue) area", "class 2 (orange) area"]
    (picture, caption), = gallery
    assert picture.shape == (112, 140, 3) and picture.dtype == np.uint8
    assert caption == "ALiBi: classical + ViT features"
    assert [path.name for path in files] == ["ALiBi-segmenter.zip", "ALiBi-mask.tif"]
    mask = read_labels(files[1])
    (name, *fractions), = rows
    assert name == "ALiBi" and sum(fractions) == pytest.approx(1.0, abs=1e-3)
    assert fractions[0] == pytest.approx(np.mean(mask == 1), abs=1e-4)
    # The blend keeps the image under class 1 and tints it blue.
    blue = np.asarray(CLASS_COLOURS[0][1], np.float32)
    gray = view.editor_picture(image).astype(np.float32)
    np.testing.assert_allclose(picture[mask == 1], (0.55 * gray + 0.45 * blue)[mask == 1], atol=1.01)
    # The downloaded segmenter is the model's, with the model's image statistics, and segments the same.
    with zipfile.ZipFile(files[0]) as archive:
        settings = json.loads(archive.read("settings.json"))
    np.testing.assert_allclose(settings["image_statistics"]["image_mean"], UNUSUAL_STATISTICS["image_mean"], atol=1e-6)
    loaded = TrainableSegmenter.load(files[0], model=models["ALiBi"][0])
    np.testing.assert_array_equal(loaded.predict(image), mask)


def test_phases_that_differ_below_8_bits_are_told_apart_in_full_precision(material):
    _, truth, _, scribbles = material
    image = np.where(truth == 1, 30000, 30040).astype(np.uint16)  # 117 of 255 everywhere in the editor's picture
    value = view.editor_value(image)
    assert value["background"].dtype == np.uint8 and np.ptp(value["background"]) == 0 and value["layers"] == []
    as_returned = np.dstack([value["background"], np.full(truth.shape, 255, np.uint8)])  # RGBA from the browser
    assert view.shows_image(as_returned, image) and not view.shows_image(as_returned, image // 2)
    assert not view.shows_image(as_returned[:, :-1], image)
    (full,) = view.segment_image(image, scribbles, {}, "classical")
    (shown,) = view.segment_image(view.image_of_background(value["background"]), scribbles, {}, "classical")
    assert full.segmenter.n_image_channels_ == 1
    assert mean_iou(full.mask, truth) >= 0.95 > 0.6 > mean_iou(shown.mask, truth)


def test_download_folders_of_old_runs_are_removed(tmp_path):
    """Each run gets a new numbered folder; only the newest `keep` remain, whatever else the root holds."""
    (tmp_path / "notes.txt").write_text("kept")
    folders = []
    for _ in range(5):
        folders.append(view.new_run_folder(tmp_path, keep=3))
        (folders[-1] / "mask.png").write_bytes(b"png")
    assert [folder.name for folder in folders] == [f"run-{number:06d}" for number in range(1, 6)]
    assert sorted(tmp_path.glob("run-*")) == folders[-3:]
    assert all((folder / "mask.png").exists() for folder in folders[-3:])
    assert (tmp_path / "notes.txt").read_text() == "kept"
