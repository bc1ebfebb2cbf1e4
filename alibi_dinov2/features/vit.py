"""ViT patch features turned into dense per-pixel channels for trainable segmentation.

Per image: patch features (h, w, C) are standardised per channel, reduced by a PCA fitted on the
image's own tokens to ``n_components`` (9 by default), min-max scaled to [0, 1] per component and
bilinearly resized to the image, giving (H, W, n_components) float32 channels that are concatenated
with the classical stack. The resize is aligned with the top-left area the patch grid covers (the
extractor crops the image to whole patches); the few border pixels beyond it repeat the edge.

Large images can be processed on overlapping tiles (:func:`extract_patch_features_tiled`) so the
model's memory stays bounded; the tiles' patch grids are blended into one grid for the whole image.
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np

from alibi_dinov2.features.pca import pca_components, scale_per_component
from alibi_dinov2.io.images import check_image_size, to_rgb01


DEFAULT_N_COMPONENTS = 9

PatchExtractor = Callable[..., np.ndarray]


# --------------------------------------------------------------------------------------------------
# PCA reduction and resizing (pure numpy)
# --------------------------------------------------------------------------------------------------
def pca_reduce_patches(patch_features: np.ndarray, n_components: int = DEFAULT_N_COMPONENTS) -> np.ndarray:
    """Standardise, PCA-reduce (fitted on these tokens) and min-max scale a patch grid.

    Args:
        patch_features: (h, w, C) patch features of one image.
        n_components: number of principal components kept.

    Returns:
        float32 (h, w, n_components) in [0, 1]. Components are sorted by explained variance; each
        component's sign is fixed so that its largest loading is positive (deterministic output).
        When fewer components exist than requested (few tokens or channels) the rest are zeros, so
        the channel count never depends on the image.
    """
    projected = pca_components(patch_features, n_components, standardised=True, fill_missing=True)
    return scale_per_component(projected).astype(np.float32)


def _bilinear_matrix(n_out: int, n_in: int, indices: Optional[np.ndarray] = None) -> np.ndarray:
    """(n_out, n_in) linear-interpolation weights, pixel-centre aligned (align_corners=False); with `indices`, only
    those output rows."""
    indices = np.arange(n_out) if indices is None else np.asarray(indices)
    position = (indices + 0.5) * (n_in / n_out) - 0.5
    position = np.clip(position, 0, n_in - 1)
    lower = np.floor(position).astype(int)
    upper = np.minimum(lower + 1, n_in - 1)
    weight = position - lower
    matrix = np.zeros((len(indices), n_in))
    matrix[np.arange(len(indices)), lower] += 1 - weight
    matrix[np.arange(len(indices)), upper] += weight
    return matrix


def resize_bilinear(grid: np.ndarray, output_shape: tuple[int, int], rows=None, cols=None) -> np.ndarray:
    """Bilinearly resize (h, w, k) to (H, W, k), pixel centres aligned as torch's align_corners=False.

    `rows` and `cols` (output indices) give only those rows and columns of the result, the values cut from the
    whole, so that a large image is resized block by block.
    """
    grid = np.asarray(grid)
    height, width = int(output_shape[0]), int(output_shape[1])
    row_weights = _bilinear_matrix(height, grid.shape[0], rows)
    col_weights = _bilinear_matrix(width, grid.shape[1], cols)
    resized = np.einsum("Hh,hwk,Ww->HWk", row_weights, grid.astype(np.float64), col_weights, optimize=True)
    return resized.astype(np.float32)


def upsample_channels(
    reduced: np.ndarray, image_shape: tuple[int, ...], patch_size: Optional[int] = None, window=None
) -> np.ndarray:
    """Per-pixel channels `(H, W, k)` of a reduced patch grid `(h, w, k)` (:func:`pca_reduce_patches`), clipped to
    [0, 1]; `window = ((top, bottom), (left, right))` gives that block of them only.

    With `patch_size` the grid covers the top-left `(h * p, w * p)` pixels (the extractor crops the image to the
    patch grid): it is resized to that area and the few remaining border rows/columns repeat the edge values.
    ``None`` stretches the grid over the whole image.
    """
    if len(image_shape) < 2 or min(image_shape[:2]) < 1:
        raise ValueError(f"image_shape must start with (H, W) > 0, got {image_shape}")
    height, width = int(image_shape[0]), int(image_shape[1])
    (top, bottom), (left, right) = window or ((0, height), (0, width))
    if patch_size is None:
        covered_h, covered_w = height, width
    else:
        covered_h = min(reduced.shape[0] * patch_size, height)
        covered_w = min(reduced.shape[1] * patch_size, width)
    # Rows and columns beyond the covered area repeat its edge.
    rows = np.minimum(np.arange(top, bottom), covered_h - 1)
    cols = np.minimum(np.arange(left, right), covered_w - 1)
    return np.clip(resize_bilinear(reduced, (covered_h, covered_w), rows, cols), 0.0, 1.0)


def vit_feature_channels_from_patches(
    patch_features: np.ndarray,
    image_shape: tuple[int, ...],
    n_components: int = DEFAULT_N_COMPONENTS,
    patch_size: Optional[int] = None,
) -> np.ndarray:
    """Per-pixel ViT channels from precomputed patch features: :func:`pca_reduce_patches`, then
    :func:`upsample_channels`.

    Args:
        patch_features: (h, w, C) patch grid of one image.
        image_shape: the image's shape; only (H, W) = ``image_shape[:2]`` is used.
        n_components: PCA dimensions kept.
        patch_size: see :func:`upsample_channels`.

    Returns:
        float32 (H, W, n_components) in [0, 1].
    """
    return upsample_channels(pca_reduce_patches(patch_features, n_components), image_shape, patch_size)


# --------------------------------------------------------------------------------------------------
# Model side
# --------------------------------------------------------------------------------------------------
def model_patch_size(model) -> int:
    """Patch size of a transformers model (its backbone's ``config.patch_size``; 14 if unknown)."""
    try:
        from alibi_dinov2.features.extraction import patch_size_of

        return patch_size_of(model)
    except (ImportError, ValueError, AttributeError):
        pass  # unsupported or stand-in model: read the config directly
    patch_size = getattr(getattr(model, "config", None), "patch_size", 14)
    if isinstance(patch_size, (tuple, list)):
        patch_size = patch_size[0]
    return int(patch_size)


def _default_extractor() -> PatchExtractor:
    # Imported lazily: the ViT side (and torch) is needed only when ViT features are asked for.
    from alibi_dinov2.features.extraction import extract_patch_features

    return extract_patch_features


def _tile_starts(n_cells: int, tile_cells: int, step_cells: int) -> list[int]:
    """Start cells of tiles covering ``n_cells``; the last tile is aligned to the end."""
    if n_cells <= tile_cells:
        return [0]
    starts = list(range(0, n_cells - tile_cells, step_cells))
    starts.append(n_cells - tile_cells)
    return starts


def _tent_weights(n: int) -> np.ndarray:
    """Weights high in a tile's centre and low at its edges, for smooth blending of overlaps."""
    position = np.arange(n) + 0.5
    return np.minimum(position, n - position) / (n / 2.0) + 1e-3


def extract_patch_features_tiled(
    model,
    image: np.ndarray,
    max_side: Optional[int] = None,
    overlap: int = 56,
    image_processor=None,
    extractor: Optional[PatchExtractor] = None,
) -> np.ndarray:
    """Patch features of a whole image, optionally computed on overlapping tiles.

    Args:
        model: transformers image model (e.g. ``Dinov2Model`` or an ALiBi-DINOv2 model).
        image: (H, W) or (H, W, 3) image.
        max_side: largest tile side in pixels (rounded down to a multiple of the patch size). ``None``
            or an image that fits gives a single pass.
        overlap: overlap between neighbouring tiles in pixels (rounded up to whole patches).
        image_processor: passed to the extractor.
        extractor: ``f(model, image, image_processor=None) -> (h, w, C)``; default
            :func:`alibi_dinov2.features.extraction.extract_patch_features`.

    Returns:
        (H // p, W // p, C) patch grid (p = patch size). Tiles are cut on patch boundaries and their
        grids blended with weights that fall off towards each tile's edges. A lazy `image` (a dask array) is
        read tile by tile.
    """
    extractor = extractor or _default_extractor()
    image = image if hasattr(image, "shape") else np.asarray(image)
    patch = model_patch_size(model)
    check_image_size(image, patch)
    grid_h, grid_w = image.shape[0] // patch, image.shape[1] // patch
    if max_side is None or (image.shape[0] <= max_side and image.shape[1] <= max_side):
        return np.asarray(extractor(model, np.asarray(image), image_processor=image_processor))

    tile_cells = max_side // patch
    if tile_cells < 1:
        raise ValueError(f"max_side={max_side} is smaller than the patch size {patch}")
    overlap_cells = min(-(-overlap // patch), tile_cells - 1)
    step = tile_cells - overlap_cells
    accumulated = None
    weight_sum = np.zeros((grid_h, grid_w))
    for top in _tile_starts(grid_h, tile_cells, step):
        for left in _tile_starts(grid_w, tile_cells, step):
            rows, cols = min(tile_cells, grid_h), min(tile_cells, grid_w)
            tile = np.asarray(image[top * patch : (top + rows) * patch, left * patch : (left + cols) * patch])
            features = np.asarray(extractor(model, tile, image_processor=image_processor), dtype=np.float64)
            if features.shape[:2] != (rows, cols):
                raise RuntimeError(
                    f"Extractor returned a {features.shape[:2]} grid for a {rows} x {cols}-patch tile"
                )
            if accumulated is None:
                accumulated = np.zeros((grid_h, grid_w, features.shape[-1]))
            weight = np.outer(_tent_weights(rows), _tent_weights(cols))
            accumulated[top : top + rows, left : left + cols] += weight[..., None] * features
            weight_sum[top : top + rows, left : left + cols] += weight
    return (accumulated / weight_sum[..., None]).astype(np.float32)


def vit_feature_channels(
    model,
    image: np.ndarray,
    n_components: int = DEFAULT_N_COMPONENTS,
    image_processor=None,
    max_side: Optional[int] = None,
    overlap: int = 56,
    extractor: Optional[PatchExtractor] = None,
) -> np.ndarray:
    """Per-pixel ViT feature channels of one image.

    Args:
        model: transformers image model.
        image: (H, W) or (H, W, 3) image of any numeric dtype (scaled to float32 [0, 1] first).
        n_components: PCA dimensions kept (9 in the reference).
        image_processor, extractor: see :func:`extract_patch_features_tiled`.
        max_side, overlap: tiling for large images, see :func:`extract_patch_features_tiled`.

    Returns:
        float32 (H, W, n_components) in [0, 1].
    """
    image01 = to_rgb01(image)  # the project's one image policy (gray replicated, alpha composited)
    patch_features = extract_patch_features_tiled(
        model, image01, max_side=max_side, overlap=overlap, image_processor=image_processor, extractor=extractor
    )
    return vit_feature_channels_from_patches(
        patch_features, image01.shape, n_components, patch_size=model_patch_size(model)
    )
