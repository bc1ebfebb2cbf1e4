"""The demo's segmentation view: scribbles drawn in the image editor train one segmenter per model, whose masks
come back overlaid on the image, side by side, with the area fraction of every class and the files to download.

Colour k of :data:`alibi_dinov2.features.visualisation.CLASS_COLOURS` (blue, orange, green, red, purple, brown, pink,
cyan) is class k; a pixel of a scribble layer is scribbled when its alpha is at least :data:`MIN_ALPHA` (half opaque)
and takes the class of the nearest of those colours, when one lies within :data:`MAX_COLOUR_DISTANCE` (the brush's
antialiased edges and lossy copies keep their class; the faint rim and foreign colours stay unlabelled).

The image segmented is the full-precision array (a 16-bit TIFF stays 16-bit); the editor shows a picture of it
shrunk to :data:`EDITOR_MAX_SIDE`, and scribbles drawn on that picture are scaled back to the image's pixels.
Features are computed at full size, in one pass (no tiles), once per image, model and feature set: a
:class:`~alibi_dinov2.features.cache.FeatureCache` keeps them while scribbles are added.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

import numpy as np

from alibi_dinov2.features.preprocessing import resize_nearest, shrink_to_max_side, shrunk_size
from alibi_dinov2.features.visualisation import CLASS_COLOURS, overlay_labels, to_uint8
from alibi_dinov2.io.images import to_rgb01
from alibi_dinov2.segmentation import interactive
from alibi_dinov2.segmentation.interactive import area_fractions
from alibi_dinov2.segmentation.trainable import TrainableSegmenter


FEATURE_SETS = ("classical", "classical+vit")
MASK_FORMATS = {"PNG": ".png", "TIFF": ".tif"}
EDITOR_MAX_SIDE = 1024  # the picture in the editor and the overlays; the segmentation runs at full size
MIN_ALPHA = 128
MAX_COLOUR_DISTANCE = 64.0  # RGB levels; the palette's two closest colours (blue, cyan) are 76 apart
MIN_SIDE = 16
KEPT_RUNS = 8  # download folders of recent runs kept on disk
CLASSICAL_ONLY = "classical features"  # the one result of the classical set, the same for every model
FEATURE_SET_TITLES = {"classical": "classical features", "classical+vit": "classical + ViT features"}
BRUSH_SIZE = 6  # px on the editor's picture: thin scribbles, as trainable segmentation wants them

Progress = Callable[[float, str], None]


@dataclass
class Segmentation:
    """One model's result: its trained segmenter and the mask of the whole image (class values 1..8)."""

    name: str
    segmenter: TrainableSegmenter
    mask: np.ndarray


def class_name(value: int) -> str:
    """``"class 2 (orange)"``."""
    return f"class {value} ({CLASS_COLOURS[value - 1][0]})"


def hex_colours() -> list[str]:
    """The brush's colours, class 1 first."""
    return ["#{:02x}{:02x}{:02x}".format(*rgb) for _, rgb in CLASS_COLOURS]


def legend_html() -> str:
    """The palette as numbered swatches, class 1 to 8, for the page beside the editor (whose brush colours carry no
    labels)."""
    swatches = "".join(
        f'<span style="display:inline-flex;align-items:center;margin:0 14px 4px 0;white-space:nowrap">'
        f'<span style="display:inline-block;min-width:22px;height:22px;line-height:22px;border-radius:4px;'
        f'background:{code};color:#fff;font-weight:700;text-align:center;margin-right:5px">{index}</span>'
        f"class {index} ({html.escape(name)})</span>"
        for index, ((name, _), code) in enumerate(zip(CLASS_COLOURS, hex_colours()), start=1)
    )
    return f'<div class="class-legend">{swatches}</div>'


def result_caption(result: "Segmentation") -> str:
    """A result's caption on the page: the model and its features, or the classical features alone (one result,
    whatever the models)."""
    title = FEATURE_SET_TITLES[result.segmenter.features]
    return f"{title} (no model)" if result.name == CLASSICAL_ONLY else f"{result.name}: {title}"


def editor_picture(image: np.ndarray, max_side: int = EDITOR_MAX_SIDE) -> np.ndarray:
    """The 8-bit RGB picture of any image the editor shows, shrunk to `max_side` on its longer side."""
    return to_uint8(shrink_to_max_side(to_rgb01(image), max_side))


def editor_value(image: np.ndarray, max_side: int = EDITOR_MAX_SIDE) -> dict:
    """The editor's value showing `image` (no scribbles yet)."""
    picture = editor_picture(image, max_side)
    return {"background": picture, "layers": [], "composite": picture}


def shows_image(background: np.ndarray, image: np.ndarray, max_side: int = EDITOR_MAX_SIDE) -> bool:
    """Whether the editor's picture is :func:`editor_picture` of `image` (the browser returns it unchanged)."""
    picture, shown = editor_picture(image, max_side), np.asarray(background)
    if shown.ndim != 3 or shown.shape[:2] != picture.shape[:2] or shown.shape[-1] not in (3, 4):
        return False
    return int(np.abs(shown[..., :3].astype(np.int16) - picture).max()) <= 2


