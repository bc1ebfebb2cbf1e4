"""Patch-feature grids from transformers image models.

Every supported model turns an image into a token sequence ``[prefix tokens, patch tokens]`` where the
prefix holds a CLS token, registers or distillation tokens, and the patch tokens come in row-major
order over an ``h x w`` grid. :func:`extract_patch_features` feeds one image through the model, drops
the prefix and returns the patch tokens as an ``(h, w, C)`` numpy grid, the input of the positional
probes, PCA / k-means maps and transformation checks of this package.

Supported ``config.model_type`` values (see :data:`SUPPORTED_MODEL_TYPES`): ``alibi_dinov2``, ``alibi_dinov3``,
``dinov2``, ``dinov2_with_registers``, ``dinov3_vit``, ``vit``, ``vit_mae``, ``vit_msn``, ``deit``,
``ijepa``, ``clip_vision_model`` and ``siglip_vision_model``. Task wrappers (``Dinov2ForImageClassification``
...) are unwrapped to their backbone; ``CLIPModel`` / ``SiglipModel`` to their vision tower.

Images are any source :mod:`alibi_dinov2.io.images` reads (a path, PIL image, numpy array or tensor), made RGB by
its one policy, and cropped (top-left anchored, never resized) to a multiple of the patch size, which is what a
stride-p patch convolution sees anyway: ``h = H // p``, ``w = W // p`` (:func:`alibi_dinov2.features.preprocessing.
crop_to_patch_grid`, which warns once per image size that is not a multiple of the patch size).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Sequence, Union

import numpy as np
import torch

from alibi_dinov2.features.preprocessing import IMAGENET_MEAN, IMAGENET_STD, crop_to_patch_grid, to_pixel_values
from alibi_dinov2.io.images import describe_source, to_rgb01


LayerSelection = Union[str, int, Sequence[int]]


@dataclass(frozen=True)
class _ModelSpec:
    """How to read patch tokens out of one model family.

    Attributes:
        prefix: number of non-patch tokens before the patch tokens, from the config.
        norm_names: attribute names of the final LayerNorm, first found wins.
        last_is_normed: whether ``last_hidden_state`` already went through that norm.
        streamed_attention: whether a call takes the ALiBi models' attention options
            (``attn_implementation="alibi_chunked"``, ``alibi_chunk_memory_mb``, ...).
    """

    prefix: Callable[[Any], int]
    norm_names: tuple[str, ...]
    last_is_normed: bool = True
    streamed_attention: bool = False


def _fixed(count: int) -> Callable[[Any], int]:
    return lambda config: count


def _cls_and_registers(config) -> int:
    return 1 + int(getattr(config, "num_register_tokens", 0) or 0)


_SPECS: dict[str, _ModelSpec] = {
    "alibi_dinov2": _ModelSpec(_cls_and_registers, ("layernorm", "norm"), streamed_attention=True),
    "alibi_dinov3": _ModelSpec(_cls_and_registers, ("norm",), streamed_attention=True),
    "dinov2": _ModelSpec(_fixed(1), ("layernorm",)),
    "dinov2_with_registers": _ModelSpec(_cls_and_registers, ("layernorm",)),
    "dinov3_vit": _ModelSpec(_cls_and_registers, ("norm",)),
    "vit": _ModelSpec(_fixed(1), ("layernorm",)),
    "vit_mae": _ModelSpec(_fixed(1), ("layernorm",)),
    "vit_msn": _ModelSpec(_fixed(1), ("layernorm",)),
    "deit": _ModelSpec(_fixed(2), ("layernorm",)),  # CLS + distillation token
    "ijepa": _ModelSpec(_fixed(0), ("layernorm",)),  # no CLS token
    # CLIP applies post_layernorm to the pooled CLS only; the patch tokens are normed here so that
    # "last" means final-normed output for every model.
    "clip_vision_model": _ModelSpec(_fixed(1), ("post_layernorm",), last_is_normed=False),
    "siglip_vision_model": _ModelSpec(_fixed(0), ("post_layernorm",)),
}

SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(_SPECS)

# Where the supported families keep their list of transformer layers (DINOv2, CLIP, ViT, DINOv3), first found wins.
_LAYER_PATHS = ("encoder.layer", "encoder.layers", "layers", "model.layer")

# Multi-modal models whose image tower sits in `vision_model`.
_VISION_TOWER_TYPES = ("clip", "siglip")


# --------------------------------------------------------------------------------------------------
# Model introspection
# --------------------------------------------------------------------------------------------------
def _unsupported(model) -> ValueError:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return ValueError(
        f"Unsupported model {type(model).__name__} (config.model_type={model_type!r}). "
        f"Supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}; CLIPModel/SiglipModel and task "
        "wrappers (e.g. Dinov2ForImageClassification) are unwrapped to their backbone."
    )


def _is_backbone_api(model) -> bool:
    """transformers' `…Backbone` classes return feature maps, not token sequences."""
    return any(base.__name__ == "BackboneMixin" for base in type(model).__mro__)


