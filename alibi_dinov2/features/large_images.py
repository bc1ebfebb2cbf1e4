"""Exact whole-image features of large micrographs, and tiled ones beyond a token budget.

ALiBi attends globally, so features of tiles differ from features of the whole image. This module runs the whole
image at once through the `alibi_chunked` attention path, whose working memory grows linearly with the number of
patches and is bounded by `attention_memory_mb`:

    >>> from alibi_dinov2.features.large_images import extract_feature_map
    >>> features = extract_feature_map(model, "grain_map_16bit.tif", attention_memory_mb=512)   # (C, h, w)

Images of more patches than a budget (:class:`VitTiling`, 65,536 tokens: 3584 x 3584 px at patch 14) go through
overlapping tiles instead, read lazily from a dask array when the image is one:

    >>> grid = large_image_patch_grid(model, dask_image)    # (h, w, C), the whole image or blended tiles
"""

from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from alibi_dinov2.features.extraction import (
    extract_patch_features_batch,
    has_streamed_attention,
    image_to_pixel_values,
    patch_size_of,
    resolve_backbone,
    transformer_layers,
)
from alibi_dinov2.features.vit import extract_patch_features_tiled
from alibi_dinov2.io.images import read_image, to_rgb01


def chunked_attention(attention_memory_mb: float) -> dict:
    """Keyword arguments of one ALiBi-DINOv2 or ALiBi-DINOv3 call that run it on the `alibi_chunked` path with its
    blocks bounded by `attention_memory_mb` alone; the model and its config stay as they are (other threads may use
    them meanwhile)."""
    if attention_memory_mb <= 0:
        raise ValueError(f"attention_memory_mb must be positive; got {attention_memory_mb}.")
    return dict(
        attn_implementation="alibi_chunked",
        alibi_query_chunk_size=1 << 30,  # the memory bound alone sets the block size
        alibi_chunk_memory_mb=attention_memory_mb,
    )


@contextmanager
def layer_progress(backbone, description: str, enabled: bool = True):
    """A progress bar that advances as each transformer layer finishes."""
    layers = transformer_layers(backbone)
    bar = tqdm(total=len(layers) or 1, desc=description, unit="layer", disable=not enabled)

    def advance(*_) -> None:  # returns None: a forward hook's return value would replace the layer's output
        bar.update(1)

    hooks = [layer.register_forward_hook(advance) for layer in layers]
    try:
        yield bar
    finally:
        for hook in hooks:
            hook.remove()
        bar.close()


def extract_feature_map(
    model: torch.nn.Module,
    image,
    page: int | None = None,
    attention_memory_mb: float = 512.0,
    image_processor=None,
    progress: bool = True,
) -> np.ndarray:
    """Final-normed patch features of a whole image, however large.

    Args:
        model: a transformers image model giving patch tokens; ALiBi models (DINOv2, DINOv3) run on the memory-bounded
            `alibi_chunked` path, others (whose attention has no bias) on their own path.
        image: a path (PNG, JPEG, TIFF including 16-bit and multi-page) or an (H, W) / (H, W, 3) array.
        page: page of a multi-page TIFF (default: the first).
        attention_memory_mb: bound on the attention's working memory (scores and bias rows of one block of
            queries); the rest of the forward pass needs about `tokens x hidden_size x 20` bytes. These bound the
            live tensors; the C allocator may keep freed blocks resident on top (`MALLOC_MMAP_THRESHOLD_=65536`
            in the environment returns them at once, at some cost in speed).
        image_processor: optional source of `image_mean` / `image_std` (ImageNet statistics otherwise).
        progress: show a progress bar over the layers.

    Returns:
        `(C, h, w)` float32 with `h = H // patch_size`, `w = W // patch_size`.
    """
    if isinstance(image, (str, Path)):
        image = read_image(image, page=page if page is not None else 0)
    backbone = resolve_backbone(model)
    patch_size = patch_size_of(backbone)
    pixel_values = image_to_pixel_values(np.asarray(image), patch_size, image_processor)
    grid_h, grid_w = pixel_values.shape[-2] // patch_size, pixel_values.shape[-1] // patch_size
    description = f"features {grid_h}x{grid_w} patches"
    with layer_progress(backbone, description, enabled=progress):
        if has_streamed_attention(backbone):
            options = chunked_attention(attention_memory_mb)
            parameter = next(backbone.parameters())
            backbone.eval()
            with torch.inference_mode():
                pixel_values = pixel_values.to(device=parameter.device, dtype=parameter.dtype)
                features = backbone.get_patch_features(pixel_values, **options)[0]
        else:
            features = extract_patch_features_batch(backbone, pixel_values)[0].permute(2, 0, 1)
    return features.float().cpu().numpy()


