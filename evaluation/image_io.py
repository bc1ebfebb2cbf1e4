"""Reading and writing the image files microscopists use.

Supported:

* PNG / JPEG / BMP / GIF (through Pillow), 8-bit and 16-bit grayscale, RGB and RGBA;
* TIFF (through ``tifffile``), any bit depth, single- or multi-page (stacks);
* label images (integer masks, 0 = unlabelled, 1..K = classes), also palette PNGs and colour-coded
  RGB masks;
* output masks written as PNG (uint8 when the values fit, else uint16) or TIFF.

Every reader raises :class:`ImageReadError` naming the file when the file exists but cannot be decoded,
and :class:`FileNotFoundError` when it does not exist.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence, Union

import numpy as np

PathLike = Union[str, os.PathLike]

TIFF_SUFFIXES = (".tif", ".tiff")
PIL_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
IMAGE_SUFFIXES = TIFF_SUFFIXES + PIL_SUFFIXES

# ITU-R BT.709 luma weights (the same as scikit-image's rgb2gray).
_LUMA_WEIGHTS = np.array([0.2125, 0.7154, 0.0721], dtype=np.float32)


class ImageReadError(OSError):
    """A file exists but could not be decoded as an image."""


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------
def _check_exists(path: Path) -> None:
    if not path.exists():
        raise FileNotFoundError(f"Image file not found: {path}")
    if path.is_dir():
        raise ImageReadError(f"Expected an image file but got a directory: {path}")


def _is_tiff(path: Path) -> bool:
    if path.suffix.lower() in TIFF_SUFFIXES:
        return True
    with open(path, "rb") as handle:
        magic = handle.read(4)
    return magic in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def _read_tiff_pages(path: Path) -> list[np.ndarray]:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            pages = [page.asarray() for page in tif.pages]
    except Exception as error:  # tifffile raises many error types for damaged files
        raise ImageReadError(f"Could not read TIFF file {path}: {error}") from error
    if not pages:
        raise ImageReadError(f"TIFF file {path} contains no pages")
    return [np.asarray(page) for page in pages]


def _pil_frame_to_array(frame) -> np.ndarray:
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


def _read_pil_pages(path: Path) -> list[np.ndarray]:
    from PIL import Image, ImageSequence

    try:
        with Image.open(path) as image:
            pages = [_pil_frame_to_array(frame) for frame in ImageSequence.Iterator(image)]
    except Exception as error:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ...
        raise ImageReadError(f"Could not read image file {path}: {error}") from error
    if not pages:
        raise ImageReadError(f"Image file {path} contains no frames")
    return pages


def read_pages(path: PathLike) -> list[np.ndarray]:
    """Read every page (frame) of an image file.

    Args:
        path: PNG, JPEG, TIFF (single- or multi-page), BMP or GIF file.

    Returns:
        List of arrays, one per page, each (H, W) or (H, W, channels), in the stored dtype
        (uint8, uint16, float32, ...). Single-page formats give a one-element list.
    """
    path = Path(path)
    _check_exists(path)
    if _is_tiff(path):
        return _read_tiff_pages(path)
    return _read_pil_pages(path)


def read_image(path: PathLike, page: int | None = None) -> np.ndarray:
    """Read one image in its stored dtype.

    Args:
        path: image file (see :func:`read_pages` for the formats).
        page: page index for multi-page files (negative indices count from the end). ``None`` requires
            the file to hold exactly one page; use :func:`read_pages` to get all pages of a stack.

    Returns:
        Array (H, W) or (H, W, channels).
    """
    pages = read_pages(path)
    if page is None:
        if len(pages) > 1:
            raise ValueError(
                f"{path} holds {len(pages)} pages; pass page=<index> to read_image or use read_pages()"
            )
        return pages[0]
    if not -len(pages) <= page < len(pages):
        raise IndexError(f"Page {page} requested but {path} holds {len(pages)} page(s)")
    return pages[page]


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
    """
    labels = read_image(path, page=page)
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


def write_image(path: PathLike, image: Union[np.ndarray, Sequence[np.ndarray]]) -> None:
    """Write an image (or a list of pages) keeping its dtype.

    TIFF accepts any dtype and a list of pages (a multi-page file). PNG accepts uint8 (gray, RGB,
    RGBA) and uint16 grayscale; JPEG accepts uint8 only (lossy: not for masks).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    pages = list(image) if isinstance(image, (list, tuple)) else [np.asarray(image)]
    if not pages:
        raise ValueError("Nothing to write: empty list of pages")
    if suffix in TIFF_SUFFIXES:
        import tifffile

        with tifffile.TiffWriter(path) as tif:
            for page in pages:
                page = np.asarray(page)
                photometric = "rgb" if page.ndim == 3 and page.shape[-1] in (3, 4) else "minisblack"
                tif.write(page, photometric=photometric)
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


def write_mask(path: PathLike, mask: np.ndarray) -> None:
    """Write an integer mask losslessly: uint8 when max <= 255, else uint16 (PNG or TIFF).

    Args:
        path: ``.png`` or ``.tif``/``.tiff`` (JPEG is refused: lossy compression corrupts labels).
        mask: integer (or boolean) array (H, W) with values in [0, 65535].
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
    write_image(path, mask.astype(dtype))


# --------------------------------------------------------------------------------------------------
# Conversions
# --------------------------------------------------------------------------------------------------
def to_float01(image: np.ndarray, method: str = "dtype") -> np.ndarray:
    """Scale an image to float32 in [0, 1].

    Args:
        image: array of any shape.
        method: ``"dtype"`` divides unsigned integers by their dtype maximum (uint8 / 255,
            uint16 / 65535), maps booleans to {0, 1}, keeps floats already in [0, 1] and min-max
            scales any other float or signed-integer image. ``"minmax"`` always min-max scales (useful
            for 12-bit data stored in uint16). A constant image becomes all zeros under min-max.

    Returns:
        float32 array of the same shape.
    """
    if method not in ("dtype", "minmax"):
        raise ValueError(f"method must be 'dtype' or 'minmax', got {method!r}")
    image = np.asarray(image)
    if image.dtype == bool:
        return image.astype(np.float32)
    if method == "dtype" and np.issubdtype(image.dtype, np.unsignedinteger):
        return (image.astype(np.float64) / np.iinfo(image.dtype).max).astype(np.float32)
    if not (np.issubdtype(image.dtype, np.integer) or np.issubdtype(image.dtype, np.floating)):
        raise TypeError(f"Cannot convert an image of dtype {image.dtype} to float")
    values = image.astype(np.float32)
    if values.size == 0:
        return values
    if not np.all(np.isfinite(values)):
        raise ValueError("Image contains NaN or infinite values")
    low, high = float(values.min()), float(values.max())
    if method == "dtype" and np.issubdtype(image.dtype, np.floating) and low >= 0.0 and high <= 1.0:
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
