"""Exact whole-image features of large micrographs.

ALiBi attends globally, so features of tiles differ from features of the whole image. This module runs the whole
image at once through the `alibi_chunked` attention path, whose working memory grows linearly with the number of
patches and is bounded by `attention_memory_mb`:

    >>> from alibi_dinov2.features.large_images import extract_feature_map
    >>> features = extract_feature_map(model, "grain_map_16bit.tif", attention_memory_mb=512)   # (C, h, w)
"""

from contextlib import contextmanager
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
from alibi_dinov2.io.images import read_image


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


__all__ = ["chunked_attention", "extract_feature_map"]
