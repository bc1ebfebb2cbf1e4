"""The one preprocessing path: RGB in [0, 1] (from :mod:`alibi_dinov2.io.images`) -> normalised pixel values.

The statistics come from the image processor that every saved model folder carries (`AutoImageProcessor`:
`image_mean`, `image_std`), ImageNet's when a model has none. Geometry is done in float32 with torch (bicubic or
bilinear, antialiased), so that 16-bit precision survives, which the processor's 8-bit PIL path would lose:

* ``"patch_grid"``: no resize; crop (top-left anchored) to a multiple of the patch size, what a stride-p patch
  convolution sees anyway (dense features of a whole micrograph): a 300 x 451 px image at patch 14 loses its last
  6 rows and 3 columns (294 x 448 px, a 21 x 32 grid). :func:`crop_to_patch_grid` does it, and says so with one
  :class:`PatchGridCropWarning` per image size (`warnings.filterwarnings("ignore", category=PatchGridCropWarning)`
  silences it; pad or resize the image to a multiple of the patch size to keep every pixel);
* ``"center_crop"``: shortest side to `size`, then the central `size x size` square (distillation, DINOv2's recipe);
* ``"resize"``: squash to `size x size` (segmentation probes).

    pixel_values = to_pixel_values(read_rgb01("micrograph.tif"), mode="patch_grid", patch_size=14)
"""

from __future__ import annotations

import warnings
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from alibi_dinov2.io.images import check_image_size


IMAGENET_MEAN: tuple[float, ...] = tuple(IMAGENET_DEFAULT_MEAN)
IMAGENET_STD: tuple[float, ...] = tuple(IMAGENET_DEFAULT_STD)
RESIZE_MODES = ("patch_grid", "center_crop", "resize")


class PatchGridCropWarning(UserWarning):
    """An image cropped to the patch grid: the model does not see its last rows or columns (less than a patch)."""


# (height, width, patch size) of the crops announced so far: each is said once per process, whatever the warning
# filters (libraries that reset them, as scikit-learn's `catch_warnings` does, would repeat it for every image).
ANNOUNCED_CROPS: set[tuple[int, int, int]] = set()


def crop_to_patch_grid(image, patch_size: int, name: str = "image"):
    """Crop an (H, W[, ...]) array or tensor to (H // p * p, W // p * p), keeping the top-left corner: the one place
    images are cropped to the patch grid. A crop is announced by a :class:`PatchGridCropWarning` naming the size,
    the crop and how to avoid it, once per size and process (:data:`ANNOUNCED_CROPS`) however many images have
    that size.

    Raises:
        ImageTooSmallError: the image is smaller than one patch along some side (the message names `name`).
    """
    check_image_size(image, patch_size, name)
    height, width = image.shape[:2]
    kept_h, kept_w = height // patch_size * patch_size, width // patch_size * patch_size
    if (kept_h, kept_w) != (height, width) and (height, width, patch_size) not in ANNOUNCED_CROPS:
        ANNOUNCED_CROPS.add((height, width, patch_size))
        warnings.warn(
            f"images of {height} x {width} px are cropped to {kept_h} x {kept_w} px, the {patch_size} px patch grid "
            f"({kept_h // patch_size} x {kept_w // patch_size} patches): the model does not see the last "
            f"{height - kept_h} row(s) and {width - kept_w} column(s); pad or resize to a multiple of {patch_size} px "
            f"(e.g. {-(-height // patch_size) * patch_size} x {-(-width // patch_size) * patch_size}) to keep them",
            PatchGridCropWarning,
            stacklevel=2,
        )
    return image[:kept_h, :kept_w]


