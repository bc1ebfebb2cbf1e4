"""The one way the project reads images: training, evaluation, the demo and the segmentation tools all use it.

Formats: PNG, JPEG, BMP, GIF, WebP, PPM / PGM (through Pillow) and TIFF (through ``tifffile``; 8/16/32-bit
integer and float, single- or multi-page stacks). Every public function that takes an image takes a path, raw file
bytes, a ``{"bytes", "path"}`` record (an undecoded ``datasets`` Image), a PIL image, a numpy array or a torch tensor
(see :func:`load_image`).

Policy, the same everywhere (:func:`to_rgb01`, :func:`read_rgb01`):

* **Palette** images are expanded to their colours (RGB, or RGBA when the palette has transparency). Label masks
  keep their palette indices instead (:func:`read_labels`).
* **Grayscale** is replicated to three channels; **RGBA** and gray + alpha are composited onto the ImageNet mean
  colour, which normalises to zero, so transparent pixels carry no signal.
* **Intensities** become float32 in [0, 1]: ``uint8`` is divided by 255; wider unsigned integers by the largest value
  of the smallest bit depth among 8, 10, 12, 14, 16 (then 32) that holds the image's maximum, so 12-bit data stored
  in a 16-bit container (maximum <= 4095) is divided by 4095, not 65535; booleans give {0, 1}; floats already in
  [0, 1] are kept; other floats and signed integers are min-max scaled. NaN or infinite values are an error.
* **Channels-first** tensors and arrays ``(C, H, W)`` with C in 1..4 (and no such last axis) are moved to
  channels-last.

Errors: a missing file raises :class:`FileNotFoundError`; a file (or array) that cannot be decoded or used raises
:class:`ImageReadError`, whose message starts with the file's name; an image smaller than the model's patch raises
:class:`ImageTooSmallError`. Batch tools skip such inputs with a warning and a final count through
:class:`SkippedInputs` (``strict=True`` fails instead).
"""

from __future__ import annotations

import io
import logging
import os
from pathlib import Path
from typing import Any, Sequence, Union

import numpy as np


PathLike = Union[str, os.PathLike]
logger = logging.getLogger(__name__)

TIFF_SUFFIXES = (".tif", ".tiff")
PIL_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".ppm", ".pgm", ".pbm", ".pnm")
IMAGE_SUFFIXES = TIFF_SUFFIXES + PIL_SUFFIXES
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
# Bit depths tried, smallest first, when scaling unsigned integer data by its real range.
_BIT_DEPTHS = (8, 10, 12, 14, 16, 32, 64)
# Transparent pixels are composited onto this colour (the ImageNet mean, which normalises to 0).
ALPHA_BACKGROUND = (0.485, 0.456, 0.406)

# ITU-R BT.709 luma weights (the same as scikit-image's rgb2gray).
_LUMA_WEIGHTS = np.array([0.2125, 0.7154, 0.0721], dtype=np.float32)


class ImageReadError(OSError):
    """A file exists but could not be decoded as an image (or an array cannot be used as one); the message starts
    with the file's name."""


class ImageTooSmallError(ImageReadError):
    """An image smaller than one patch of the model along some side."""


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------
def _check_exists(path: Path) -> None:
    if not path.exists():
        raise FileNotFoundError(f"Image file not found: {path}")
    if path.is_dir():
        raise ImageReadError(f"Expected an image file but got a directory: {path}")


def is_tiff(path: Path) -> bool:
    """Whether `path` is a TIFF, by its suffix or its first bytes."""
    path = Path(path)
    if path.suffix.lower() in TIFF_SUFFIXES:
        return True
    with open(path, "rb") as handle:
        magic = handle.read(4)
    return magic in _TIFF_MAGIC


