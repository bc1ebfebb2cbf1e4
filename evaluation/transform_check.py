"""Equivariance checks: do the features follow the image under flips, rotations and rolls?

For a transform T acting on whole patches, an equivariant feature extractor F satisfies
``F(T(image)) == T(F(image))``. Positional information breaks this: a learned absolute position
embedding stays put while the content moves. A wrapped ALiBi model is exactly equivariant to rolls by
whole patches; flips and rotations also move pixels inside each patch, so the patch embedding itself
makes them approximate for any ViT.

Transforms: ``flip_lr``, ``flip_ud``, ``rot90`` (counter-clockwise, k = 1) and ``roll`` (cyclic shift by
``shift`` whole patches, half the grid by default).
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Mapping, Sequence

import numpy as np

from alibi_dinov2.features.extraction import crop_to_patch_grid, extract_patch_features, patch_size_of


TRANSFORMS: tuple[str, ...] = ("flip_lr", "flip_ud", "rot90", "roll")
METRICS: tuple[str, ...] = ("relative_l2", "cosine")

FeatureFunction = Callable[[np.ndarray], np.ndarray]


def apply_transform(
    array: np.ndarray, transform: str, cell: int = 1, shift: tuple[int, int] | None = None
) -> np.ndarray:
    """Apply a transform to an image or a feature grid (axes 0 and 1 are rows and columns).

    Args:
        array: (H, W[, ...]) image or (h, w, C) features.
        cell: size of one patch in `array`'s units: the patch size for images, 1 for feature grids.
        shift: (rows, cols) in whole patches for ``roll``; default half the grid.
    """
    if transform == "flip_lr":
        return array[:, ::-1].copy()
    if transform == "flip_ud":
        return array[::-1].copy()
    if transform == "rot90":
        return np.rot90(array, k=1, axes=(0, 1)).copy()
    if transform == "roll":
        grid_h, grid_w = array.shape[0] // cell, array.shape[1] // cell
        shift_h, shift_w = (grid_h // 2, grid_w // 2) if shift is None else shift
        return np.roll(array, (shift_h * cell, shift_w * cell), axis=(0, 1))
    raise ValueError(f"Unknown transform {transform!r}; choose from {', '.join(TRANSFORMS)}")


def feature_error(predicted: np.ndarray, expected: np.ndarray, metric: str = "relative_l2") -> float:
    """Distance between two (h, w, C) grids.

    ``relative_l2``: ||predicted - expected|| / ||expected|| (Frobenius); ``cosine``: mean over patches of
    1 - cosine similarity.
    """
    predicted = np.asarray(predicted, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    if predicted.shape != expected.shape:
        raise ValueError(f"Shapes differ: {predicted.shape} vs {expected.shape}")
    if metric == "relative_l2":
        norm = np.linalg.norm(expected)
        return float(np.linalg.norm(predicted - expected) / (norm if norm > 0 else 1.0))
    if metric == "cosine":
        dot = (predicted * expected).sum(axis=-1)
        norms = np.linalg.norm(predicted, axis=-1) * np.linalg.norm(expected, axis=-1)
        cosine = np.where(norms > 0, dot / np.where(norms > 0, norms, 1.0), 1.0)
        return float(np.mean(1.0 - cosine))
    raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")


def equivariance_error(
    feature_function: FeatureFunction,
    image: np.ndarray,
    transform: str,
    patch_size: int,
    metric: str = "relative_l2",
    shift: tuple[int, int] | None = None,
) -> float:
    """Error between F(T(image)) and T(F(image)) for one image.

    Args:
        feature_function: image (H, W[, 3]) -> (H // p, W // p, C) grid.
        image: cropped to a multiple of `patch_size` first, so that T moves whole patches.
        shift: roll shift in patches (default half the grid).
    """
    image = crop_to_patch_grid(np.asarray(image), patch_size)
    features = feature_function(image)
    transformed_features = feature_function(apply_transform(image, transform, cell=patch_size, shift=shift))
    return feature_error(transformed_features, apply_transform(features, transform, cell=1, shift=shift), metric)


def transform_errors(
    feature_function: FeatureFunction,
    images: Sequence[np.ndarray],
    patch_size: int,
    transforms: Sequence[str] = TRANSFORMS,
    metric: str = "relative_l2",
    shift: tuple[int, int] | None = None,
) -> dict[str, float]:
    """Mean equivariance error over images, per transform: {transform: error}."""
    return {
        transform: float(
            np.mean(
                [equivariance_error(feature_function, image, transform, patch_size, metric, shift) for image in images]
            )
        )
        for transform in transforms
    }


def model_feature_function(model, image_processor=None) -> FeatureFunction:
    """F(image) = final-normed patch features of a transformers model."""
    return partial(extract_patch_features, model, image_processor=image_processor)


def transform_check(
    models: Mapping[str, object],
    images: Sequence[np.ndarray],
    transforms: Sequence[str] = TRANSFORMS,
    metric: str = "relative_l2",
    shift: tuple[int, int] | None = None,
) -> dict[str, dict[str, float]]:
    """Equivariance error of each model: {model name: {transform: mean error over images}}."""
    return {
        name: transform_errors(model_feature_function(model), images, patch_size_of(model), transforms, metric, shift)
        for name, model in models.items()
    }


__all__ = [
    "METRICS",
    "TRANSFORMS",
    "apply_transform",
    "equivariance_error",
    "feature_error",
    "model_feature_function",
    "transform_check",
    "transform_errors",
]
