"""Images read and written chunk by chunk, for images larger than memory: TIFF pages through tifffile's zarr
interface, zarr arrays, and OME-Zarr images (OME-NGFF 0.4: zarr format 2, a group whose `multiscales` attribute
names its levels and their pixel size).

    image = read_tiff_page_lazily("mosaic.tif", page=0)         # dask (H, W[, C]): its tiles or strips, on demand
    image, metadata = read_zarr_image("mosaic.ome.zarr")       # dask (H, W[, C]) or (pages, H, W), its pixel size
    level = create_ome_zarr("mask.ome.zarr", (H, W), np.uint8, chunks=(2048, 2048), metadata=metadata)
    dask.array.store(mask, level)                                # written block by block

A TIFF page is read by the chunks it is stored in: tiles, or strips of rows (a page stored as one strip is one chunk,
read whole). Pages stored as separate colour planes read channels last, as :mod:`alibi_dinov2.io.images` reads them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Union

import numpy as np

from alibi_dinov2.io.images import ImageReadError
from alibi_dinov2.io.tiff_stacks import StackMetadata


PathLike = Union[str, os.PathLike]

NGFF_VERSION = "0.4"
# OME-NGFF names units by their UDUNITS-2 names; TIFF and ImageJ by short ones.
_NGFF_UNITS = {"um": "micrometer", "µm": "micrometer", "\\u00B5m": "micrometer", "micron": "micrometer",
               "nm": "nanometer", "mm": "millimeter", "cm": "centimeter", "m": "meter", "inch": "inch",
               "pm": "picometer", "A": "angstrom"}  # fmt: skip
_SHORT_UNITS = {"micrometer": "um", "nanometer": "nm", "millimeter": "mm", "centimeter": "cm", "meter": "m",
                "inch": "inch", "picometer": "pm", "angstrom": "A"}  # fmt: skip


class TiffPageChunks:
    """One page of a TIFF as an array read by chunks (its tiles or strips) through tifffile's zarr interface.

    It holds the path and page only, and reopens the file where it is unpickled, so that dask.distributed workers
    can read it.
    """

    def __init__(self, path: PathLike, page: int = 0):
        self.path, self.page = str(path), int(page)
        self._open()

    def _open(self) -> None:
        import tifffile
        import zarr

        try:
            with tifffile.TiffFile(self.path) as tif:
                page = tif.pages[self.page]
                samples = int(getattr(page, "samplesperpixel", 1))
                self.separate_planes = samples > 1 and int(getattr(page, "planarconfig", 1)) == 2
            self._array = zarr.open(tifffile.imread(self.path, key=self.page, aszarr=True), mode="r")
        except Exception as error:  # tifffile raises many error types for damaged files
            raise ImageReadError(f"{self.path}: not a readable TIFF page {self.page} ({error})") from error
        self.shape, self.dtype, self.chunks = self._array.shape, self._array.dtype, self._array.chunks
        self.ndim = len(self.shape)

    def __getitem__(self, key) -> np.ndarray:
        try:
            return np.asarray(self._array[key])
        except Exception as error:  # a damaged tile or strip
            raise ImageReadError(f"{self.path}: page {self.page} cannot be read ({error})") from error

    def __getstate__(self) -> dict:
        return {"path": self.path, "page": self.page}

    def __setstate__(self, state: dict) -> None:
        self.path, self.page = state["path"], state["page"]
        self._open()

    def __dask_tokenize__(self):
        stat = os.stat(self.path)
        return (type(self).__name__, self.path, self.page, stat.st_mtime_ns, stat.st_size)


def read_tiff_page_lazily(path: PathLike, page: int = 0):
    """Page `page` of a TIFF as a lazy dask array `(H, W)` or `(H, W, C)` whose blocks are the page's tiles or
    strips, read only when a computation needs them.

    Raises:
        ImageReadError: not a readable TIFF, naming it.
    """
    import dask.array as da

    chunks = TiffPageChunks(path, page)
    array = da.from_array(chunks, chunks=chunks.chunks, asarray=False, name=f"tiff-{Path(path).name}-{page}-"
                          + da.core.tokenize(chunks))  # fmt: skip
    return da.moveaxis(array, 0, -1) if chunks.separate_planes and array.ndim == 3 else array


def _level_metadata(attributes: dict) -> tuple[str | None, StackMetadata]:
    """(path of the full-resolution level, its pixel size) from an OME-Zarr group's attributes, or (None, ...)."""
    multiscales = attributes.get("multiscales") or attributes.get("ome", {}).get("multiscales")
    if not multiscales:
        return None, StackMetadata()
    first = multiscales[0]
    level = first["datasets"][0]
    scale = next((transform["scale"] for transform in level.get("coordinateTransformations", [])
                  if transform.get("type") == "scale"), None)  # fmt: skip
    axes = first.get("axes") or []
    unit = next((axis.get("unit") for axis in axes[-2:] if isinstance(axis, dict) and axis.get("unit")), None)
    resolution = (1.0 / scale[-1], 1.0 / scale[-2]) if scale and min(scale[-2:]) > 0 else None
    return level["path"], StackMetadata(resolution=resolution, unit=_SHORT_UNITS.get(unit, unit))


