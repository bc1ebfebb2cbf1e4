"""Maps and plots of patch features: PCA colours, k-means maps, similarity maps, probe plots.

Map functions take an (h, w, C) feature grid and return numpy arrays; plot functions return
``matplotlib.figure.Figure`` objects built without pyplot (no global figure registry, no display
backend: save them with ``figure.savefig(path)``, rendered by Agg).
"""

from __future__ import annotations

from typing import Mapping, Sequence, Union

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.cluster import KMeans

from alibi_dinov2.features.pca import flatten_grid, pca_components, scale_per_component, standardise
from alibi_dinov2.io.images import to_rgb01


ChannelScores = Union[np.ndarray, Mapping[str, np.ndarray]]


# --------------------------------------------------------------------------------------------------
# Maps (numpy in, numpy out)
# --------------------------------------------------------------------------------------------------
def pca_rgb(features: np.ndarray, standardised: bool = False) -> np.ndarray:
    """First three principal components as RGB, each min-max scaled to [0, 1] over the image.

    Returns:
        float64 (h, w, 3) in [0, 1] (a constant component maps to 0).
    """
    return scale_per_component(pca_components(features, n_components=3, standardised=standardised))


def kmeans_map(
    features: np.ndarray, n_clusters: int = 2, standardised: bool = True, n_init: int = 15, seed: int = 0
) -> np.ndarray:
    """k-means labels of the patches of one image.

    Args:
        features: (h, w, C).
        standardised: standardise channels first (the paper's setting).

    Returns:
        int64 (h, w) labels in [0, n_clusters).
    """
    flat, (height, width) = flatten_grid(features)
    design = standardise(flat) if standardised else flat
    labels = KMeans(n_clusters=n_clusters, n_init=n_init, random_state=seed).fit_predict(design)
    return labels.reshape(height, width).astype(np.int64)


def cosine_similarity_map(features: np.ndarray, query: tuple[int, int]) -> np.ndarray:
    """Cosine similarity of every patch to the patch at grid position ``query = (row, col)``.

    Returns:
        float64 (h, w) in [-1, 1]; 1 at the query.
    """
    flat, (height, width) = flatten_grid(features)
    row, col = query
    if not (0 <= row < height and 0 <= col < width):
        raise IndexError(f"query {query} outside the {height} x {width} grid")
    norms = np.linalg.norm(flat, axis=1)
    norms[norms == 0] = 1.0
    unit = flat / norms[:, None]
    similarity = unit @ unit[row * width + col]
    return np.clip(similarity, -1.0, 1.0).reshape(height, width)


def labels_to_rgb(labels: np.ndarray, cmap: str = "tab10") -> np.ndarray:
    """(h, w) integer labels -> (h, w, 3) float colours from a qualitative colormap."""
    labels = np.asarray(labels)
    colours = colormaps[cmap].resampled(max(int(labels.max()) + 1, 1))
    return colours(labels)[..., :3]


# Colours of classes 1..8 in scribbles and segmentations: matplotlib's tab10 without its gray and olive, which
# vanish on gray micrographs. Class k is CLASS_COLOURS[k - 1]; 0 (unlabelled) has no colour.
CLASS_COLOURS: tuple[tuple[str, tuple[int, int, int]], ...] = (
    ("blue", (31, 119, 180)),
    ("orange", (255, 127, 14)),
    ("green", (44, 160, 44)),
    ("red", (214, 39, 40)),
    ("purple", (148, 103, 189)),
    ("brown", (140, 86, 75)),
    ("pink", (227, 119, 194)),
    ("cyan", (23, 190, 207)),
)


def to_uint8(rgb01: np.ndarray) -> np.ndarray:
    """A picture in [0, 1] (values outside clipped) as 8-bit, rounded."""
    return np.round(np.clip(rgb01, 0.0, 1.0) * 255).astype(np.uint8)


