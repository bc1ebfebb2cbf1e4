"""TIFF stacks as microscopy tools read them: one series of shape `(pages, H, W)` (or `(pages, H, W, 3|4)`), so
that `tifffile.imread`, napari and scripts get every page and Fiji opens a stack.

* Up to :data:`BIGTIFF_BYTES` of pixel data the file is an ImageJ hyperstack (uint8, uint16 and float32; other
  dtypes as a plain one-series TIFF), with the pixel size and unit in the tags and ImageJ's metadata.
* Above it, a BigTIFF holding one series (Fiji opens it through Bio-Formats).
* :class:`StackMetadata` carries what a derived stack keeps from its source (the page axis, the pixel size and its
  unit) and a free-text ``info`` (ImageJ's "Show Info"; the segmentation command records its segmenter there).

Note: `skimage.io.imread` moves an axis of length 3 or 4 last (its RGB convention), so a 3- or 4-page stack comes
back from it as `(H, W, pages)`; every other page count comes back as `(pages, H, W)`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Sequence, Union

import numpy as np


PathLike = Union[str, os.PathLike]

# Pixel data above this size (4 GB less room for the tags) go to a BigTIFF.
BIGTIFF_BYTES = 2**32 - 2**25
# The dtypes an ImageJ hyperstack stores.
IMAGEJ_DTYPES = (np.uint8, np.uint16, np.float32)
# Leading-axis letters tifffile reports for a series of pages, as the letter a written stack uses.
_PAGE_AXES = {"Z": "Z", "T": "T", "I": "Z", "Q": "Z", "C": "C"}
_RESOLUTION_UNITS = {2: "inch", 3: "cm"}  # TIFF ResolutionUnit: 1 none, 2 inch, 3 centimetre


@dataclass(frozen=True)
class StackMetadata:
    """What a stack says about its pages beyond the pixels.

    Attributes:
        page_axis: ``"Z"`` (slices, the default), ``"T"`` (frames) or ``"C"`` (channels).
        resolution: pixels per `unit` along x and y, or None when the source gives none.
        unit: the length unit of `resolution` (``"um"``, ``"nm"``, ``"cm"``, ``"inch"``...), or None.
        info: free text kept with the stack.
    """

    page_axis: str = "Z"
    resolution: tuple[float, float] | None = None
    unit: str | None = None
    info: str | None = None

    def with_info(self, info: str | None) -> "StackMetadata":
        return replace(self, info=info)


def read_stack_metadata(path: PathLike) -> StackMetadata:
    """The page axis, pixel size and info of a TIFF (defaults for what it does not record).

    Raises:
        OSError: not a readable TIFF.
    """
    import tifffile

    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        imagej = tif.imagej_metadata or {}
        shaped = (tif.shaped_metadata or ({},))[0] or {}
        series = tif.series[0] if tif.series else None
        axes = series.axes if series is not None and len(series.shape) >= 3 else ""
        page_axis = _PAGE_AXES.get(axes[:1], "Z") if axes and axes[0] not in "YXS" else "Z"
        resolution = _page_resolution(page)
        unit = imagej.get("unit") or shaped.get("unit")
        if unit is None and resolution is not None:
            unit = _RESOLUTION_UNITS.get(int(getattr(page, "resolutionunit", 1)))
        info = imagej.get("Info") if "Info" in imagej else shaped.get("Info")
    return StackMetadata(page_axis=page_axis, resolution=resolution, unit=unit, info=info)


def _page_resolution(page) -> tuple[float, float] | None:
    """(x, y) pixels per unit of a TIFF page, None when absent or the TIFF default of 1 per no unit."""
    x_tag, y_tag = page.tags.get("XResolution"), page.tags.get("YResolution")
    if x_tag is None or y_tag is None:
        return None
    x, y = (numerator / denominator for numerator, denominator in (x_tag.value, y_tag.value))
    if (x, y) == (1.0, 1.0) and int(getattr(page, "resolutionunit", 1)) == 1:
        return None
    return float(x), float(y)


def write_stack(path: PathLike, pages: Union[np.ndarray, Sequence[np.ndarray]], metadata: StackMetadata | None = None):
    """Write `pages` (all of one shape and dtype) as one TIFF series `(pages, H, W[, 3|4])` (one page: `(H, W[, C])`).

    Args:
        path: the `.tif` / `.tiff` file to write.
        pages: a `(pages, H, W[, C])` array or a sequence of `(H, W[, C])` pages.
        metadata: page axis, pixel size and info to record (see :class:`StackMetadata`).

    Raises:
        ValueError: no pages, or pages of different shapes or dtypes (the message names the first that differs).
    """
    import tifffile

    stack = _as_stack(pages)
    metadata = metadata or StackMetadata()
    rgb = stack.ndim == 4 and stack.shape[-1] in (3, 4)
    big = stack.nbytes > BIGTIFF_BYTES
    imagej = not big and stack.dtype.type in IMAGEJ_DTYPES and (not rgb or stack.dtype == np.uint8)
    page_axis = metadata.page_axis
    if len(stack) == 1:  # one page: an ordinary (H, W[, C]) image, which every reader returns as such
        stack, page_axis = stack[0], ""
    axes = page_axis + "YX" + ("S" if rgb else "")
    described = {"axes": axes}
    if metadata.unit:
        described["unit"] = metadata.unit
    if metadata.info is not None:
        described["Info"] = metadata.info
    options = dict(photometric="rgb" if rgb else "minisblack", metadata=described)
    if metadata.resolution is not None:
        options["resolution"] = tuple(float(value) for value in metadata.resolution)
        if not imagej:
            options["resolutionunit"] = "CENTIMETER" if metadata.unit == "cm" else "NONE"
    tifffile.imwrite(path, stack, imagej=imagej, bigtiff=big, **options)


def _as_stack(pages) -> np.ndarray:
    if isinstance(pages, np.ndarray):
        if pages.ndim < 3:
            raise ValueError(f"A stack needs a page axis: got shape {pages.shape}; write one page with write_image")
        return pages
    pages = [np.asarray(page) for page in pages]
    if not pages:
        raise ValueError("Nothing to write: empty list of pages")
    for index, page in enumerate(pages[1:], start=1):
        if page.shape != pages[0].shape or page.dtype != pages[0].dtype:
            raise ValueError(
                f"Page {index} is {page.dtype} {page.shape} but page 0 is {pages[0].dtype} {pages[0].shape}: the "
                "pages of one stack share a shape and dtype"
            )
    return np.stack(pages)
