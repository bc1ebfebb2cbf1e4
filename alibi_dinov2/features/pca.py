"""The one PCA of patch features (pure numpy): PCA colours of the report and demo, ViT channels of the trainable
segmenter.

    projected = pca_components(features, n_components=3, standardised=True)    # (h, w, 3)
    colours = scale_per_component(projected)                                      # in [0, 1]
"""

from __future__ import annotations

import numpy as np


def flatten_grid(features: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
    """(h, w, C) -> (h * w, C) float64 and (h, w)."""
    features = np.asarray(features)
    if features.ndim != 3:
        raise ValueError(f"features must be an (h, w, C) grid, got shape {features.shape}")
    height, width, channels = features.shape
    if height * width == 0 or channels == 0:
        raise ValueError(f"features are empty (shape {features.shape})")
    return features.reshape(-1, channels).astype(np.float64), (height, width)


def standardise(flat: np.ndarray) -> np.ndarray:
    """Zero mean, unit (population) std per column; constant columns are only centred."""
    scale = flat.std(axis=0)
    scale[scale == 0] = 1.0
    return (flat - flat.mean(axis=0)) / scale


def pca_components(
    features: np.ndarray, n_components: int = 3, standardised: bool = False, fill_missing: bool = False
) -> np.ndarray:
    """Projection of each patch on the image's own first principal components.

    Components are sorted by explained variance; each one's sign is fixed so that its largest-magnitude loading is
    positive, which makes colours reproducible.

    Args:
        features: (h, w, C).
        standardised: standardise channels before the PCA (otherwise only centred).
        fill_missing: when the grid has fewer non-degenerate components than asked (few patches or channels),
            give zeros for the rest instead of raising, so that the channel count never depends on the image.

    Returns:
        float64 (h, w, n_components).
    """
    flat, (height, width) = flatten_grid(features)
    if n_components < 1:
        raise ValueError(f"n_components must be >= 1, got {n_components}")
    if not np.all(np.isfinite(flat)):
        raise ValueError("features contain NaN or infinite values")
    if n_components > min(flat.shape) and not fill_missing:
        raise ValueError(f"n_components={n_components} exceeds min(n_patches, channels)={min(flat.shape)}")
    centred = standardise(flat) if standardised else flat - flat.mean(axis=0)
    _, singular_values, components = np.linalg.svd(centred, full_matrices=False)
    n_valid = n_components
    if fill_missing:
        n_valid = min(n_components, int(np.sum(singular_values > 1e-8 * max(singular_values.max(), 1e-30))))
    components = components[:n_valid]
    signs = np.sign(components[np.arange(n_valid), np.abs(components).argmax(axis=1)])
    components = components * np.where(signs == 0, 1.0, signs)[:, None]
    projected = np.zeros((flat.shape[0], n_components))
    projected[:, :n_valid] = centred @ components.T
    return projected.reshape(height, width, n_components)


def scale_per_component(projected: np.ndarray) -> np.ndarray:
    """Min-max scale each component (last axis) to [0, 1] over the grid; a constant component maps to 0."""
    low = projected.min(axis=(0, 1))
    span = projected.max(axis=(0, 1)) - low
    span[span == 0] = 1.0
    return np.clip((projected - low) / span, 0.0, 1.0)


__all__ = ["flatten_grid", "pca_components", "scale_per_component", "standardise"]