def overlay_labels(rgb01: np.ndarray, labels: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """Class colours (:data:`CLASS_COLOURS`) alpha-blended over an `(H, W, 3)` image in [0, 1]; label 0 shows the
    image unchanged.

    Returns:
        float32 (H, W, 3) in [0, 1].
    """
    labels = np.asarray(labels)
    if labels.shape != rgb01.shape[:2]:
        raise ValueError(f"labels of shape {labels.shape} do not match the image's {rgb01.shape[:2]}")
    if labels.size and (labels.min() < 0 or labels.max() > len(CLASS_COLOURS)):
        raise ValueError(f"labels must lie in 0..{len(CLASS_COLOURS)} (0 = unlabelled), "
                         f"got {labels.min()}..{labels.max()}")
    colours = np.array([(0, 0, 0)] + [rgb for _, rgb in CLASS_COLOURS], dtype=np.float32) / 255.0
    weight = np.where(labels > 0, np.float32(alpha), np.float32(0.0))[..., None]
    return (np.asarray(rgb01, dtype=np.float32) * (1.0 - weight) + colours[labels] * weight).astype(np.float32)


# --------------------------------------------------------------------------------------------------
# Plots (matplotlib Figures)
# --------------------------------------------------------------------------------------------------
def _new_figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def plot_channel_r2(
    channel_scores: ChannelScores,
    kind: str = "bar",
    top_k: int = 5,
    title: str | None = None,
) -> Figure:
    """Per-channel R^2 (from :func:`evaluation.positional_probe.per_channel_probe`).

    Args:
        channel_scores: (C,) array, or {label: (C,) array} to overlay several models / ramps.
        kind: ``"bar"`` or ``"line"``.
        top_k: annotate the indices of the k most positional channels of each series.
    """
    if kind not in ("bar", "line"):
        raise ValueError(f"kind must be 'bar' or 'line', got {kind!r}")
    series = {"R^2": channel_scores} if not isinstance(channel_scores, Mapping) else dict(channel_scores)
    figure = _new_figure(10, 3.5)
    axes = figure.add_subplot()
    for label, scores in series.items():
        scores = np.asarray(scores, dtype=np.float64)
        channels = np.arange(scores.size)
        if kind == "bar":
            axes.bar(channels, scores, width=1.0, alpha=0.6 if len(series) > 1 else 1.0, label=label)
        else:
            axes.plot(channels, scores, linewidth=1.0, label=label)
        for channel in np.argsort(-scores, kind="stable")[:top_k]:
            axes.annotate(str(channel), (channel, scores[channel]), fontsize=7, ha="center", va="bottom")
    axes.set_xlabel("channel")
    axes.set_ylabel("R$^2$")
    axes.set_xlim(-0.5, max(np.asarray(s).size for s in series.values()) - 0.5)
    if len(series) > 1:
        axes.legend()
    if title:
        axes.set_title(title)
    return figure


def plot_layer_fingerprint(
    fingerprint: Union[np.ndarray, Mapping[str, np.ndarray]],
    vmin: float = 0.0,
    vmax: float = 0.5,
    cmap: str = "viridis",
    title: str | None = None,
) -> Figure:
    """Channels x layers heat map of per-channel R^2 (from :func:`layer_fingerprint`), scale 0 to 0.5.

    Args:
        fingerprint: (C, L) array, or {model name: (C, L)} for side-by-side panels with a shared scale.
    """
    panels = {"": fingerprint} if not isinstance(fingerprint, Mapping) else dict(fingerprint)
    figure = _new_figure(2.2 * len(panels) + 1.0, 6)
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    image = None
    for axis, (label, values) in zip(axes, panels.items()):
        values = np.asarray(values)
        if values.ndim != 2:
            raise ValueError(f"fingerprint must be (C, L), got shape {values.shape}")
        image = axis.imshow(values, aspect="auto", cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
        axis.set_xlabel("layer")
        axis.set_title(label)
    axes[0].set_ylabel("channel")
    figure.colorbar(image, ax=list(axes), label="R$^2$")
    if title:
        figure.suptitle(title)
    return figure


def _as_displayable(array: np.ndarray) -> tuple[np.ndarray, dict]:
    """Pick imshow arguments for a model's map: RGB as is, integer labels through a qualitative map, floats gray.
    (Images are never maps: they are drawn through `alibi_dinov2.io.images.to_rgb01`.)"""
    array = np.asarray(array)
    if array.ndim == 3:
        return array, {}
    if np.issubdtype(array.dtype, np.integer):
        return labels_to_rgb(array), {}
    return array, {"cmap": "gray"}


def side_by_side(
    images: Sequence[np.ndarray],
    maps: Mapping[str, Sequence[np.ndarray]],
    image_titles: Sequence[str] | None = None,
    panel_size: float = 2.2,
) -> Figure:
    """Grid figure: one row per image, the image then one column per model's map.

    Args:
        images: n images, any source `alibi_dinov2.io.images` reads; drawn as the models see them (a grayscale
            micrograph stays gray, whatever its dtype).
        maps: {model name: n maps}, each RGB (h, w, 3), labels (h, w) int or values (h, w) float.
    """
    for name, model_maps in maps.items():
        if len(model_maps) != len(images):
            raise ValueError(f"{name}: {len(model_maps)} maps for {len(images)} images")
    figure = _new_figure(panel_size * (1 + len(maps)), panel_size * len(images))
    axes = figure.subplots(len(images), 1 + len(maps), squeeze=False)
    for row, image in enumerate(images):
        axes[row, 0].imshow(to_rgb01(image))
        axes[row, 0].set_ylabel(image_titles[row] if image_titles else f"image {row}")
        for column, (name, model_maps) in enumerate(maps.items(), start=1):
            shown, options = _as_displayable(model_maps[row])
            axes[row, column].imshow(shown, interpolation="nearest", **options)
            if row == 0:
                axes[row, column].set_title(name)
    axes[0, 0].set_title("image")
    for axis in axes.ravel():
        axis.set_xticks([])
        axis.set_yticks([])
    return figure


def compare_models(
    models: Mapping[str, object],
    images: Sequence[np.ndarray],
    kind: str = "pca",
    n_clusters: int = 2,
    standardised: bool = True,
    image_titles: Sequence[str] | None = None,
) -> Figure:
    """Side-by-side PCA-RGB or k-means maps of several models on several images.

    Args:
        models: {name: transformers model} (see :mod:`alibi_dinov2.features.extraction`).
        kind: ``"pca"`` or ``"kmeans"``.
    """
    from alibi_dinov2.features.extraction import extract_patch_features

    if kind not in ("pca", "kmeans"):
        raise ValueError(f"kind must be 'pca' or 'kmeans', got {kind!r}")
    maps = {}
    for name, model in models.items():
        model_maps = []
        for image in images:
            features = extract_patch_features(model, image)
            if kind == "pca":
                model_maps.append(pca_rgb(features, standardised=standardised))
            else:
                model_maps.append(kmeans_map(features, n_clusters=n_clusters, standardised=standardised))
        maps[name] = model_maps
    return side_by_side(images, maps, image_titles=image_titles)


__all__ = [
    "CLASS_COLOURS",
    "compare_models",
    "cosine_similarity_map",
    "kmeans_map",
    "labels_to_rgb",
    "overlay_labels",
    "pca_components",
    "pca_rgb",
    "plot_channel_r2",
    "plot_layer_fingerprint",
    "side_by_side",
    "standardise",
]