def image_of_background(background: np.ndarray) -> np.ndarray:
    """The editor's picture as the image to segment: an opaque alpha channel dropped, equal channels made gray (a
    gray picture comes back from the browser as RGBA)."""
    image = np.asarray(background)
    opaque = np.iinfo(image.dtype).max if np.issubdtype(image.dtype, np.integer) else 1.0
    if image.ndim == 3 and image.shape[-1] in (2, 4) and np.all(image[..., -1] == opaque):
        image = image[..., :-1]
    if image.ndim == 3 and np.all(image == image[..., :1]):
        image = image[..., 0]
    return image


def image_to_segment(background, chosen=None, chosen_name: str = "the chosen file") -> np.ndarray:
    """The image a run segments: the chosen file's full-precision array when there is one (the editor, if it shows
    a picture, must show that file's), else the editor's picture.

    Raises:
        ValueError: no image at all, or an editor picture that is not the chosen file's; the message says what to do.
    """
    if chosen is not None:
        if background is not None and not shows_image(background, chosen):
            raise ValueError(f"The editor shows another picture than the chosen file {chosen_name}: clear the file "
                             "box to segment the editor's picture, or choose the file again")
        return np.asarray(chosen)
    if background is None:
        raise ValueError("Upload a micrograph into the editor or choose a file, then draw scribbles on it")
    return image_of_background(background)


def layer_classes(layer: np.ndarray) -> np.ndarray:
    """One RGBA scribble layer -> int32 classes at its size (0 = unlabelled), by the rule of the module docstring."""
    layer = np.asarray(layer)
    if layer.ndim != 3 or layer.shape[-1] != 4:
        raise ValueError(f"a scribble layer must be an RGBA picture; got shape {layer.shape}")
    opaque = layer[..., 3] >= MIN_ALPHA
    rgb = layer[opaque][:, :3].astype(np.float32)  # scribbles are sparse: only their pixels are compared
    nearest = np.zeros(len(rgb), dtype=np.int32)
    best = np.full(len(rgb), MAX_COLOUR_DISTANCE**2, dtype=np.float32)
    for value, (_, colour) in enumerate(CLASS_COLOURS, start=1):
        distance = np.sum((rgb - np.asarray(colour, dtype=np.float32)) ** 2, axis=-1)
        closer = distance <= best
        nearest[closer], best[closer] = value, distance[closer]
    classes = np.zeros(layer.shape[:2], dtype=np.int32)
    classes[opaque] = nearest
    return classes


def scribble_layer(labels: np.ndarray) -> np.ndarray:
    """Labels (0 = unlabelled, 1..8 = classes) -> the RGBA scribble layer the editor would give for them: what a
    script sends the page (a mask of scribbles, drawn in the class colours on a transparent picture)."""
    labels = np.asarray(labels)
    if labels.size and (labels.min() < 0 or labels.max() > len(CLASS_COLOURS)):
        raise ValueError(f"scribble labels must lie in 0..{len(CLASS_COLOURS)}")
    colours = np.array([(0, 0, 0, 0)] + [(*rgb, 255) for _, rgb in CLASS_COLOURS], dtype=np.uint8)
    return colours[labels]


def scribble_labels(layers: Sequence[np.ndarray], image_shape: tuple[int, ...],
                    max_side: int = EDITOR_MAX_SIDE) -> np.ndarray:
    """The editor's scribble layers -> int32 labels of the image's size (later layers drawn over earlier ones).

    Layers are drawn on the image itself or on its editor picture (:func:`editor_picture`), whose scribbles are
    scaled to the image by nearest neighbour.

    Raises:
        ValueError: a layer of another size, naming both.
    """
    height, width = image_shape[:2]
    accepted = {(height, width), shrunk_size(height, width, max_side)}
    labels = np.zeros((height, width), dtype=np.int32)
    for layer in layers:
        classes = layer_classes(layer)
        if classes.shape not in accepted:
            raise ValueError(
                f"the scribbles are drawn on a {classes.shape[1]} x {classes.shape[0]} px picture but the image is "
                f"{width} x {height} px; draw them on this image (choose the file again to show it in the editor)"
            )
        classes = resize_nearest(classes, (height, width))
        labels = np.where(classes > 0, classes, labels)
    return labels


def check_scribbles(labels: np.ndarray) -> list[int]:
    """The scribbled classes, sorted; a ValueError saying what to draw when fewer than two are scribbled."""
    return interactive.check_scribbles(labels, class_name)


def check_image(image: np.ndarray) -> np.ndarray:
    """The image as an array; a ValueError naming its size when it is too small to segment."""
    image = np.asarray(image)
    height, width = image.shape[:2]
    if min(height, width) < MIN_SIDE:
        raise ValueError(f"The image of {width} x {height} px is too small: segmentation needs at least {MIN_SIDE} px "
                         "on each side")
    return image