@dataclass(frozen=True)
class VitTiling:
    """When and how the patch features of a large image are computed on tiles.

    Up to `max_tokens` patches the whole image runs in one pass on the streamed attention (exact: no tile
    boundary). Beyond, tiles of `tile_patches` x `tile_patches` patches overlapping by `overlap_patches` are blended
    with weights that fall from each tile's centre to its edges (:func:`~alibi_dinov2.features.vit.
    extract_patch_features_tiled`): 128 patches (1792 px at patch 14, 16,384 tokens) is 3.5 times the 37-patch grid
    of the models' last training stage, so a patch's neighbourhood lies inside its tile but for the outer 16 patches,
    where the neighbouring tile, whose centre they are nearer, outweighs it. The defaults bound the forward pass to
    about `max_tokens x hidden_size x 20` bytes (0.5 GB for ViT-S, whose hidden size is 384) plus the attention's
    `attention_memory_mb`.
    """

    max_tokens: int = 65536
    tile_patches: int = 128
    overlap_patches: int = 16

    def __post_init__(self):
        if self.max_tokens < 1 or self.tile_patches < 1 or not 0 <= self.overlap_patches < self.tile_patches:
            raise ValueError(
                f"ViT tiling needs max_tokens >= 1, tile_patches >= 1 and 0 <= overlap_patches < tile_patches; got "
                f"{self.max_tokens}, {self.tile_patches}, {self.overlap_patches}"
            )


def image_extremes(image) -> tuple[float, float]:
    """`(min, max)` of a numpy or dask array, computed once (a dask array is read chunk by chunk)."""
    import dask

    return tuple(float(value) for value in dask.compute(image.min(), image.max()))


def lazy_rgb01(image, extremes: tuple[float, float] | None = None):
    """`image` (numpy or dask, `(H, W)` or `(H, W, C)`) as a lazy `(H, W, 3)` float32 dask array in [0, 1], each block
    made RGB by :func:`~alibi_dinov2.io.images.to_rgb01` with the whole image's `extremes` (measured if not given)."""
    import dask.array as da

    image = da.asarray(image)
    extremes = image_extremes(image) if extremes is None else extremes
    if image.ndim == 3:
        image = image.rechunk({2: -1})
    chunks = image.chunks[:2] + ((3,),)
    new_axis = [2] if image.ndim == 2 else None
    return image.map_blocks(to_rgb01, extremes=extremes, chunks=chunks, new_axis=new_axis, dtype=np.float32)


def _tile_feature_map(model, tile, image_processor=None, attention_memory_mb: float = 512.0) -> np.ndarray:
    """:func:`extract_feature_map` of one tile as an `(h, w, C)` grid (the extractor of the tiled path)."""
    features = extract_feature_map(model, tile, attention_memory_mb=attention_memory_mb,
                                   image_processor=image_processor, progress=False)  # fmt: skip
    return np.moveaxis(features, 0, -1)


def large_image_patch_grid(
    model: torch.nn.Module,
    image,
    tiling: VitTiling = VitTiling(),
    max_side: int | None = None,
    image_processor=None,
    attention_memory_mb: float = 512.0,
    extremes: tuple[float, float] | None = None,
) -> np.ndarray:
    """Final-normed patch features `(h, w, C)` of an image of any size, read lazily when it is a dask array.

    The whole image in one pass on the streamed attention while it has at most `tiling.max_tokens` patches, else
    blended overlapping tiles (see :class:`VitTiling`). `max_side` (pixels) forces tiles of that side, overlapping
    by :func:`~alibi_dinov2.features.vit.extract_patch_features_tiled`'s default, as a segmenter trained with
    `max_side` computed them. Intensities are scaled by the whole image's `extremes` (measured when not given), as
    the whole image would be.
    """
    rgb = lazy_rgb01(image, extremes)
    patch = patch_size_of(model)
    tokens = (rgb.shape[0] // patch) * (rgb.shape[1] // patch)
    extractor = partial(_tile_feature_map, attention_memory_mb=attention_memory_mb)
    if max_side is not None:
        return extract_patch_features_tiled(model, rgb, max_side, image_processor=image_processor, extractor=extractor)
    side = None if tokens <= tiling.max_tokens else tiling.tile_patches * patch
    return extract_patch_features_tiled(
        model, rgb, side, overlap=tiling.overlap_patches * patch, image_processor=image_processor, extractor=extractor
    )


__all__ = [
    "VitTiling",
    "chunked_attention",
    "extract_feature_map",
    "image_extremes",
    "large_image_patch_grid",
    "lazy_rgb01",
]
