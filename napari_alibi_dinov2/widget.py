"""The dock widget: scribbles painted on a Labels layer over an Image layer (a 2D image or every page of a stack) train
a segmenter, whose segmentation comes back as a Labels layer with each class's area; the segmenter segments every page
in a worker thread (napari's progress bar) and is saved to, or loaded from, the project's safe segmenter file.

A thin user interface over :mod:`alibi_dinov2.segmentation.interactive`: features are computed once per page and
kept in a :class:`~alibi_dinov2.features.cache.FeatureCache` while scribbles are added, so later trainings only
retrain the classifier. Mistakes (no scribbles, one class, scribbles of another shape, a model that cannot be
loaded) are said in napari's notification area, and no layer but the result is changed.
"""

from __future__ import annotations

import os
from typing import Callable, Optional

import napari
import numpy as np
from magicgui.widgets import ComboBox, Container, Label, LineEdit, PushButton
from napari.layers import Image, Labels
from napari.qt.threading import create_worker
from napari.utils.notifications import show_error, show_info

from alibi_dinov2.errors import InputError
from alibi_dinov2.features.cache import FeatureCache
from alibi_dinov2.segmentation.extractors import FEATURE_SETS, uses_model
from alibi_dinov2.segmentation.interactive import (
    area_fractions,
    as_pages,
    check_scribbles,
    label_pages,
    page_shape,
    segment_pages,
    train_on_scribbles,
)
from alibi_dinov2.segmentation.segmenter_file import read_segmenter
from alibi_dinov2.segmentation.trainable import TrainableSegmenter


RESULT_SUFFIX = " segmentation"
SEGMENTER_KEY = "alibi_dinov2_segmenter"  # the metadata entry of a result layer that holds its segmenter
MODEL_HINT = ("a folder or Hub id: ALiBi-DINOv2, ALiBi-DINOv3 or, to compare, a stock DINOv2 such as "
              "facebook/dinov2-with-registers-small")


def load_feature_model(name: str):
    """``(model, image statistics)`` of a folder or Hub id, or a ValueError that names it and says what to give."""
    from alibi_dinov2.hub.models import load_model

    if not name:
        raise ValueError(f"ViT features need a model: enter {MODEL_HINT}")
    try:
        return load_model(name)
    except InputError:
        raise
    except Exception as error:  # transformers' OSError, ValueError, KeyError ... for a folder that holds no model
        raise ValueError(f"The model {name!r} cannot be loaded ({type(error).__name__}: {error}); give {MODEL_HINT}")


def area_text(masks: np.ndarray, classes) -> str:
    """One line per class: its share of the segmented pixels."""
    fractions = area_fractions(masks, list(classes))
    return "\n".join(f"class {value}: {100 * share:.1f} % of the area" for value, share in zip(classes, fractions))


