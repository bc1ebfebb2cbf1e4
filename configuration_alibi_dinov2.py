# Copyright 2026 The alibi-dinov2 authors. Licensed under the Apache License, Version 2.0.
"""Configuration of ALiBi-DINOv2: DINOv2 (with or without registers) whose learned absolute position
embedding is replaced by a 2D ALiBi attention bias.

This file is copied into Hub repositories as remote code: it imports only transformers and the shared
`alibi_attention` module.
"""

from transformers import Dinov2WithRegistersConfig


try:  # loaded as remote code (a package in transformers' module cache)
    from .alibi_attention import ALIBI_METRICS, ALIBI_RUNTIME_DEFAULTS, ALIBI_SLOPES, check_alibi_config
except ImportError:  # imported from the project itself (top-level modules)
    from alibi_attention import ALIBI_METRICS, ALIBI_RUNTIME_DEFAULTS, ALIBI_SLOPES, check_alibi_config


class AlibiDinov2Config(Dinov2WithRegistersConfig):
    r"""
    Configuration of an [`AlibiDinov2Model`]. It carries every field of transformers'
    `Dinov2WithRegistersConfig` (set `num_register_tokens=0` for the variant without registers) plus the
    options of the 2D ALiBi bias. The defaults describe ViT-S/14 with 4 registers and ALiBi on, the layout of
    `facebook/dinov2-with-registers-small` after conversion.

    The bias added to the attention logits of every layer, between patch tokens i and j at grid positions
    (y, x), is `-m_head * d(i, j) / d_max`; rows and columns of the CLS and register tokens get 0.

    Args:
        use_alibi (`bool`, *optional*, defaults to `True`):
            Add the 2D ALiBi bias to the attention logits of every layer.
        use_absolute_position_embeddings (`bool`, *optional*, defaults to `False`):
            Keep DINOv2's learned absolute position embedding. `False` removes the parameter altogether.
            `use_alibi=False, use_absolute_position_embeddings=True` reproduces stock DINOv2.
        alibi_metric (`str`, *optional*, defaults to `"euclidean"`):
            Distance between patch positions: `"euclidean"` (sqrt(dy^2 + dx^2)) or `"manhattan"` (dy + dx).
        alibi_wrap (`bool`, *optional*, defaults to `True`):
            Measure distances on a torus (dy = min(dy, h - dy), likewise dx). The bias is then circulant and
            the model exactly equivariant to cyclic shifts of the image by whole patches.
        alibi_normalize (`bool`, *optional*, defaults to `True`):
            Divide distances by the largest distance of the grid, so that they lie in [0, 1] at any resolution.
        alibi_slopes (`str`, *optional*, defaults to `"constant"`):
            Per-head slopes m: `"constant"` (1 for every head), `"geometric"` (2^(-8 (i + 1) / heads), classic
            ALiBi) or `"learned"` (one trainable slope per layer and head).
        alibi_jitter (`float`, *optional*, defaults to 0.0):
            Standard deviation of Gaussian noise added to the bias at every forward pass (0 disables it).
        interpolate_antialias (`bool`, *optional*, defaults to `True`):
            Antialiasing of the bicubic resize of the learned position embedding when it is kept and the grid
            differs from the trained one. `Dinov2WithRegistersModel` uses `True`, `Dinov2Model` `False`.

    The attention's memory options (`alibi_dense_max_tokens`, `alibi_query_chunk_size`, `alibi_chunk_memory_mb`) are
    no configuration fields: they are options of the model at load time and per call (see [`AlibiDinov2Model`]).
    Configurations saved by earlier versions carry them; they are dropped when such a configuration is read, with a
    warning where a value differs from its default.

    Example:

    ```python
    >>> from configuration_alibi_dinov2 import AlibiDinov2Config
    >>> from modeling_alibi_dinov2 import AlibiDinov2Model

    >>> config = AlibiDinov2Config()  # ViT-S/14, 4 registers, constant-slope wrapped Euclidean ALiBi
    >>> model = AlibiDinov2Model(config)
    ```"""

    model_type = "alibi_dinov2"

    hidden_size: int = 384
    num_hidden_layers: int = 12
    num_attention_heads: int = 6
    image_size: int | list[int] | tuple[int, int] = 518
    patch_size: int | list[int] | tuple[int, int] = 14
    num_register_tokens: int = 4
    use_alibi: bool = True
    use_absolute_position_embeddings: bool = False
    alibi_metric: str = "euclidean"
    alibi_wrap: bool = True
    alibi_normalize: bool = True
    alibi_slopes: str = "constant"
    alibi_jitter: float | int = 0.0
    interpolate_antialias: bool = True

    def __post_init__(self, **kwargs):
        check_alibi_config(self, kwargs)
        # Remote-code entry points for every Auto class, so that a saved folder loads with AutoModel and
        # AutoBackbone alike, whichever class saved it.
        if kwargs.get("auto_map") is None and getattr(self, "auto_map", None) is None:
            kwargs["auto_map"] = {
                "AutoConfig": "configuration_alibi_dinov2.AlibiDinov2Config",
                "AutoModel": "modeling_alibi_dinov2.AlibiDinov2Model",
                "AutoBackbone": "modeling_alibi_dinov2.AlibiDinov2Backbone",
            }
        super().__post_init__(**kwargs)


__all__ = ["ALIBI_METRICS", "ALIBI_RUNTIME_DEFAULTS", "ALIBI_SLOPES", "AlibiDinov2Config"]