def _tiff_page_array(page) -> np.ndarray:
    """One TIFF page, channels last: a page stored as separate colour planes, `(S, H, W)`, becomes `(H, W, S)` as
    a page of interleaved samples is, so that both layouts read the same through every route."""
    array = np.asarray(page.asarray())
    samples = int(getattr(page, "samplesperpixel", 1))
    separate = int(getattr(page, "planarconfig", 1)) == 2
    if separate and samples > 1 and array.ndim == 3 and array.shape[0] == samples:
        array = np.moveaxis(array, 0, -1)
    return array


def _read_tiff_pages(path) -> list[np.ndarray]:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            pages = [_tiff_page_array(page) for page in tif.pages]
    except Exception as error:  # tifffile raises many error types for damaged files
        raise ImageReadError(f"{path}: not a readable TIFF ({error})") from error
    if not pages:
        raise ImageReadError(f"TIFF file {path} contains no pages")
    return pages


def _pil_frame_to_array(frame, palette: str = "colours") -> np.ndarray:
    """A PIL frame in its stored dtype; palette frames as colours (RGB / RGBA) or, for masks, as indices."""
    if frame.mode in ("P", "PA") and palette == "colours":
        has_alpha = frame.mode == "PA" or "transparency" in frame.info
        return np.asarray(frame.convert("RGBA" if has_alpha else "RGB")).copy()
    if frame.mode in ("La", "RGBa"):
        return np.asarray(frame.convert("RGBA")).copy()
    # 16-bit grayscale PNGs open as mode "I;16*" or "I" (int32); keep them as uint16 when they fit.
    if frame.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        return np.asarray(frame).astype(np.uint16)
    if frame.mode == "I":
        array = np.asarray(frame)
        if array.size and array.min() >= 0 and array.max() <= np.iinfo(np.uint16).max:
            return array.astype(np.uint16)
        return array.astype(np.int32)
    if frame.mode in ("1", "L", "P", "RGB", "RGBA", "F", "LA"):
        return np.asarray(frame).copy()
    return np.asarray(frame.convert("RGB")).copy()


def _read_pil_pages(path, palette: str = "colours") -> list[np.ndarray]:
    from PIL import Image, ImageSequence

    try:
        with Image.open(path) as image:
            pages = [_pil_frame_to_array(frame, palette) for frame in ImageSequence.Iterator(image)]
    except Exception as error:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ...
        raise ImageReadError(f"{path}: not a readable image ({error})") from error
    if not pages:
        raise ImageReadError(f"Image file {path} contains no frames")
    return pages


def _page_index(count: int, page: int | None, name, single: bool) -> int:
    """The index of the requested page of a file of `count` pages (`None`: the first; with `single`, the file must
    hold exactly one)."""
    if page is None:
        if single and count > 1:
            raise ValueError(f"{name} holds {count} pages; pass page=<index> to read_image or use read_pages()")
        return 0
    if not -count <= page < count:
        raise IndexError(f"Page {page} requested but {name} holds {count} page(s)")
    return page % count


def _read_tiff_page(source, page: int | None, name, single: bool) -> np.ndarray:
    import tifffile

    try:
        tif = tifffile.TiffFile(source)
        count = len(tif.pages)
    except Exception as error:  # tifffile raises many error types for damaged files
        raise ImageReadError(f"{name}: not a readable TIFF ({error})") from error
    with tif:
        if count == 0:
            raise ImageReadError(f"TIFF file {name} contains no pages")
        index = _page_index(count, page, name, single)
        try:
            return _tiff_page_array(tif.pages[index])
        except Exception as error:
            raise ImageReadError(f"{name}: not a readable TIFF ({error})") from error


def _read_pil_page(source, page: int | None, name, single: bool, palette: str) -> np.ndarray:
    from PIL import Image

    try:
        image = Image.open(source)
        count = getattr(image, "n_frames", 1)
    except Exception as error:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ...
        raise ImageReadError(f"{name}: not a readable image ({error})") from error
    with image:
        index = _page_index(count, page, name, single)
        try:
            image.seek(index)
            return _pil_frame_to_array(image, palette)
        except Exception as error:
            raise ImageReadError(f"{name}: not a readable image ({error})") from error


