"""The examples figure of a probe run: validation image | ground truth | prediction, in Pascal-VOC colours."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence, Union

import numpy as np

from alibi_dinov2.io.files import atomic_path


PathLike = Union[str, os.PathLike]


def label_palette(num_classes: int) -> np.ndarray:
    """(num_classes, 3) uint8 colours, Pascal-VOC style (bits of the class index spread over R, G, B)."""
    palette = np.zeros((num_classes, 3), dtype=np.uint8)
    for index in range(num_classes):
        value, red, green, blue = index, 0, 0, 0
        for bit in range(8):
            red |= ((value >> 0) & 1) << (7 - bit)
            green |= ((value >> 1) & 1) << (7 - bit)
            blue |= ((value >> 2) & 1) << (7 - bit)
            value >>= 3
        palette[index] = (red, green, blue)
    return palette


def colourise_labels(labels: np.ndarray, num_classes: int, ignore_index: int = 255) -> np.ndarray:
    """(H, W) class indices -> (H, W, 3) uint8 colours; ignored pixels white."""
    palette = label_palette(num_classes)
    labels = np.asarray(labels)
    valid = (labels >= 0) & (labels < num_classes)
    colours = np.full(labels.shape + (3,), 255, dtype=np.uint8)
    colours[valid] = palette[labels[valid]]
    return colours


def plot_example_predictions(
    images: Sequence[np.ndarray],
    labels: Sequence[np.ndarray],
    predictions: Sequence[np.ndarray],
    num_classes: int,
    path: PathLike,
    ignore_index: int = 255,
    titles: Sequence[str] | None = None,
) -> Path:
    """Save a PNG (atomically) with one row per example: image | ground truth | prediction.

    Args:
        images: (H, W, 3) uint8 or float in [0, 1]; labels, predictions: (H, W) class indices.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    rows = len(images)
    if rows == 0:
        raise ValueError("No examples to plot.")
    figure, axes = plt.subplots(rows, 3, figsize=(9, 3 * rows), squeeze=False)
    for row, (image, truth, predicted) in enumerate(zip(images, labels, predictions)):
        panels = (image, colourise_labels(truth, num_classes, ignore_index), colourise_labels(predicted, num_classes))
        for column, (panel, name) in enumerate(zip(panels, ("image", "ground truth", "prediction"))):
            axis = axes[row, column]
            axis.imshow(panel, interpolation="nearest")
            axis.set_xticks([])
            axis.set_yticks([])
            if row == 0:
                axis.set_title(name)
        if titles is not None:
            axes[row, 0].set_ylabel(titles[row])
    figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, dpi=100)
    plt.close(figure)
    return Path(path)