def resolve_backbone(model: torch.nn.Module) -> torch.nn.Module:
    """Return the module that produces patch tokens (unwrapping vision towers and task heads).

    Raises:
        ValueError: the model is of no supported family.
    """
    if _is_backbone_api(model):
        raise ValueError(
            f"{type(model).__name__} is a feature-map Backbone; pass the plain model instead "
            "(e.g. AutoModel, Dinov2Model, DINOv3ViTModel, AlibiDinov2Model, AlibiDinov3Model)"
        )
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    # The token-producing module of every supported family owns the patch embeddings.
    if model_type in _SPECS and isinstance(getattr(model, "embeddings", None), torch.nn.Module):
        return model
    if model_type in _VISION_TOWER_TYPES and isinstance(getattr(model, "vision_model", None), torch.nn.Module):
        return resolve_backbone(model.vision_model)
    # Task wrappers (…ForImageClassification) keep their backbone under `base_model_prefix`.
    prefix_name = getattr(model, "base_model_prefix", None)
    inner = getattr(model, prefix_name, None) if prefix_name else None
    if isinstance(inner, torch.nn.Module) and inner is not model:
        return resolve_backbone(inner)
    raise _unsupported(model)


def _spec_of(backbone) -> _ModelSpec:
    return _SPECS[backbone.config.model_type]


def prefix_token_count(model: torch.nn.Module) -> int:
    """Number of tokens before the patch tokens (CLS, registers, distillation token).

    ``alibi_dinov2`` / ``alibi_dinov3`` / ``dinov2_with_registers`` / ``dinov3_vit``:
    1 + ``config.num_register_tokens``; ``dinov2``, ``vit``, ``vit_mae``, ``vit_msn``, CLIP: 1; ``deit``: 2;
    ``ijepa``, SigLIP: 0.
    """
    backbone = resolve_backbone(model)
    return int(_spec_of(backbone).prefix(backbone.config))


def patch_size_of(model: torch.nn.Module) -> int:
    """Patch side in pixels (``config.patch_size``; square patches only)."""
    backbone = resolve_backbone(model)
    size = backbone.config.patch_size
    if isinstance(size, (list, tuple)):
        if len(set(size)) != 1:
            raise ValueError(f"Only square patches are supported, got patch_size={tuple(size)}")
        size = size[0]
    return int(size)


