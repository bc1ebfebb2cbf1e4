# Copyright 2026 The alibi-dinov2 authors. Licensed under the Apache License, Version 2.0.
"""Configuration of ALiBi-DINOv3: DINOv3 ViT whose rotary position embedding (RoPE) is replaced by a 2D ALiBi
attention bias.

This file is copied into Hub repositories as remote code: it imports only transformers and the shared
`alibi_attention` module.
"""

from transformers import DINOv3ViTConfig


try:  # loaded as remote code (a package in transformers' module cache)
    from .alibi_attention import ALIBI_METRICS, ALIBI_RUNTIME_DEFAULTS, ALIBI_SLOPES, check_alibi_config
except ImportError:  # imported from the project itself (top-level modules)
    from alibi_attention import ALIBI_METRICS, ALIBI_RUNTIME_DEFAULTS, ALIBI_SLOPES, check_alibi_config


class AlibiDinov3Config(DINOv3ViTConfig):
    r"""
    Configuration of an [`AlibiDinov3Model`]. It carries every field of transformers' `DINOv3ViTConfig` plus the
    switches of the two position encodings and the options of the 2D ALiBi bias, with the names and defaults of
    ALiBi-DINOv2's. The defaults describe ViT-S+/16 with 4 registers (SwiGLU MLP of 1536 hidden units: Meta's MLP
    ratio 6, two thirds of it per SwiGLU branch) with ALiBi on and RoPE off, the layout of
    `facebook/dinov3-vits16plus-pretrain-lvd1689m` after conversion.

    The bias added to the attention logits of every layer, between patch tokens i and j at grid positions
    (y, x), is `-m_head * d(i, j) / d_max`; rows and columns of the CLS and register tokens get 0.

    Args:
        use_alibi (`bool`, *optional*, defaults to `True`):
            Add the 2D ALiBi bias to the attention logits of every layer.
        use_rope (`bool`, *optional*, defaults to `False`):
            Keep DINOv3's rotary position embedding on the patch tokens' queries and keys.
            `use_alibi=False, use_rope=True` reproduces transformers' `DINOv3ViTModel`; both off is the NoPE model.
        alibi_metric (`str`, *optional*, defaults to `"euclidean"`):
            Distance between patch positions: `"euclidean"` (sqrt(dy^2 + dx^2)) or `"manhattan"` (dy + dx).
        alibi_wrap (`bool`, *optional*, defaults to `True`):
            Measure distances on a torus (dy = min(dy, h - dy), likewise dx). The bias is then circulant and,
            with RoPE off, the model exactly equivariant to cyclic shifts of the image by whole patches.
        alibi_normalize (`bool`, *optional*, defaults to `True`):
            Divide distances by the largest distance of the grid, so that they lie in [0, 1] at any resolution.
        alibi_slopes (`str`, *optional*, defaults to `"constant"`):
            Per-head slopes m: `"constant"` (1 for every head), `"geometric"` (2^(-8 (i + 1) / heads), classic
            ALiBi) or `"learned"` (one trainable slope per layer and head).
        alibi_jitter (`float`, *optional*, defaults to 0.0):
            Standard deviation of Gaussian noise added to the bias at every forward pass (0 disables it).

    The attention's memory options (`alibi_dense_max_tokens`, `alibi_query_chunk_size`, `alibi_chunk_memory_mb`) are
    no configuration fields: they are options of the model at load time and per call (see [`AlibiDinov3Model`]).

    Example:

    ```python
    >>> from configuration_alibi_dinov3 import AlibiDinov3Config
    >>> from modeling_alibi_dinov3 import AlibiDinov3Model

    >>> config = AlibiDinov3Config()  # ViT-S+/16, 4 registers, SwiGLU, constant-slope wrapped Euclidean ALiBi
    >>> model = AlibiDinov3Model(config)
    ```"""

    model_type = "alibi_dinov3"

    patch_size: int | list[int] | tuple[int, int] = 16
    hidden_size: int = 384
    intermediate_size: int = 1536
    num_hidden_layers: int = 12
    num_attention_heads: int = 6
    hidden_act: str = "silu"
    use_gated_mlp: bool = True
    num_register_tokens: int = 4
    use_alibi: bool = True
    use_rope: bool = False
    alibi_metric: str = "euclidean"
    alibi_wrap: bool = True
    alibi_normalize: bool = True
    alibi_slopes: str = "constant"
    alibi_jitter: float | int = 0.0

    def __post_init__(self, **kwargs):
        check_alibi_config(self, kwargs)
        # Remote-code entry points for every Auto class, so that a saved folder loads with AutoModel and
        # AutoBackbone alike, whichever class saved it.
        if kwargs.get("auto_map") is None and getattr(self, "auto_map", None) is None:
            kwargs["auto_map"] = {
                "AutoConfig": "configuration_alibi_dinov3.AlibiDinov3Config",
                "AutoModel": "modeling_alibi_dinov3.AlibiDinov3Model",
                "AutoBackbone": "modeling_alibi_dinov3.AlibiDinov3Backbone",
            }
        super().__post_init__(**kwargs)


__all__ = ["ALIBI_METRICS", "ALIBI_RUNTIME_DEFAULTS", "ALIBI_SLOPES", "AlibiDinov3Config"]