def _read_page(source, page: int | None, palette: str, name, is_tiff: bool, single: bool = False) -> np.ndarray:
    """One page of a file or stream, decoding that page only (a 1000-page stack is not read to get its first)."""
    if is_tiff:
        return _read_tiff_page(source, page, name, single)
    return _read_pil_page(source, page, name, single, palette)


def read_pages(path: PathLike, palette: str = "colours") -> list[np.ndarray]:
    """Read every page (frame) of an image file.

    Args:
        path: image file of any supported format (see the module docstring), single- or multi-page.
        palette: ``"colours"`` expands palette images to RGB(A); ``"indices"`` keeps the palette indices (masks).

    Returns:
        List of arrays, one per page, each (H, W) or (H, W, channels), in the stored dtype
        (uint8, uint16, float32, ...). Single-page formats give a one-element list.
    """
    path = Path(path)
    _check_exists(path)
    if is_tiff(path):
        return _read_tiff_pages(path)
    return _read_pil_pages(path, palette)


def read_image(path: PathLike, page: int | None = None, palette: str = "colours") -> np.ndarray:
    """Read one image in its stored dtype.

    Args:
        path: image file (see :func:`read_pages` for the formats).
        page: page index for multi-page files (negative indices count from the end). ``None`` requires
            the file to hold exactly one page; use :func:`read_pages` to get all pages of a stack.
        palette: see :func:`read_pages`.

    Returns:
        Array (H, W) or (H, W, channels).
    """
    path = Path(path)
    _check_exists(path)
    return _read_page(path, page, palette, path, is_tiff(path), single=True)


def count_pages(path: PathLike) -> int:
    """How many pages (frames) an image file holds, without decoding them.

    Raises:
        FileNotFoundError: no such file; ImageReadError: not a readable image.
    """
    path = Path(path)
    _check_exists(path)
    try:
        if is_tiff(path):
            import tifffile

            with tifffile.TiffFile(path) as tif:
                return len(tif.pages)
        from PIL import Image

        with Image.open(path) as image:
            return int(getattr(image, "n_frames", 1))
    except Exception as error:  # tifffile and PIL raise many error types for damaged files
        raise ImageReadError(f"{path}: not a readable image ({error})") from error


def _rgb_labels_to_indices(rgb: np.ndarray) -> np.ndarray:
    """Map each distinct colour to a consecutive integer; black becomes 0 (unlabelled)."""
    flat = rgb.reshape(-1, rgb.shape[-1])
    colours, inverse = np.unique(flat, axis=0, return_inverse=True)
    black = np.all(colours == 0, axis=1)
    # Order: black first (0), other colours 1..n in sorted order.
    order = np.concatenate([np.flatnonzero(black), np.flatnonzero(~black)])
    new_index = np.empty(len(colours), dtype=np.int32)
    new_index[order] = np.arange(len(colours)) + (0 if black.any() else 1)
    return new_index[inverse.ravel()].reshape(rgb.shape[:-1])


def read_labels(path: PathLike, page: int | None = None) -> np.ndarray:
    """Read a label image (integer mask) as int32.

    Integer images keep their values (0 = unlabelled, 1..K = classes). Palette PNGs give their palette
    indices. Colour-coded RGB(A) masks are mapped to consecutive integers: black -> 0 and every other
    colour, in sorted RGB order, -> 1, 2, ... Grayscale masks stored as RGB (equal channels) keep
    their gray values.

    Returns:
        int32 array (H, W).

    Raises:
        FileNotFoundError: no such file ("Label file not found: PATH").
    """
    if not Path(path).exists():
        raise FileNotFoundError(f"Label file not found: {path}")
    labels = read_image(path, page=page, palette="indices")
    if labels.ndim == 3:
        if labels.shape[-1] == 4:
            labels = labels[..., :3]
        if labels.shape[-1] == 1:
            labels = labels[..., 0]
        elif np.all(labels == labels[..., :1]):
            labels = labels[..., 0]
        else:
            return _rgb_labels_to_indices(labels)
    if labels.ndim != 2:
        raise ValueError(f"Label image {path} has shape {labels.shape}; expected (H, W)")
    if labels.dtype == bool:
        return labels.astype(np.int32)
    if np.issubdtype(labels.dtype, np.floating):
        if not np.all(np.isfinite(labels)) or not np.all(labels == np.round(labels)):
            raise ValueError(f"Label image {path} holds non-integer values; expected an integer mask")
    if labels.size and labels.min() < 0:
        raise ValueError(f"Label image {path} holds negative values; expected 0 (unlabelled) or 1..K")
    return labels.astype(np.int32)


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------
def _write_pil(path: Path, array: np.ndarray) -> None:
    from PIL import Image

    if array.dtype == np.uint16 and array.ndim == 2:
        image = Image.fromarray(array.astype(np.uint16))
    else:
        image = Image.fromarray(array)
    image.save(path)