def transformer_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer layers of a supported model, in order (none when they sit where no family keeps them)."""
    backbone = resolve_backbone(model)
    for path in _LAYER_PATHS:
        module = backbone
        for name in path.split("."):
            module = getattr(module, name, None)
        if isinstance(module, torch.nn.ModuleList):
            return list(module)
    return []


def has_streamed_attention(model: torch.nn.Module) -> bool:
    """Whether a call of the model takes the ALiBi models' attention options (``attn_implementation="alibi_chunked"``,
    ``alibi_chunk_memory_mb``, ...)."""
    return _spec_of(resolve_backbone(model)).streamed_attention


def _final_norm(backbone) -> torch.nn.Module:
    for name in _spec_of(backbone).norm_names:
        module = getattr(backbone, name, None)
        if isinstance(module, torch.nn.Module):
            return module
    return torch.nn.Identity()  # a model without a final norm: block outputs are used as they are


# --------------------------------------------------------------------------------------------------
# Image preparation
# --------------------------------------------------------------------------------------------------
def image_to_pixel_values(image, patch_size: int, image_processor=None) -> torch.Tensor:
    """Any image source -> normalised (1, 3, H', W') float32 tensor cropped to the patch grid.

    Raises:
        ImageReadError / ImageTooSmallError: naming the image.
    """
    name = describe_source(image)
    rgb = to_rgb01(image, name=name)
    return to_pixel_values(rgb, mode="patch_grid", patch_size=patch_size, processor=image_processor, name=name)


# --------------------------------------------------------------------------------------------------
# Forward pass
# --------------------------------------------------------------------------------------------------
def tokens_to_grid(tokens: torch.Tensor, prefix: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """(..., N, C) token sequence -> (..., h, w, C) patch grid, dropping the first `prefix` tokens."""
    n_tokens = tokens.shape[-2]
    if n_tokens != prefix + grid_h * grid_w:
        raise ValueError(
            f"Model returned {n_tokens} tokens; expected {prefix} prefix + {grid_h}x{grid_w} patch tokens"
        )
    patches = tokens[..., prefix:, :]
    return patches.reshape(*tokens.shape[:-2], grid_h, grid_w, tokens.shape[-1])


def _forward_kwargs(backbone, pixel_values: torch.Tensor) -> dict:
    """Per-family extras: interpolated position embeddings and MAE's masking switched off."""
    parameters = inspect.signature(backbone.forward).parameters
    kwargs = {}
    if "interpolate_pos_encoding" in parameters:
        kwargs["interpolate_pos_encoding"] = True
    if backbone.config.model_type == "vit_mae":
        # An increasing noise keeps the patch order (argsort is the identity); mask_ratio 0 keeps all.
        n_patches = (pixel_values.shape[-2] // patch_size_of(backbone)) * (
            pixel_values.shape[-1] // patch_size_of(backbone)
        )
        noise = torch.arange(n_patches, dtype=torch.float32, device=pixel_values.device)
        kwargs["noise"] = noise.expand(pixel_values.shape[0], -1)
    return kwargs


class _MaskRatioOff:
    """Context manager setting ``config.mask_ratio`` to 0 (ViT-MAE) and restoring it afterwards."""

    def __init__(self, config):
        self.config = config
        self.saved = getattr(config, "mask_ratio", None)

    def __enter__(self):
        if self.saved is not None:
            self.config.mask_ratio = 0.0

    def __exit__(self, *exc_info):
        if self.saved is not None:
            self.config.mask_ratio = self.saved


def _layer_indices(layers: LayerSelection, n_states: int) -> tuple[list[int] | None, bool]:
    """Translate a layer selection into indices of the (L + 1) stack; None means "last" only."""
    if isinstance(layers, str):
        if layers == "last":
            return None, True
        if layers == "all":
            return list(range(n_states)), False
        raise ValueError(f"layers must be 'last', 'all', an int or a sequence of ints, got {layers!r}")
    if isinstance(layers, (int, np.integer)):
        indices, squeeze = [int(layers)], True
    else:
        indices, squeeze = [int(index) for index in layers], False
    for index in indices:
        if not -n_states <= index < n_states:
            raise IndexError(f"Layer {index} out of range for a model with {n_states} hidden states")
    return [index % n_states for index in indices], squeeze