def dinov2_image_processor():
    """DINOv2's image processor (shortest side 256, centre crop 224, bicubic, ImageNet statistics): what every
    converted or distilled folder carries. For dense features pass `do_center_crop=False` (and `do_resize=False` to
    keep the native size). The class is the one that needs no torchvision (transformers' PIL backend, saved under
    the name `BitImageProcessor`, so the folder loads anywhere)."""
    try:
        from transformers import BitImageProcessorPil as BitImageProcessor
    except ImportError:  # transformers releases whose BitImageProcessor is the PIL one
        from transformers import BitImageProcessor

    return BitImageProcessor(
        do_resize=True,
        size={"shortest_edge": 256},
        resample=3,  # bicubic
        do_center_crop=True,
        crop_size={"height": 224, "width": 224},
        do_rescale=True,
        do_normalize=True,
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
        do_convert_rgb=True,
    )


def stored_image_processor(name_or_folder: str, **kwargs):
    """The image processor stored with a model (`AutoImageProcessor.from_pretrained(name_or_folder)`), or None when
    the source has none. Where its class cannot be built in this environment (DINOv3's processors need torchvision),
    the settings of its `preprocessor_config.json` as a dict, which carries `image_mean` and `image_std` all the same
    (see :func:`image_statistics`)."""
    from transformers import AutoImageProcessor
    from transformers.image_processing_base import ImageProcessingMixin

    try:
        return AutoImageProcessor.from_pretrained(name_or_folder, **kwargs)
    except ImportError:
        return ImageProcessingMixin.get_image_processor_dict(name_or_folder, **kwargs)[0]
    except (OSError, ValueError, KeyError):
        return None


def load_image_processor(name_or_folder: str, **kwargs):
    """:func:`stored_image_processor`, or DINOv2's processor when the source has none."""
    processor = stored_image_processor(name_or_folder, **kwargs)
    return dinov2_image_processor() if processor is None else processor


