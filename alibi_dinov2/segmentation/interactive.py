"""Interactive scribble segmentation, the logic under both user interfaces (the browser view, ``demo/``, and the
napari plugin, ``napari_alibi_dinov2/``): images and scribbles as pages, the checks that say what to paint, training
one segmenter on the scribbled pages with a feature cache, segmenting page by page, and each class's area.

    pages = as_pages(image, rgb=False)                        # (H, W), (Z, H, W), (H, W, 3), (Z, H, W, 3) ...
    labels = label_pages(scribbles, image.shape, rgb=False)   # the same pages, checked against the image's shape
    segmenter = train_on_scribbles(pages, labels, "classical", feature_cache=cache)
    masks = [mask for _, mask in segment_pages(segmenter, pages)]

Labels: 0 = unlabelled, 1..K = classes. Features of a page are computed once and kept in the
:class:`~alibi_dinov2.features.cache.FeatureCache` while scribbles are added.
"""

from __future__ import annotations

from typing import Callable, Iterator, Optional, Sequence

import numpy as np

from alibi_dinov2.segmentation.trainable import TrainableSegmenter


def default_class_name(value: int) -> str:
    """``"class 2"``."""
    return f"class {value}"


def check_scribbles(labels, class_name: Callable[[int], str] = default_class_name) -> list[int]:
    """The scribbled classes of a label image or stack, sorted; a ValueError saying what to paint when fewer than
    two are scribbled (`class_name` names a class the way the user interface shows it)."""
    classes = [int(value) for value in np.unique(np.asarray(labels)) if value > 0]
    if not classes:
        raise ValueError("No scribbles: draw on the image with the brush, in at least two class colours")
    if len(classes) == 1:
        raise ValueError(f"Only {class_name(classes[0])} is scribbled: draw scribbles of at least one more class "
                         "(another brush colour)")
    return classes


def area_fractions(mask: np.ndarray, classes: Sequence[int]) -> list[float]:
    """Fraction of the mask's pixels in each of `classes`."""
    mask = np.asarray(mask)
    counts = np.bincount(mask.ravel(), minlength=max(classes) + 1)
    return [float(counts[value] / mask.size) for value in classes]


def page_shape(image_shape: Sequence[int], rgb: bool) -> tuple[int, ...]:
    """The shape of the labels of an image: its shape without the colour axis when `rgb`."""
    return tuple(image_shape[:-1] if rgb else image_shape)


def as_pages(image, rgb: bool) -> np.ndarray:
    """An image as its pages: (H, W[, C]) gives one page, (..., H, W[, C]) one per plane of the leading axes.

    Raises:
        ValueError: fewer than two spatial axes.
    """
    image = np.asarray(image)
    spatial = page_shape(image.shape, rgb)
    if len(spatial) < 2:
        raise ValueError(f"An image of shape {image.shape} has no 2D pages; open a 2D image or a stack")
    page = image.shape[len(spatial) - 2:]
    return image.reshape(-1, *page)


def label_pages(labels, image_shape: Sequence[int], rgb: bool, names: tuple[str, str] = ("labels", "image")):
    """Scribble labels as the pages of the image they are painted on.

    Args:
        names: what the user calls the labels and the image (e.g. the names of two napari layers).

    Raises:
        ValueError: labels of another shape than the image (without its colour axis), naming both.
    """
    labels = np.asarray(labels)
    expected = page_shape(image_shape, rgb)
    if labels.shape != expected:
        raise ValueError(
            f"The scribbles {names[0]!r} have shape {labels.shape} but the image {names[1]!r} has shape {expected}: "
            "paint them on a Labels layer of the image's shape"
        )
    return labels.reshape(-1, *expected[-2:])


def scribbled_pages(labels: np.ndarray) -> list[int]:
    """Indices of the pages with at least one scribbled pixel."""
    return [index for index, page in enumerate(labels) if np.any(page > 0)]


def train_on_scribbles(
    pages: np.ndarray,
    labels: np.ndarray,
    features: str = "classical",
    model=None,
    image_statistics=None,
    feature_cache=None,
    class_name: Callable[[int], str] = default_class_name,
    **segmenter_options,
) -> TrainableSegmenter:
    """A segmenter trained on the scribbled pages (pages without scribbles cost nothing).

    Args:
        pages, labels: as :func:`as_pages` and :func:`label_pages` give them.
        features, model, image_statistics: the feature set and, for ViT features, the model and its image statistics
            (as :func:`alibi_dinov2.hub.models.load_model` returns them).
        feature_cache: keeps each page's features for the next training on the same pixels.
        segmenter_options: further :class:`TrainableSegmenter` settings.

    Raises:
        ValueError: fewer than two classes scribbled (the message says what to paint), or a ViT feature set without
            a model.
    """
    check_scribbles(labels, class_name)
    indices = scribbled_pages(labels)
    segmenter = TrainableSegmenter(features=features, model=model, image_processor=image_statistics,
                                   feature_cache=feature_cache, **segmenter_options)
    return segmenter.fit([pages[index] for index in indices], [labels[index] for index in indices])


def segment_pages(segmenter: TrainableSegmenter, pages: np.ndarray,
                  indices: Optional[Sequence[int]] = None) -> Iterator[tuple[int, np.ndarray]]:
    """``(index, mask)`` for each page of `indices` (default: every page), one at a time, so that a caller can show
    progress and stop between pages."""
    for index in range(len(pages)) if indices is None else indices:
        yield index, segmenter.predict(pages[index])


__all__ = [
    "area_fractions",
    "as_pages",
    "check_scribbles",
    "default_class_name",
    "label_pages",
    "page_shape",
    "scribbled_pages",
    "segment_pages",
    "train_on_scribbles",
]