def write_image(path: PathLike, image: Union[np.ndarray, Sequence[np.ndarray]], metadata=None) -> None:
    """Write an image (or a list of pages) keeping its dtype.

    TIFF accepts any dtype and a list of pages: pages of one shape and dtype are one stack (one series, see
    :func:`alibi_dinov2.io.tiff_stacks.write_stack`, with `metadata`, a
    :class:`~alibi_dinov2.io.tiff_stacks.StackMetadata`); pages that differ are one series each. PNG accepts uint8
    (gray, RGB, RGBA) and uint16 grayscale; JPEG accepts uint8 only (lossy: not for masks).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    pages = list(image) if isinstance(image, (list, tuple)) else [np.asarray(image)]
    if not pages:
        raise ValueError("Nothing to write: empty list of pages")
    if suffix in TIFF_SUFFIXES:
        _write_tiff(path, [np.asarray(page) for page in pages], metadata)
        return
    if suffix not in PIL_SUFFIXES:
        raise ValueError(f"Unsupported image suffix {suffix!r} for {path}; use one of {IMAGE_SUFFIXES}")
    if len(pages) != 1:
        raise ValueError(f"{suffix} files hold one page; write multi-page stacks as .tif")
    array = np.asarray(pages[0])
    if array.dtype not in (np.uint8, np.uint16) or (array.dtype == np.uint16 and array.ndim != 2):
        raise ValueError(
            f"{suffix} needs uint8 (gray/RGB/RGBA) or uint16 grayscale, got {array.dtype} {array.shape}; "
            "convert first or write a .tif"
        )
    if suffix in (".jpg", ".jpeg") and array.dtype != np.uint8:
        raise ValueError("JPEG stores 8-bit images only")
    _write_pil(path, array)


def _write_tiff(path: Path, pages: list[np.ndarray], metadata) -> None:
    import tifffile

    from alibi_dinov2.io.tiff_stacks import write_stack

    if len({(page.shape, page.dtype) for page in pages}) == 1:
        write_stack(path, pages, metadata)
        return
    with tifffile.TiffWriter(path) as tif:
        for page in pages:
            photometric = "rgb" if page.ndim == 3 and page.shape[-1] in (3, 4) else "minisblack"
            tif.write(page, photometric=photometric)


def write_mask(path: PathLike, mask: np.ndarray, metadata=None) -> None:
    """Write an integer mask losslessly: uint8 when max <= 255, else uint16 (PNG or TIFF).

    Args:
        path: ``.png`` or ``.tif``/``.tiff`` (JPEG is refused: lossy compression corrupts labels).
        mask: integer (or boolean) array (H, W) with values in [0, 65535].
        metadata: for a TIFF, the pixel size and info to record (see :func:`write_image`).
    """
    path = Path(path)
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"A mask must be 2-D (H, W), got shape {mask.shape}")
    if path.suffix.lower() not in (".png",) + TIFF_SUFFIXES:
        raise ValueError(f"Write masks as .png or .tif (lossless), not {path.suffix!r}")
    if mask.dtype == bool:
        mask = mask.astype(np.uint8)
    if not np.issubdtype(mask.dtype, np.integer):
        if not np.all(np.isfinite(mask)) or not np.all(mask == np.round(mask)):
            raise ValueError("Mask values must be integers")
    if mask.size and (mask.min() < 0 or mask.max() > np.iinfo(np.uint16).max):
        raise ValueError("Mask values must lie in [0, 65535]")
    dtype = np.uint8 if mask.size == 0 or mask.max() <= np.iinfo(np.uint8).max else np.uint16
    write_image(path, mask.astype(dtype), metadata if path.suffix.lower() in TIFF_SUFFIXES else None)


# --------------------------------------------------------------------------------------------------
# Conversions
# --------------------------------------------------------------------------------------------------
def unsigned_range(image: np.ndarray) -> int:
    """The largest value of the smallest bit depth (8, 10, 12, 14, 16, 32, 64) that holds an unsigned image's
    maximum: 4095 for 12-bit data in a 16-bit container, 255 for any uint8 image."""
    image = np.asarray(image)
    if image.dtype == np.uint8:
        return 255
    peak = int(image.max()) if image.size else 0
    for bits in _BIT_DEPTHS:
        if peak <= 2**bits - 1 and bits <= image.dtype.itemsize * 8:
            return 2**bits - 1
    return int(np.iinfo(image.dtype).max)


def to_float01(image: np.ndarray, method: str = "range", extremes: tuple[float, float] | None = None) -> np.ndarray:
    """Scale an image to float32 in [0, 1].

    Args:
        image: array of any shape.
        method: ``"range"`` (the project's rule, see the module docstring) divides unsigned integers by
            :func:`unsigned_range` (uint8 / 255, 12-bit data in uint16 / 4095, full 16-bit data / 65535), maps
            booleans to {0, 1}, keeps floats already in [0, 1] and min-max scales any other float or signed-integer
            image. ``"dtype"`` divides unsigned integers by their dtype maximum instead (uint16 / 65535).
            ``"minmax"`` always min-max scales. A constant image becomes all zeros under min-max.
        extremes: `(min, max)` of the whole image when `image` is one block of it, so that every block is scaled as
            the whole is (the bit depth of unsigned data is then read from the max).

    Returns:
        float32 array of the same shape.
    """
    if method not in ("range", "dtype", "minmax"):
        raise ValueError(f"method must be 'range', 'dtype' or 'minmax', got {method!r}")
    image = np.asarray(image)
    if image.dtype == bool:
        return image.astype(np.float32)
    if method != "minmax" and np.issubdtype(image.dtype, np.unsignedinteger):
        peak = image if extremes is None else np.array([extremes[1]], dtype=image.dtype)
        scale = unsigned_range(peak) if method == "range" else np.iinfo(image.dtype).max
        return (image.astype(np.float64) / scale).astype(np.float32)
    if not (np.issubdtype(image.dtype, np.integer) or np.issubdtype(image.dtype, np.floating)):
        raise TypeError(f"Cannot convert an image of dtype {image.dtype} to float")
    values = image.astype(np.float32)
    if values.size == 0:
        return values
    if not np.all(np.isfinite(values)):
        raise ValueError("Image contains NaN or infinite values")
    low, high = (float(values.min()), float(values.max())) if extremes is None else map(float, extremes)
    if method != "minmax" and np.issubdtype(image.dtype, np.floating) and low >= 0.0 and high <= 1.0:
        return values
    if high == low:
        return np.zeros_like(values)
    return ((values - low) / (high - low)).astype(np.float32)


def to_grayscale(image: np.ndarray) -> np.ndarray:
    """Reduce (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) to (H, W) (luma; alpha is dropped).

    The dtype is kept for (H, W) input; colour input gives float32 luma in the input's value range.
    """
    image = np.asarray(image)
    if image.ndim == 2:
        return image
    if image.ndim != 3:
        raise ValueError(f"Expected an image of shape (H, W) or (H, W, C), got shape {image.shape}")
    channels = image.shape[-1]
    if channels == 1:
        return image[..., 0]
    if channels in (3, 4):
        return image[..., :3].astype(np.float32) @ _LUMA_WEIGHTS
    raise ValueError(
        f"Expected 1 (gray), 3 (RGB) or 4 (RGBA) channels in the last axis, got {channels} "
        f"(shape {image.shape})"
    )


# --------------------------------------------------------------------------------------------------
# Any image source -> array, and the RGB policy
# --------------------------------------------------------------------------------------------------
def describe_source(source: Any) -> str:
    """A short name for an image source, for messages: the path, a record's path, or the type."""
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    if isinstance(source, dict) and source.get("path"):
        return str(source["path"])
    filename = getattr(source, "filename", None)  # a PIL image opened from a file
    if filename:
        return str(filename)
    return "image"


def _read_bytes(data: bytes, name: str | None, page: int | None, palette: str = "colours") -> np.ndarray:
    is_tiff = bool(name and Path(name).suffix.lower() in TIFF_SUFFIXES) or bytes(data[:4]) in _TIFF_MAGIC
    return _read_page(io.BytesIO(bytes(data)), page, palette, name or "image bytes", is_tiff)


def _channels_last(array: np.ndarray) -> np.ndarray:
    if array.ndim == 3 and array.shape[0] in (1, 2, 3, 4) and array.shape[-1] not in (1, 2, 3, 4):
        return np.moveaxis(array, 0, -1)
    return array


def load_image(source: Any, page: int | None = None, palette: str = "colours") -> np.ndarray:
    """Any image source -> numpy array in its stored dtype, (H, W) or (H, W, C) channels-last.

    Args:
        source: a path, raw file bytes, a ``{"bytes": ..., "path": ...}`` record, a PIL image, a numpy array or a
            torch tensor (``(H, W)``, ``(H, W, C)`` or ``(C, H, W)``, C in 1..4).
        page: page of a multi-page file (default: the first).
        palette: ``"colours"`` expands palette images to RGB(A); ``"indices"`` keeps their indices (label masks).

    Raises:
        FileNotFoundError: a path that does not exist.
        ImageReadError: anything that cannot be decoded or used as an image; the message names it.
    """
    name = describe_source(source)
    try:
        if isinstance(source, dict):
            data, path = source.get("bytes"), source.get("path")
            if data:
                return _read_bytes(data, path, page, palette)
            if not path:
                raise ImageReadError("empty image record (no bytes and no path)")
            source = path
        if isinstance(source, (str, os.PathLike)):
            path = Path(source)
            _check_exists(path)
            return _read_page(path, page, palette, source, is_tiff(path))
        if isinstance(source, (bytes, bytearray, memoryview)):
            return _read_bytes(source, None, page, palette)
        if hasattr(source, "mode") and hasattr(source, "getbands"):  # a PIL image
            return _pil_frame_to_array(source, palette)
        if type(source).__module__.startswith("torch"):
            source = source.detach().cpu().numpy()
        if isinstance(source, np.ndarray):
            return _channels_last(source)
    except (FileNotFoundError, IndexError):
        raise
    except ImageReadError as error:
        raise ImageReadError(error if str(error).startswith(name) else f"{name}: {error}") from error
    except Exception as error:  # Pillow and tifffile raise many types for damaged data
        raise ImageReadError(f"{name}: {type(error).__name__}: {error}") from error
    raise ImageReadError(f"{name}: unsupported image source of type {type(source).__name__}")


def _composite_alpha(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    background = np.asarray(ALPHA_BACKGROUND, dtype=np.float32)
    return rgb * alpha[..., None] + background * (1.0 - alpha[..., None])


def to_rgb01(image: Any, name: str | None = None, extremes: tuple[float, float] | None = None) -> np.ndarray:
    """An image (any source, see :func:`load_image`) -> ``(H, W, 3)`` float32 RGB in [0, 1], by the policy of the
    module docstring (gray replicated, alpha composited onto the ImageNet mean, high-bit data by its real range);
    `extremes` as :func:`to_float01`'s, for one block of a larger image."""
    array = np.asarray(image) if isinstance(image, np.ndarray) else load_image(image)
    array = _channels_last(array)
    name = name or describe_source(image)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (2, 3, 4)):
        raise ImageReadError(f"{name}: unsupported image layout {array.shape}; expected gray, RGB or RGBA")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ImageReadError(f"{name}: empty image of shape {array.shape}")
    try:
        unit = to_float01(array, extremes=extremes)
    except (ValueError, TypeError) as error:
        raise ImageReadError(f"{name}: {error}") from error
    if unit.ndim == 2:
        return np.repeat(unit[..., None], 3, axis=-1)
    if unit.shape[-1] == 2:
        return _composite_alpha(np.repeat(unit[..., :1], 3, axis=-1), unit[..., 1])
    if unit.shape[-1] == 4:
        return _composite_alpha(unit[..., :3], unit[..., 3])
    return unit


def read_rgb01(source: Any, page: int | None = None) -> np.ndarray:
    """:func:`load_image` then :func:`to_rgb01`: ``(H, W, 3)`` float32 in [0, 1]."""
    return to_rgb01(load_image(source, page=page), name=describe_source(source))


def check_image_size(image: np.ndarray, patch_size: int, name: str = "image") -> None:
    """Raise :class:`ImageTooSmallError` naming the image when a side is shorter than one patch."""
    height, width = np.shape(image)[:2]  # the shape alone: a lazy image stays unread
    if height < patch_size or width < patch_size:
        raise ImageTooSmallError(
            f"{name}: image of {height} x {width} px is smaller than one {patch_size} x {patch_size} patch"
        )


def list_image_files(folder: PathLike, recursive: bool = True) -> list[Path]:
    """Image files (:data:`IMAGE_SUFFIXES`) under `folder`, sorted; hidden files and folders are left out.

    Raises:
        FileNotFoundError: `folder` is not a folder. ImageReadError: it holds no image file.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"not found: {folder} (no such folder)")
    candidates = folder.rglob("*") if recursive else folder.iterdir()
    files = [
        path
        for path in candidates
        if path.suffix.lower() in IMAGE_SUFFIXES
        and not any(part.startswith(".") for part in path.relative_to(folder).parts)
        and path.is_file()
    ]
    if not files:
        raise ImageReadError(f"{folder}: no image files ({', '.join(IMAGE_SUFFIXES)})")
    return sorted(files)


class SkippedInputs:
    """The one policy of batch tools for unreadable or too-small inputs: skip each with a warning that names it
    and give a final count, or, with `strict`, fail on the first.

    Example:
        >>> skipped = SkippedInputs(strict=args.strict)
        >>> for path in paths:
        ...     try:
        ...         images.append(read_rgb01(path))
        ...     except ImageReadError as error:
        ...         skipped.add(path, error)
        >>> skipped.summarise(total=len(paths))
    """

    def __init__(self, strict: bool = False, what: str = "image") -> None:
        self.strict = strict
        self.what = what
        self.items: list[tuple[str, str]] = []

    def add(self, name: Any, error: BaseException) -> None:
        """Record a skipped input (re-raises `error` when strict)."""
        if self.strict:
            raise error
        message = str(error)
        label = describe_source(name)
        self.items.append((label, message))
        logger.warning("Skipping %s %s", self.what, message if label in message else f"{label}: {message}")

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.items]

    def __len__(self) -> int:
        return len(self.items)

    def summarise(self, total: int) -> str | None:
        """Log (and return) the final count, when anything was skipped."""
        if not self.items:
            return None
        line = (
            f"Skipped {len(self.items)} of {total} {self.what}s: {', '.join(self.names)} "
            "(pass --strict to fail instead)"
        )
        logger.warning(line)
        return line

    def as_dict(self) -> list[dict]:
        return [{"name": name, "reason": reason} for name, reason in self.items]
