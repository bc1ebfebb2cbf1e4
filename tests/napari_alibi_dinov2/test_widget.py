"""The dock widget in a headless napari viewer: training from a painted Labels layer, every page of a stack in a worker
thread, features kept while scribbling, the segmenter file through the reader and writer, mistakes in the
notification area, and a screenshot of the result."""

import numpy as np
import pytest
from napari.utils.notifications import NotificationSeverity, notification_manager

from alibi_dinov2.segmentation import extractors
from alibi_dinov2.synthetic.microstructures import generate_microstructure_dataset
from evaluation.metrics import segmentation_scores
from evaluation.scribble_benchmark import simulate_scribble_rounds
from napari_alibi_dinov2.segmenter_files import get_reader
from napari_alibi_dinov2.widget import RESULT_SUFFIX, SEGMENTER_KEY, SegmentationWidget


WAIT_MS = 120_000


@pytest.fixture(scope="module")
def material():
    """A two-page stack of a 16-bit two-phase micrograph, its truth and scribbles on the first page (two rounds)."""
    pairs = generate_microstructure_dataset(2, size=(112, 140), n_phases=2, seed=3)
    image = np.stack([np.round(page * 65535).astype(np.uint16) for page, _ in pairs])
    truth = np.stack([labels for _, labels in pairs])
    first, second = simulate_scribble_rounds([truth[0]], n_rounds=2, seed=0)
    return image, truth, first[0], second[0]


def mean_iou(mask, truth):
    return segmentation_scores(mask, truth, 2, ignore_index=0, first_class=1)["miou"]


def paint(layer, page: int, scribbles: np.ndarray) -> None:
    """Paint `scribbles` on a page of a Labels layer the way the brush does (``data_setitem``, with undo history)."""
    for value in np.unique(scribbles[scribbles > 0]):
        rows, columns = np.nonzero(scribbles == value)
        layer.data_setitem((np.full_like(rows, page), rows, columns), int(value))


def run(widget, qtbot, action) -> None:
    action()
    qtbot.waitUntil(lambda: not widget.busy, timeout=WAIT_MS)


def errors_since(start: int) -> list[str]:
    return [str(record.message) for record in notification_manager.records[start:]
            if getattr(record, "severity", None) == NotificationSeverity.ERROR]


def build_scene(viewer, material):
    """The micrograph stack, scribbles painted on its first page, and the widget docked from the Plugins menu."""
    image, truth, first, _ = material
    viewer.add_image(image, name="micrograph")
    scribbles = viewer.add_labels(np.zeros(image.shape, np.int32), name="scribbles")
    paint(scribbles, 0, first)
    _, widget = viewer.window.add_plugin_dock_widget("alibi-dinov2", "Scribble segmentation")  # Plugins menu
    assert isinstance(widget, SegmentationWidget)
    return viewer, widget


@pytest.fixture
def scene(viewer, material):
    return build_scene(viewer, material)


def test_the_widget_trains_on_painted_scribbles_and_segments_every_page(scene, material, qtbot, monkeypatch):
    viewer, widget = scene
    image, truth, first, second = material
    assert (widget.image.value, widget.scribbles.value) == ("micrograph", "scribbles")
    calls, computed = [], extractors.classical_features

    def counted(*args, **kwargs):
        calls.append(1)
        return computed(*args, **kwargs)

    monkeypatch.setattr(extractors, "classical_features", counted)
    run(widget, qtbot, widget.train)
    result = viewer.layers["micrograph" + RESULT_SUFFIX]
    assert result.data.shape == image.shape and calls == [1]
    assert mean_iou(result.data[0], truth[0]) >= 0.8 and not result.data[1].any()  # the page in view only
    assert widget.areas.value.startswith("class 1: ") and "class 2: " in widget.areas.value

    paint(viewer.layers["scribbles"], 0, second)  # more scribbles: the features are kept, the classifier retrained
    run(widget, qtbot, widget.train)
    assert calls == [1] and result.metadata[SEGMENTER_KEY] is widget.segmenter

    widget.segment_stack()  # every page, in a worker thread, with napari's progress bar
    assert widget.busy and widget.worker.pbar.total == 2 and not widget.stack_button.enabled
    qtbot.waitUntil(lambda: not widget.busy, timeout=WAIT_MS)
    assert widget.stack_button.enabled
    assert mean_iou(result.data[1], truth[1]) >= 0.8 and calls == [1, 1]  # page 1's features computed once
    fractions = [float(line.split(": ")[1].split(" %")[0]) / 100 for line in widget.areas.value.splitlines()]
    np.testing.assert_allclose(fractions, [np.mean(result.data == 1), np.mean(result.data == 2)], atol=1e-3)
    np.testing.assert_array_equal(viewer.layers["micrograph"].data, image)  # the inputs untouched
    assert set(np.unique(viewer.layers["scribbles"].data)) == {0, 1, 2}