class SegmentationWidget(Container):
    """Scribble segmentation of an Image layer from a Labels layer painted over it (classes 1..K, 0 = unpainted).

    Args:
        napari_viewer: the viewer whose layers it reads and adds to.
        feature_cache: where each page's features are kept (a new 4 GiB cache by default).
    """

    def __init__(self, napari_viewer: napari.viewer.Viewer, feature_cache: Optional[FeatureCache] = None):
        self.viewer = napari_viewer
        self.feature_cache = FeatureCache() if feature_cache is None else feature_cache
        self.segmenter: Optional[TrainableSegmenter] = None
        self.worker = None
        self._models: dict[str, tuple] = {}
        self.image = ComboBox(label="image", choices=self._names_of(Image))
        self.scribbles = ComboBox(label="scribbles", choices=self._names_of(Labels),
                                  tooltip="a Labels layer of the image's shape: paint class 1, 2, ... with the brush")
        self.model = LineEdit(label="model", tooltip=f"for ViT features: {MODEL_HINT}")
        self.choose_model = PushButton(text="Choose a model folder...")
        self.features = ComboBox(label="features", choices=FEATURE_SETS, value="classical")
        self.train_button = PushButton(text="Train and segment this page")
        self.stack_button = PushButton(text="Segment every page")
        self.save_button = PushButton(text="Save segmenter...")
        self.load_button = PushButton(text="Load segmenter...")
        self.areas = Label(value="")
        buttons = [self.train_button, self.stack_button, self.save_button, self.load_button]
        super().__init__(widgets=[self.image, self.scribbles, self.model, self.choose_model, self.features, *buttons,
                                  self.areas])
        self.train_button.changed.connect(self.train)
        self.stack_button.changed.connect(self.segment_stack)
        self.choose_model.changed.connect(self._choose_model_folder)
        self.save_button.changed.connect(self._save_dialog)
        self.load_button.changed.connect(self._load_dialog)
        for event in (napari_viewer.layers.events.inserted, napari_viewer.layers.events.removed,
                      napari_viewer.layers.events.moved):
            event.connect(self._layers_changed)

    # ---------------------------------------------------------------- layers
    def _names_of(self, kind) -> Callable:
        def names(_widget=None) -> list[str]:
            return [layer.name for layer in self.viewer.layers
                    if isinstance(layer, kind) and not layer.name.endswith(RESULT_SUFFIX)]

        return names

    def _layers_changed(self, event=None) -> None:
        self.image.reset_choices()
        self.scribbles.reset_choices()

    def _layer(self, name: Optional[str], kind, what: str):
        if name is None or name not in self.viewer.layers:
            raise ValueError(f"No {what}: add one to the viewer{' and paint on it' if kind is Labels else ''}")
        return self.viewer.layers[name]

    def current_page(self, image: Image) -> int:
        """The page of `image` the viewer shows (0 for a 2D image)."""
        leading = page_shape(image.data.shape, image.rgb)[:-2]
        if not leading:
            return 0
        step = self.viewer.dims.current_step[-(len(leading) + 2):][: len(leading)]
        index = tuple(min(max(int(value), 0), size - 1) for value, size in zip(step, leading))
        return int(np.ravel_multi_index(index, leading))

    def _result_layer(self, image: Image) -> Labels:
        """The Labels layer of `image`'s segmentation, made (all zeros) when absent or of another shape."""
        name, shape = image.name + RESULT_SUFFIX, page_shape(image.data.shape, image.rgb)
        if name in self.viewer.layers and self.viewer.layers[name].data.shape == shape:
            return self.viewer.layers[name]
        if name in self.viewer.layers:
            self.viewer.layers.remove(name)
        return self.viewer.add_labels(np.zeros(shape, dtype=np.int32), name=name, scale=image.scale[-len(shape):],
                                      translate=image.translate[-len(shape):], opacity=0.5)

    # ---------------------------------------------------------------- models
    def feature_model(self, name: str):
        """The model `name` and its image statistics, loaded once per widget."""
        if name not in self._models:
            self._models[name] = load_feature_model(name)
        return self._models[name]

    def _choose_model_folder(self, _=None) -> None:
        from qtpy.QtWidgets import QFileDialog

        folder = QFileDialog.getExistingDirectory(self.native, "A model folder (ALiBi-DINOv2, ALiBi-DINOv3, DINOv2)")
        if folder:
            self.model.value = folder

    # ---------------------------------------------------------------- work
    @property
    def busy(self) -> bool:
        """Whether a training or a segmentation runs."""
        return self.worker is not None

    def _start(self, job, returned: Callable, yielded: Optional[Callable] = None, total: int = 0, what: str = ""):
        connect = {"returned": returned, "errored": self._failed, "finished": self._finished}
        if yielded is not None:
            connect["yielded"] = yielded
        self._enable(False)
        self.worker = create_worker(job, _connect=connect, _progress={"total": total, "desc": what} if total else None)

    def _failed(self, error: BaseException) -> None:
        show_error(str(error) or type(error).__name__)

    def _finished(self) -> None:
        self.worker = None
        self._enable(True)

    def _enable(self, enabled: bool) -> None:
        for button in (self.train_button, self.stack_button, self.save_button, self.load_button):
            button.enabled = enabled

    def train(self, _=None) -> None:
        """Train on the scribbles of every scribbled page (in a worker thread), then segment the page in view."""
        try:
            image = self._layer(self.image.value, Image, "Image layer")
            scribbles = self._layer(self.scribbles.value, Labels, "Labels layer with scribbles")
            pages = as_pages(image.data, image.rgb)
            labels = label_pages(np.array(scribbles.data), image.data.shape, image.rgb, (scribbles.name, image.name))
            check_scribbles(labels)
        except ValueError as error:
            return self._failed(error)
        page, features, model_name = self.current_page(image), self.features.value, self.model.value.strip()

        def job():
            model, statistics = self.feature_model(model_name) if uses_model(features) else (None, None)
            segmenter = train_on_scribbles(pages, labels, features, model, statistics, self.feature_cache)
            return segmenter, image, dict(segment_pages(segmenter, pages, [page]))

        self._start(job, self._show_training, what="training")

    def _show_training(self, result) -> None:
        segmenter, image, masks = result
        self.segmenter = segmenter
        layer = self._result_layer(image)
        self._write_pages(layer, masks)
        layer.metadata[SEGMENTER_KEY] = segmenter
        self.areas.value = area_text(np.stack(list(masks.values())), segmenter.classes_)

    def segment_stack(self, _=None) -> None:
        """Segment every page of the image with the segmenter, in a worker thread, with napari's progress bar."""
        try:
            if self.segmenter is None:
                raise ValueError("No segmenter yet: paint scribbles and train, or load a segmenter file")
            image = self._layer(self.image.value, Image, "Image layer")
            pages = as_pages(image.data, image.rgb)
        except ValueError as error:
            return self._failed(error)
        segmenter, layer = self.segmenter, self._result_layer(image)
        layer.metadata[SEGMENTER_KEY] = segmenter

        def job():
            yield from segment_pages(segmenter, pages)
            return segmenter

        def show_page(done) -> None:
            self._write_pages(layer, dict([done]))

        def show_areas(segmenter) -> None:
            self.areas.value = area_text(layer.data, segmenter.classes_)

        self._start(job, show_areas, show_page, total=len(pages), what="segmenting every page")

    @staticmethod
    def _write_pages(layer: Labels, masks: dict) -> None:
        pages = layer.data.reshape(-1, *layer.data.shape[-2:])  # a view: the layer's array is contiguous
        for index, mask in masks.items():
            pages[index] = mask
        layer.refresh()

    # ---------------------------------------------------------------- files
    def save_segmenter(self, path: str | os.PathLike) -> None:
        """Write the segmenter to `path` (the safe zip file that ``alibi-segment apply`` reads)."""
        if self.segmenter is None:
            raise ValueError("No segmenter to save: paint scribbles and train first")
        self.segmenter.save(path)

    def load_segmenter(self, path: str | os.PathLike) -> TrainableSegmenter:
        """Read a segmenter file; for ViT features the model named in the model field, else the one the file names."""
        settings, _ = read_segmenter(path)
        features = settings["params"]["features"]
        model = name = None
        if uses_model(features):
            name = self.model.value.strip() or settings["model_name"]
            model = self.feature_model(name)[0]
        self.segmenter = TrainableSegmenter.load(path, model=model, feature_cache=self.feature_cache)
        self.features.value = features
        if name:
            self.model.value = name
        show_info(f"Loaded the segmenter {os.fspath(path)} ({features} features, classes "
                  f"{', '.join(str(value) for value in self.segmenter.classes_)})")
        return self.segmenter

    def _save_dialog(self, _=None) -> None:
        from qtpy.QtWidgets import QFileDialog

        path, _ = QFileDialog.getSaveFileName(self.native, "Save the segmenter", "segmenter.zip", "Segmenter (*.zip)")
        if path:
            self._guarded(self.save_segmenter, path)

    def _load_dialog(self, _=None) -> None:
        from qtpy.QtWidgets import QFileDialog

        path, _ = QFileDialog.getOpenFileName(self.native, "Load a segmenter", "", "Segmenter (*.zip)")
        if path:
            self._guarded(self.load_segmenter, path)

    def _guarded(self, action: Callable, *args) -> None:
        try:
            action(*args)
        except (ValueError, OSError) as error:
            self._failed(error)
