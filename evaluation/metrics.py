"""The one segmentation metric of the project: a confusion matrix and the scores read from it.

The label convention is always explicit, because the project's tools use two:

* the semantic-segmentation probes (:mod:`evaluation.linear_segmentation`): classes ``0 .. K-1``, unlabelled pixels
  255 -> ``first_class=0, ignore_index=255``;
* the trainable segmentation and the scribble benchmark: 0 = unlabelled, classes ``1 .. K`` ->
  ``first_class=1, ignore_index=0``.

Pixels whose label is `ignore_index` are not scored, whatever was predicted there (``ignore_index=None`` scores
every pixel). Every other label, and every prediction on a scored pixel, must be one of the classes
``first_class .. first_class + K - 1``: anything else is an error, not silently dropped.

    scores = segmentation_scores(predictions, labels, num_classes=21, ignore_index=255)
    scores["miou"], scores["pixel_accuracy"], scores["per_class_iou"]["class_3"]

IoU_k = TP_k / (TP_k + FP_k + FN_k). A class absent from both the labels and the predictions has no IoU (None) and
is left out of the mean; the mean over several images is that of the summed confusion matrices (pooled).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch


def _valid_pixels(labels, ignore_index: int | None):
    if ignore_index is None:
        return (
            torch.ones_like(labels, dtype=torch.bool)
            if isinstance(labels, torch.Tensor)
            else np.ones(labels.shape, bool)
        )
    return labels != ignore_index


def confusion_counts(
    predictions: torch.Tensor, labels: torch.Tensor, num_classes: int, ignore_index: int | None, first_class: int = 0
) -> torch.Tensor:
    """:func:`confusion_matrix` of torch tensors, on their device and without the range check (for training loops
    whose predictions come from an argmax over the classes and whose labels were checked when read)."""
    valid = _valid_pixels(labels, ignore_index)
    truth = labels[valid].long() - first_class
    predicted = predictions[valid].long() - first_class
    codes = truth * num_classes + predicted
    return torch.bincount(codes, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def confusion_matrix(
    predictions, labels, num_classes: int, ignore_index: int | None, first_class: int = 0
) -> np.ndarray:
    """(K, K) int64 pixel counts, rows = ground truth, columns = prediction, in class order.

    Args:
        predictions, labels: integer arrays of the same shape, e.g. (N, H, W).
        num_classes: K, the number of classes.
        ignore_index: label of the pixels that are not scored; None scores every pixel.
        first_class: the classes are ``first_class .. first_class + K - 1`` (0 for the probes, 1 for the
            scribble tools, whose 0 means unlabelled).

    Raises:
        ValueError: shapes differ, or a label or a prediction of a scored pixel is not a class.
    """
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    if predictions.shape != labels.shape:
        raise ValueError(f"predictions {predictions.shape} and labels {labels.shape} must have the same shape.")
    valid = _valid_pixels(labels, ignore_index)
    last = first_class + num_classes - 1
    for what, values in (("labels", labels[valid]), ("predictions", predictions[valid])):
        if values.size and (values.min() < first_class or values.max() > last):
            outside = np.unique(values[(values < first_class) | (values > last)])[:10].tolist()
            raise ValueError(
                f"{what} hold values {outside} outside the classes {first_class} .. {last} (and not the ignore "
                f"index {ignore_index})."
            )
    confusion = confusion_counts(
        torch.from_numpy(np.ascontiguousarray(predictions)), torch.from_numpy(np.ascontiguousarray(labels)),
        num_classes, ignore_index, first_class,
    )
    return confusion.numpy().astype(np.int64)


def scores_from_confusion(
    confusion: np.ndarray, class_names: Sequence[str] | None = None, first_class: int = 0
) -> dict:
    """mIoU, per-class IoU and pixel accuracy of a (K, K) confusion matrix (rows = ground truth).

    Returns:
        dict with ``miou`` (NaN when no class is present), ``pixel_accuracy``, ``per_class_iou`` (name -> float,
        or None for a class in neither labels nor predictions; names default to ``class_<value>``),
        ``num_present_classes`` and ``num_pixels`` (scored pixels).
    """
    confusion = np.asarray(confusion, dtype=np.float64)
    true_positive = np.diag(confusion)
    union = confusion.sum(axis=0) + confusion.sum(axis=1) - true_positive
    present = union > 0
    iou = np.divide(true_positive, union, out=np.full_like(true_positive, np.nan), where=present)
    total = confusion.sum()
    if class_names is None:
        class_names = [f"class_{first_class + index}" for index in range(len(iou))]
    elif len(class_names) != len(iou):
        raise ValueError(f"{len(class_names)} class names for {len(iou)} classes.")
    return {
        "miou": float(np.nanmean(iou)) if present.any() else float("nan"),
        "pixel_accuracy": float(true_positive.sum() / total) if total else float("nan"),
        "per_class_iou": {name: (float(value) if ok else None) for name, value, ok in zip(class_names, iou, present)},
        "num_present_classes": int(present.sum()),
        "num_pixels": int(total),
    }


def segmentation_scores(
    predictions,
    labels,
    num_classes: int,
    ignore_index: int | None,
    first_class: int = 0,
    class_names: Sequence[str] | None = None,
) -> dict:
    """:func:`scores_from_confusion` of :func:`confusion_matrix`: mIoU, per-class IoU and pixel accuracy.

    `ignore_index` has no default on purpose: 255 for the probes' masks, 0 for the scribble tools' (with
    ``first_class=1``), None to score every pixel.
    """
    confusion = confusion_matrix(predictions, labels, num_classes, ignore_index, first_class)
    return scores_from_confusion(confusion, class_names, first_class)


__all__ = ["confusion_counts", "confusion_matrix", "scores_from_confusion", "segmentation_scores"]