def image_statistics(processor: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """`(mean, std)` as float32 arrays of 3: from an image processor, a mapping with `image_mean` / `image_std`,
    or ImageNet's."""
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    if processor is not None:
        get = processor.get if isinstance(processor, dict) else lambda name: getattr(processor, name, None)
        mean = get("image_mean") if get("image_mean") is not None else mean
        std = get("image_std") if get("image_std") is not None else std
    mean = np.broadcast_to(np.asarray(mean, dtype=np.float32), (3,)).copy()
    std = np.broadcast_to(np.asarray(std, dtype=np.float32), (3,)).copy()
    return mean, std


def _as_chw_tensor(rgb01) -> torch.Tensor:
    """(H, W, 3) array or (3, H, W) tensor -> (3, H, W) float32 tensor."""
    if isinstance(rgb01, torch.Tensor):
        return rgb01.float() if rgb01.shape[0] == 3 else rgb01.permute(2, 0, 1).float()
    return torch.from_numpy(np.ascontiguousarray(np.asarray(rgb01, dtype=np.float32).transpose(2, 0, 1)))


def _resize(image: torch.Tensor, size: tuple[int, int], resample: str) -> torch.Tensor:
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    resized = F.interpolate(image[None], size=size, mode=resample, align_corners=False, antialias=True)[0]
    return resized.clamp_(0.0, 1.0)


def center_crop_box(height: int, width: int, size: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """`((new_height, new_width), (top, left))`: shortest side to `size`, then the central square."""
    scale = size / min(height, width)
    new_height = size if height <= width else max(size, round(height * scale))
    new_width = size if width < height else max(size, round(width * scale))
    top, left = int(round((new_height - size) / 2.0)), int(round((new_width - size) / 2.0))
    return (new_height, new_width), (top, left)


def resize_and_crop(rgb01, size: int | None = None, mode: str = "center_crop", patch_size: int = 14,
                    resample: str = "bicubic", name: str = "image") -> torch.Tensor:
    """Geometry only: (H, W, 3) array or (3, H, W) tensor in [0, 1] -> (3, H', W') float32 tensor (see module doc).

    Raises:
        ImageTooSmallError: with ``"patch_grid"``, an image smaller than one patch (the message names `name`).
    """
    if mode not in RESIZE_MODES:
        raise ValueError(f"mode must be one of {RESIZE_MODES}; got {mode!r}")
    image = _as_chw_tensor(rgb01)
    height, width = image.shape[-2:]
    if mode == "patch_grid":
        return crop_to_patch_grid(image.permute(1, 2, 0), patch_size, name).permute(2, 0, 1).contiguous()
    if size is None:
        raise ValueError(f"mode {mode!r} needs a size")
    if mode == "resize":
        return _resize(image, (size, size), resample).contiguous()
    (new_height, new_width), (top, left) = center_crop_box(height, width, size)
    image = _resize(image, (new_height, new_width), resample)
    return image[:, top : top + size, left : left + size].contiguous()


def shrunk_size(height: int, width: int, max_side: int) -> tuple[int, int]:
    """`(height, width)` scaled so that the longer side is at most `max_side` (kept when it already fits)."""
    if max_side < 1:
        raise ValueError(f"max_side must be a positive number of pixels, got {max_side}")
    if max(height, width) <= max_side:
        return height, width
    scale = max_side / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def shrink_to_max_side(rgb01: np.ndarray, max_side: int) -> np.ndarray:
    """(H, W, 3) in [0, 1] -> shrunk (bilinear, antialiased) to :func:`shrunk_size`; returned as is when it
    already fits."""
    size = shrunk_size(*rgb01.shape[:2], max_side)
    if size == tuple(rgb01.shape[:2]):
        return rgb01
    return _resize(_as_chw_tensor(rgb01), size, "bilinear").permute(1, 2, 0).numpy()


def resize_nearest(labels: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """(H, W[, ...]) -> (shape[0], shape[1][, ...]) by nearest neighbour on pixel centres, so labels are never
    blended; returned as is when the size already matches."""
    labels = np.asarray(labels)
    height, width = labels.shape[:2]
    new_height, new_width = int(shape[0]), int(shape[1])
    if (new_height, new_width) == (height, width):
        return labels
    rows = np.minimum(((np.arange(new_height) + 0.5) * height / new_height).astype(np.int64), height - 1)
    columns = np.minimum(((np.arange(new_width) + 0.5) * width / new_width).astype(np.int64), width - 1)
    return labels[rows[:, None], columns[None, :]]


def normalize(
    image: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> torch.Tensor:
    """(..., 3, H, W) in [0, 1] -> normalised with per-channel mean and std."""
    mean = torch.as_tensor(np.asarray(mean, dtype=np.float32), dtype=image.dtype)[:, None, None]
    std = torch.as_tensor(np.asarray(std, dtype=np.float32), dtype=image.dtype)[:, None, None]
    return (image - mean) / std


def denormalize(
    pixel_values, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> np.ndarray:
    """(3, H, W) normalised -> (H, W, 3) float32 in [0, 1], for display."""
    values = np.asarray(pixel_values, dtype=np.float32).transpose(1, 2, 0)
    return np.clip(values * np.asarray(std, dtype=np.float32) + np.asarray(mean, dtype=np.float32), 0.0, 1.0)


def to_pixel_values(rgb01, size: int | None = None, mode: str = "patch_grid", patch_size: int = 14,
                    processor: Any = None, resample: str = "bicubic", name: str = "image") -> torch.Tensor:
    """RGB in [0, 1] -> `(1, 3, H', W')` float32 pixel values: :func:`resize_and_crop`, then :func:`normalize`
    with the statistics of `processor` (see :func:`image_statistics`)."""
    mean, std = image_statistics(processor)
    return normalize(resize_and_crop(rgb01, size, mode, patch_size, resample, name), mean, std)[None]


__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "RESIZE_MODES",
    "PatchGridCropWarning",
    "center_crop_box",
    "crop_to_patch_grid",
    "denormalize",
    "dinov2_image_processor",
    "image_statistics",
    "load_image_processor",
    "normalize",
    "resize_and_crop",
    "resize_nearest",
    "shrink_to_max_side",
    "shrunk_size",
    "stored_image_processor",
    "to_pixel_values",
]


DEFAULT_MAX_SIDE = 896  # 64 patches of 14 px: a few seconds per ViT-S forward on a laptop CPU