def segment_image(
    image: np.ndarray,
    labels: np.ndarray,
    models: Mapping[str, tuple[object, object]],
    feature_set: str,
    feature_cache=None,
    progress: Optional[Progress] = None,
) -> list[Segmentation]:
    """Train a segmenter on the scribbles (`labels`: 0 = unlabelled, 1..8 = classes) for each model and segment the
    whole image.

    Args:
        models: display name -> (model, image statistics or None), as `alibi_dinov2.hub.models.load_model` returns;
            with ``"classical"`` features there is one result, `CLASSICAL_ONLY`, whatever the models.
        feature_cache: a `FeatureCache` that keeps the features for the next run on the same image.
        progress: called with (fraction done, what runs now).
    """
    if feature_set not in FEATURE_SETS:
        raise ValueError(f"feature set must be one of {', '.join(FEATURE_SETS)}; got {feature_set!r}")
    check_image(image)
    check_scribbles(labels)
    if feature_set == "classical":
        jobs = {CLASSICAL_ONLY: (None, None)}
    elif models:
        jobs = dict(models)
    else:
        raise ValueError("Pick at least one model for classical + ViT features")
    results = []
    for index, (name, (model, statistics)) in enumerate(jobs.items()):
        segmenter = TrainableSegmenter(features=feature_set, model=model, image_processor=statistics,
                                       feature_cache=feature_cache)
        if progress is not None:
            stage = "training on the scribbles" if segmenter.features_cached(image) else "computing features (once)"
            progress(index / len(jobs), f"{name}: {stage}")
        segmenter.fit(image, labels)
        results.append(Segmentation(name, segmenter, segmenter.predict(image)))
    return results


def table_headers(classes: Sequence[int]) -> list[str]:
    """Headers of the area table: the model, then one column per class."""
    return ["model"] + [f"{class_name(value)} area" for value in classes]


def file_stem(name: str) -> str:
    """A model's display name as a file-name stem."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "model"


def save_results(results: Sequence[Segmentation], folder: Path, mask_format: str = "PNG") -> list[Path]:
    """Per result, its segmenter (`NAME-segmenter.zip`) and its mask (`NAME-mask.png` or `.tif`) in `folder`."""
    from alibi_dinov2.io.images import write_mask

    if mask_format not in MASK_FORMATS:
        raise ValueError(f"mask format must be one of {', '.join(MASK_FORMATS)}; got {mask_format!r}")
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for result in results:
        stem = file_stem(result.name)
        result.segmenter.save(folder / f"{stem}-segmenter.zip")
        write_mask(folder / f"{stem}-mask{MASK_FORMATS[mask_format]}", result.mask)
        files += [folder / f"{stem}-segmenter.zip", folder / f"{stem}-mask{MASK_FORMATS[mask_format]}"]
    return files


def new_run_folder(root: Path, keep: int = KEPT_RUNS) -> Path:
    """A fresh folder under `root` for one run's downloads (`run-000001`, ...), after removing all but the newest
    `keep - 1` earlier ones: the page serves copies of the files, so only recent runs need theirs."""
    import shutil

    root.mkdir(parents=True, exist_ok=True)
    runs = sorted(path for path in root.glob("run-*") if path.is_dir() and path.name[4:].isdigit())
    for old in runs[: max(0, len(runs) - keep + 1)]:
        shutil.rmtree(old, ignore_errors=True)
    number = int(runs[-1].name[4:]) + 1 if runs else 1
    folder = root / f"run-{number:06d}"
    folder.mkdir()
    return folder


def render_segmentations(
    image: np.ndarray, results: Sequence[Segmentation], classes: Sequence[int], max_side: int = EDITOR_MAX_SIDE
) -> tuple[list[tuple[np.ndarray, str]], list[str], list[list]]:
    """What the page shows of the results.

    Returns:
        gallery: per result, `(uint8 picture, caption)`: its mask overlaid on the image, shrunk to `max_side`.
        headers, rows: one row per result, its name and the area fraction of each scribbled class.
    """
    picture = shrink_to_max_side(to_rgb01(image), max_side)
    gallery, rows = [], []
    for result in results:
        shown = resize_nearest(result.mask, picture.shape[:2])
        gallery.append((to_uint8(overlay_labels(picture, shown)), result_caption(result)))
        rows.append([result.name] + [round(value, 4) for value in area_fractions(result.mask, classes)])
    return gallery, table_headers(classes), rows


def run_segmentation(
    image: np.ndarray,
    layers: Sequence[np.ndarray],
    models: Mapping[str, tuple[object, object]],
    feature_set: str,
    output_folder: Path,
    mask_format: str = "PNG",
    feature_cache=None,
    progress: Optional[Progress] = None,
):
    """The whole view for one image and its scribble layers: `render_segmentations`' gallery, headers and rows, and
    the files of `save_results`."""
    image = check_image(image)
    labels = scribble_labels(layers, image.shape)
    results = segment_image(image, labels, models, feature_set, feature_cache, progress)
    gallery, headers, rows = render_segmentations(image, results, check_scribbles(labels))
    return gallery, headers, rows, save_results(results, output_folder, mask_format)