def extract_patch_features_batch(
    model: torch.nn.Module, pixel_values: torch.Tensor, layers: LayerSelection = "last"
) -> torch.Tensor:
    """Patch-feature grids for a batch of already normalised images.

    Args:
        model: a supported transformers model (see :data:`SUPPORTED_MODEL_TYPES`).
        pixel_values: (B, 3, H, W) tensor with H and W multiples of the patch size.
        layers: ``"last"`` (final-normed output), ``"all"`` (embeddings then every block output, each
            passed through the final LayerNorm), an index or a sequence of indices into that stack.

    Returns:
        (B, h, w, C) for ``"last"`` or a single index, (B, L', h, w, C) otherwise, on the model's device.
    """
    backbone = resolve_backbone(model)
    patch_size = patch_size_of(backbone)
    if pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
        raise ValueError(f"pixel_values must be (B, 3, H, W), got {tuple(pixel_values.shape)}")
    height, width = pixel_values.shape[-2:]
    if height % patch_size or width % patch_size:
        raise ValueError(f"Image size {height}x{width} is not a multiple of the patch size {patch_size}")
    grid_h, grid_w = height // patch_size, width // patch_size
    spec = _spec_of(backbone)
    prefix = prefix_token_count(backbone)
    parameter = next(backbone.parameters())
    pixel_values = pixel_values.to(device=parameter.device, dtype=parameter.dtype)

    want_hidden = layers != "last"
    backbone.eval()
    with torch.inference_mode(), _MaskRatioOff(backbone.config):
        outputs = backbone(
            pixel_values=pixel_values,
            output_hidden_states=want_hidden,
            **_forward_kwargs(backbone, pixel_values),
        )
        norm = _final_norm(backbone)
        if not want_hidden:
            tokens = outputs.last_hidden_state
            if not spec.last_is_normed:
                tokens = norm(tokens)
            return tokens_to_grid(tokens, prefix, grid_h, grid_w)
        hidden_states = outputs.hidden_states
        indices, squeeze = _layer_indices(layers, len(hidden_states))
        stacked = torch.stack([norm(hidden_states[index]) for index in indices], dim=1)
        grids = tokens_to_grid(stacked, prefix, grid_h, grid_w)
        return grids[:, 0] if squeeze else grids


def extract_patch_features(
    model: torch.nn.Module,
    image,
    image_processor=None,
    layers: LayerSelection = "last",
) -> np.ndarray:
    """Patch-feature grid of one image.

    Args:
        model: a supported transformers model (see :data:`SUPPORTED_MODEL_TYPES`); put in eval mode.
        image: a path, PIL image, numpy array or tensor, made RGB in [0, 1] by :func:`alibi_dinov2.io.images.to_rgb01`
            (gray replicated, alpha composited, high-bit data by its real range). Cropped to
            (H // p * p, W // p * p), never resized.
        image_processor: optional object or dict with ``image_mean`` / ``image_std``; ImageNet
            statistics otherwise. Nothing else of the processor is used (no resize, no crop).
        layers: ``"last"`` (final-normed output, the reference patch features), ``"all"`` (embeddings
            followed by every block output, all passed through the model's final LayerNorm), an index
            into that (L + 1) stack or a sequence of indices.

    Returns:
        float32 array (h, w, C) for ``"last"`` or one index; (L + 1, h, w, C) for ``"all"``;
        (k, h, w, C) for k indices. h = H // p, w = W // p.
    """
    backbone = resolve_backbone(model)
    pixel_values = image_to_pixel_values(image, patch_size_of(backbone), image_processor)
    grids = extract_patch_features_batch(backbone, pixel_values, layers=layers)
    return grids[0].float().cpu().numpy()


__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SUPPORTED_MODEL_TYPES",
    "crop_to_patch_grid",
    "extract_patch_features",
    "extract_patch_features_batch",
    "has_streamed_attention",
    "image_to_pixel_values",
    "patch_size_of",
    "prefix_token_count",
    "resolve_backbone",
    "tokens_to_grid",
    "transformer_layers",
]