def test_a_segmenter_is_saved_by_the_writer_and_opens_back_through_the_reader(scene, qtbot, tmp_path, material):
    viewer, widget = scene
    image, truth = material[:2]
    viewer.dims.set_current_step(0, 1)  # the second page in view: trained on the first, segments the second
    run(widget, qtbot, widget.train)
    result = viewer.layers["micrograph" + RESULT_SUFFIX]
    assert not result.data[0].any() and mean_iou(result.data[1], truth[1]) >= 0.8
    expected = widget.segmenter.predict(image[1])
    path = tmp_path / "segmenter.zip"
    viewer.layers.selection = {result}
    assert viewer.layers.save(str(path), selected=True, plugin="alibi-dinov2") == [str(path)]

    widget.segmenter = None
    layers = len(viewer.layers)
    viewer.open(str(path), plugin="alibi-dinov2")
    assert len(viewer.layers) == layers and widget.segmenter is not None  # loaded into the docked widget
    np.testing.assert_array_equal(widget.segmenter.predict(image[1]), expected)
    other = tmp_path / "other.zip"
    other.write_bytes(b"PK\x05\x06" + bytes(18))  # an empty zip archive
    assert get_reader(str(other)) is None and get_reader(str(tmp_path / "image.tif")) is None


@pytest.mark.parametrize("model_type", ["alibi_dinov2", "alibi_dinov3"])
def test_vit_features_from_a_model_folder_round_trip_through_the_file(viewer, material, qtbot, tmp_path, model_type):
    from conftest import tiny_alibi_model

    tiny_alibi_model(model_type).save_pretrained(tmp_path / "alibi")
    image, truth, first, _ = material
    viewer.add_image(image[0], name="page")
    scribbles = viewer.add_labels(np.zeros(image.shape[1:], np.int32), name="scribbles")
    scribbles.data = first
    widget = SegmentationWidget(viewer)
    widget.model.value, widget.features.value = str(tmp_path / "alibi"), "classical+vit"
    run(widget, qtbot, widget.train)
    assert widget.segmenter.n_features_in_ == 58 + 9
    mask = viewer.layers["page" + RESULT_SUFFIX].data
    assert mean_iou(mask, truth[0]) >= 0.8
    widget.save_segmenter(tmp_path / "vit.zip")
    again = SegmentationWidget(viewer)
    loaded = again.load_segmenter(tmp_path / "vit.zip")  # the model named in the file
    assert again.model.value == str(tmp_path / "alibi") and again.features.value == "classical+vit"
    np.testing.assert_array_equal(loaded.predict(image[0]), mask)