def read_zarr_image(path: PathLike):
    """A zarr array, or the full-resolution level of an OME-Zarr image, as a lazy dask array (OME-Zarr's singleton
    t, c, z axes dropped) and its pixel size (a :class:`StackMetadata`).

    Raises:
        ImageReadError: a zarr group that is no OME-Zarr image, or no zarr at all, naming it.
    """
    import dask.array as da
    import zarr

    try:
        node = zarr.open(str(path), mode="r")
    except Exception as error:  # zarr raises many error types for what is not a zarr
        raise ImageReadError(f"{path}: not a readable zarr ({error})") from error
    component, metadata = None, StackMetadata()
    if isinstance(node, zarr.Group):
        component, metadata = _level_metadata(dict(node.attrs))
        if component is None:
            raise ImageReadError(f"{path} is a zarr group without OME-Zarr multiscales: give the path of its array")
    image = da.from_zarr(str(path), component=component)
    while image.ndim > 2 and image.shape[0] == 1:
        image = image[0]
    return image, metadata


def create_ome_zarr(
    path: PathLike,
    shape: tuple[int, ...],
    dtype,
    chunks: tuple[int, ...],
    metadata: StackMetadata | None = None,
    attributes: dict | None = None,
    name: str | None = None,
):
    """An empty OME-NGFF 0.4 image at `path` (zarr format 2, '/' chunk keys) with one level, `"0"`, of `shape`:
    axes `yx`, or `zyx` (`tyx`, `cyx` by `metadata.page_axis`) for pages; the pixel size of `metadata` as the
    level's scale, with its unit; `attributes` (e.g. the provenance of a mask) kept in the group's attributes; `name`
    the image's (default: the folder's).
    Returns the level's zarr array, for the caller to write block by block (`dask.array.store`)."""
    import zarr

    metadata = metadata or StackMetadata()
    unit = _NGFF_UNITS.get(metadata.unit, metadata.unit) if metadata.resolution else None
    space = [{"name": name, "type": "space", **({"unit": unit} if unit else {})} for name in ("y", "x")]
    page_axis = {"Z": ("z", "space"), "T": ("t", "time"), "C": ("c", "channel")}[metadata.page_axis]
    axes = space if len(shape) == 2 else [{"name": page_axis[0], "type": page_axis[1]}, *space]
    scale = [1.0] * (len(shape) - 2)
    scale += [1.0 / metadata.resolution[1], 1.0 / metadata.resolution[0]] if metadata.resolution else [1.0, 1.0]
    group = zarr.open_group(str(path), mode="w", zarr_format=2)
    level = group.create_array(
        "0", shape=shape, dtype=dtype, chunks=chunks, fill_value=0,
        chunk_key_encoding={"name": "v2", "separator": "/"},
    )  # fmt: skip
    group.attrs.update({
        **(attributes or {}),
        "multiscales": [{
            "version": NGFF_VERSION, "name": name or Path(path).name, "axes": axes,
            "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": scale}]}],
        }],
    })  # fmt: skip
    return level


__all__ = [
    "NGFF_VERSION",
    "TiffPageChunks",
    "create_ome_zarr",
    "read_tiff_page_lazily",
    "read_zarr_image",
]