def test_an_rgb_image_is_segmented_from_labels_of_its_height_and_width(viewer, material, qtbot):
    image, truth, first, _ = material
    rgb = np.stack([image[0] // 257] * 3, axis=-1).astype(np.uint8)
    viewer.add_image(rgb, name="colour", rgb=True)
    viewer.add_labels(first.copy(), name="scribbles")
    widget = SegmentationWidget(viewer)
    run(widget, qtbot, widget.train)
    result = viewer.layers["colour" + RESULT_SUFFIX]
    assert result.data.shape == truth[0].shape and mean_iou(result.data, truth[0]) >= 0.8
    assert widget.segmenter.n_image_channels_ == 3


@pytest.mark.parametrize(
    "case, message",
    [
        ("no scribbles", "No scribbles: draw on the image"),
        ("one class", r"Only class 2 is scribbled"),
        ("another shape", r"The scribbles 'scribbles' have shape \(40, 40\) but the image 'micrograph' has shape"),
        ("no model", "ViT features need a model"),
        ("bad model", "not found"),
        ("not a model", "cannot be loaded"),
    ],
)
def test_mistakes_are_said_in_the_notification_area_and_lose_nothing(viewer, material, qtbot, tmp_path, case,
                                                                      message):
    import re

    image, _, first, _ = material
    viewer.add_image(image, name="micrograph")
    scribbles = np.zeros((40, 40) if case == "another shape" else image.shape, np.int32)
    if case == "another shape":
        scribbles[5:9, 5:9], scribbles[20:24, 20:24] = 1, 2
    elif case == "one class":
        scribbles[0, 5:9, 5:9] = 2
    elif case != "no scribbles":
        scribbles[0] = first
    viewer.add_labels(scribbles, name="scribbles")
    widget = SegmentationWidget(viewer)
    if case in ("no model", "bad model", "not a model"):
        (tmp_path / "empty").mkdir()
        widget.features.value = "classical+vit"
        widget.model.value = {"no model": "", "bad model": str(tmp_path / "missing"),
                              "not a model": str(tmp_path / "empty")}[case]
    before = [(layer.name, np.array(layer.data)) for layer in viewer.layers]
    start = len(notification_manager.records)
    run(widget, qtbot, widget.train)
    errors = errors_since(start)
    assert len(errors) == 1 and re.search(message, errors[0]), errors
    assert "Traceback" not in errors[0] and "\n" not in errors[0]
    assert [layer.name for layer in viewer.layers] == [name for name, _ in before]
    for (_, data), layer in zip(before, viewer.layers):
        np.testing.assert_array_equal(layer.data, data)
    start = len(notification_manager.records)
    widget.segment_stack()
    assert errors_since(start) == ["No segmenter yet: paint scribbles and train, or load a segmenter file"]


def test_a_screenshot_shows_the_image_and_its_segmentation(make_napari_viewer, napari_plugin, material, qtbot,
                                                           tmp_path):
    from PIL import Image

    viewer, widget = build_scene(make_napari_viewer(show=True), material)  # Xvfb's window: the canvas is drawn
    viewer.window._qt_window.resize(1100, 640)
    run(widget, qtbot, widget.train)
    viewer.layers["scribbles"].visible = False
    viewer.reset_view()
    qtbot.wait(100)
    canvas = viewer.screenshot(path=str(tmp_path / "canvas.png"), canvas_only=True, flash=False)
    window = viewer.screenshot(path=str(tmp_path / "window.png"), canvas_only=False, flash=False)
    assert Image.open(tmp_path / "canvas.png").size == canvas.shape[1::-1]
    assert window.shape[:2] == (640, 1100) and window.shape[1] > canvas.shape[1]  # the dock widget beside the canvas
    rgb = canvas[..., :3].astype(int)
    image_pixels = rgb.max(axis=-1) > 30  # the micrograph, not the black background
    assert 0.2 < image_pixels.mean() < 0.95
    # each pixel of the micrograph in one of the two classes' colours, in about the classes' shares of the area
    colours = np.array([viewer.layers["micrograph" + RESULT_SUFFIX].get_color(value)[:3] for value in (1, 2)]) * 255
    shown = rgb[image_pixels].astype(float)
    nearer_first = np.abs(shown - colours[0]).sum(-1) < np.abs(shown - colours[1]).sum(-1)
    share = np.mean(viewer.layers["micrograph" + RESULT_SUFFIX].data[0] == 1)
    assert abs(nearer_first.mean() - share) < 0.1
    assert np.std(shown, axis=0).max() > 10  # the micrograph's texture shows through
