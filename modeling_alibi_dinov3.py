# Copyright 2026 The alibi-dinov2 authors. Licensed under the Apache License, Version 2.0.
"""PyTorch ALiBi-DINOv3: DINOv3 ViT with a 2D ALiBi attention bias instead of its rotary position embedding.

DINOv3 encodes patch positions by rotating the queries and keys of the patch tokens (RoPE), and its features carry
that position (a linear probe recovers it). ALiBi-DINOv3 switches RoPE off and adds, in every attention layer, the
2D ALiBi bias of ALiBi-DINOv2: one falling linearly with the (wrapped, normalised) distance between patch positions,
zero for the CLS and register tokens.

The model reuses transformers' DINOv3 ViT embeddings, layers (MLP or SwiGLU, LayerScale), attention projections and
RoPE; the bias, the attention paths (`sdpa`, `eager`, the streamed `alibi_chunked` and `alibi_flex`) and the choice of
the path per call come from `alibi_attention`, the one implementation both model types share. With `use_rope=True`
and `use_alibi=False` the model is transformers' `DINOv3ViTModel`, with the same state dict keys.

This file is copied into Hub repositories as remote code: it imports only torch, transformers,
`configuration_alibi_dinov3` and `alibi_attention`.
"""

import torch
from torch import nn
from transformers import AutoBackbone, AutoConfig, AutoModel
from transformers import initialization as init
from transformers.backbone_utils import BackboneMixin, filter_output_hidden_states
from transformers.modeling_outputs import BaseModelOutput, BaseModelOutputWithPooling
from transformers.models.dinov3_vit.modeling_dinov3_vit import (
    DINOv3ViTAttention,
    DINOv3ViTBackboneOutput,
    DINOv3ViTEmbeddings,
    DINOv3ViTLayer,
    DINOv3ViTPreTrainedModel,
    DINOv3ViTRopePositionEmbedding,
    apply_rotary_pos_emb,
    eager_attention_forward,
)
from transformers.utils.generic import can_return_tuple, merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs


try:  # loaded as remote code (a package in transformers' module cache)
    from .alibi_attention import (
        AlibiAttentionMixin,
        AlibiPositionBias,
        attend,
        attention_heads,
        extra_attention_mask,
        patch_grid,
        patch_tokens_to_map,
        run_alibi_layers,
    )
    from .configuration_alibi_dinov3 import AlibiDinov3Config
except ImportError:  # imported from the project itself (top-level modules)
    from alibi_attention import (
        AlibiAttentionMixin,
        AlibiPositionBias,
        attend,
        attention_heads,
        extra_attention_mask,
        patch_grid,
        patch_tokens_to_map,
        run_alibi_layers,
    )
    from configuration_alibi_dinov3 import AlibiDinov3Config


class AlibiDinov3Attention(DINOv3ViTAttention):
    """transformers' DINOv3 attention (same projections and weights) with RoPE applied only when position embeddings
    are given (`config.use_rope`), and an attention function that one call may choose: `attn_implementation` passed
    to `forward` overrides `config._attn_implementation`, which the model never changes while it runs."""

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attn_implementation: str | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`(batch_size, N, hidden_size)` -> `(batch_size, N, hidden_size)` and the attention weights (eager only).
        `position_embeddings`: RoPE's `(cos, sin)`, each `(h * w, head_dim)`, applied to the patch tokens only."""
        query, key, value = attention_heads(self, hidden_states)
        if position_embeddings is not None:
            query, key = apply_rotary_pos_emb(query, key, *position_embeddings)
        return attend(
            self, query, key, value, attention_mask, attn_implementation, eager_attention_forward, self.dropout,
            **kwargs,
        )


class AlibiDinov3Layer(DINOv3ViTLayer):
    """transformers' DINOv3 layer with [`AlibiDinov3Attention`]; parameters and their names are unchanged."""

    def __init__(self, config: AlibiDinov3Config) -> None:
        super().__init__(config)
        self.attention = AlibiDinov3Attention(config)


class AlibiDinov3PreTrainedModel(AlibiAttentionMixin, DINOv3ViTPreTrainedModel):
    """Weight initialisation and the shared embed-and-encode step; the attention's options, checks and per-call path
    come from [`AlibiAttentionMixin`]."""

    config_class = AlibiDinov3Config
    config: AlibiDinov3Config
    base_model_prefix = "alibi_dinov3"
    _no_split_modules = ["DINOv3ViTEmbeddings", "AlibiDinov3Layer"]
    _can_compile_fullgraph = True  # under compilation the bias is computed in the graph, the cache left alone

    @torch.no_grad()
    def _init_weights(self, module) -> None:
        super()._init_weights(module)
        if isinstance(module, AlibiPositionBias) and module.slopes is not None:
            init.uniform_(module.slopes, 0.0, 1.0)

    def _embed_and_encode(
        self,
        pixel_values: torch.Tensor,
        bool_masked_pos: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> BaseModelOutput:
        """Check the input, embed it and run the encoder with RoPE (when on) and the ALiBi bias of its grid, on the
        attention path chosen for this call."""
        grid_size = patch_grid(pixel_values, self.config)
        num_prefix_tokens = 1 + self.config.num_register_tokens
        kwargs.update(self._attention_plan(num_prefix_tokens + grid_size[0] * grid_size[1], kwargs))
        pixel_values = pixel_values.to(self.embeddings.patch_embeddings.weight.dtype)
        embedding_output = self.embeddings(pixel_values, bool_masked_pos=bool_masked_pos)
        position_embeddings = None if self.rope_embeddings is None else self.rope_embeddings(pixel_values)
        attention_mask = extra_attention_mask(self.config, embedding_output, attention_mask)
        return self.model(
            embedding_output,
            grid_size=grid_size,
            position_embeddings=position_embeddings,
            attention_mask=attention_mask,
            **kwargs,
        )


class AlibiDinov3Encoder(AlibiDinov3PreTrainedModel):
    """transformers' DINOv3 layers, each attending with RoPE (when on) and the ALiBi bias of the input's grid."""

    def __init__(self, config: AlibiDinov3Config) -> None:
        super().__init__(config)
        self.layer = nn.ModuleList([AlibiDinov3Layer(config) for _ in range(config.num_hidden_layers)])
        self.alibi = AlibiPositionBias(config) if config.use_alibi else None
        self.post_init()

    @merge_with_config_defaults
    @capture_outputs(tie_last_hidden_states=False)
    def forward(
        self,
        hidden_states: torch.Tensor,
        grid_size: tuple[int, int],
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        attn_implementation: str | None = None,
        **kwargs,
    ) -> BaseModelOutput:
        """
        Args:
            hidden_states: `(batch_size, 1 + R + h * w, hidden_size)` embeddings.
            grid_size: `(h, w)`, the patch grid the tokens come from.
            position_embeddings: RoPE's `(cos, sin)`, each `(h * w, head_dim)`, or None with RoPE off.
            attention_mask: optional extra mask (boolean or additive), merged with the ALiBi bias.
            attn_implementation: attention path of this call (default: `config._attn_implementation`); the streamed
                paths take their options (`alibi_query_chunk_size`, ...) from `kwargs`.
        """
        attn_implementation = attn_implementation or self.config._attn_implementation
        hidden_states = run_alibi_layers(
            self.layer,
            self.alibi,
            hidden_states,
            grid_size,
            attention_mask,
            attn_implementation,
            position_embeddings=position_embeddings,
            **kwargs,
        )
        return BaseModelOutput(last_hidden_state=hidden_states)


class AlibiDinov3Base(AlibiDinov3PreTrainedModel):
    """What the model and the backbone hold, under the names (and state dict keys) of transformers' `DINOv3ViTModel`:
    `embeddings` (CLS, mask and register tokens, patch embedding), `rope_embeddings` (None with RoPE off; it holds no
    weights), `model` (the layers, and `model.alibi` with learned slopes) and `norm`, the final LayerNorm."""

    def __init__(self, config: AlibiDinov3Config, **kwargs) -> None:
        super().__init__(config, **kwargs)
        self.embeddings = DINOv3ViTEmbeddings(config)
        self.rope_embeddings = DINOv3ViTRopePositionEmbedding(config) if config.use_rope else None
        self.model = AlibiDinov3Encoder(config)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    @property
    def num_prefix_tokens(self) -> int:
        """CLS and register tokens before the patch tokens."""
        return 1 + self.config.num_register_tokens

    def get_input_embeddings(self) -> nn.Conv2d:
        return self.embeddings.patch_embeddings


class AlibiDinov3Model(AlibiDinov3Base):
    """ALiBi-DINOv3 image encoder.

    Outputs follow transformers' `DINOv3ViTModel`: `last_hidden_state` of shape `(batch_size, 1 + R + h * w,
    hidden_size)` = `[CLS, registers, patches]` after the final LayerNorm, `pooler_output` (the CLS token), and on
    request `hidden_states` and `attentions` (eager only). The patch grid is `h = H // 16`, `w = W // 16` for any
    `H, W >= 16`. Patch features as a `(batch_size, hidden_size, h, w)` map:

    ```python
    >>> features = model.get_patch_features(pixel_values)
    ```

    The attention's memory options (`alibi_dense_max_tokens`, `alibi_query_chunk_size`, `alibi_chunk_memory_mb`) and
    the streamed paths (`attn_implementation="alibi_chunked"` or `"alibi_flex"` per call) are those of
    `AlibiDinov2Model`: keyword arguments of the constructor, of `from_pretrained` and of every call.
    """

    def __init__(self, config: AlibiDinov3Config, **kwargs) -> None:
        super().__init__(config, **kwargs)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        bool_masked_pos: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPooling:
        r"""
        Args:
            pixel_values: `(batch_size, num_channels, height, width)`, normalised with ImageNet mean and std.
            bool_masked_pos: `(batch_size, h * w)` boolean, patches replaced by the mask token (pre-training).
            attention_mask: optional extra attention mask, merged with the ALiBi bias.
            kwargs: transformers' output options, and this call's attention options (`attn_implementation`,
                `alibi_dense_max_tokens`, `alibi_query_chunk_size`, `alibi_chunk_memory_mb`).
        """
        encoder_outputs = self._embed_and_encode(pixel_values, bool_masked_pos, attention_mask, **kwargs)
        sequence_output = self.norm(encoder_outputs.last_hidden_state)
        return BaseModelOutputWithPooling(
            last_hidden_state=sequence_output,
            pooler_output=sequence_output[:, 0, :],
            hidden_states=encoder_outputs.hidden_states,
            attentions=encoder_outputs.attentions,
        )

    def get_patch_features(self, pixel_values: torch.Tensor, **kwargs) -> torch.Tensor:
        """Final-normed patch tokens (CLS and registers dropped) as a map of shape
        `(batch_size, hidden_size, h, w)`."""
        last_hidden_state = self(pixel_values, **kwargs).last_hidden_state
        return patch_tokens_to_map(last_hidden_state, self.num_prefix_tokens, *patch_grid(pixel_values, self.config))


class AlibiDinov3Backbone(BackboneMixin, AlibiDinov3Base):
    """ALiBi-DINOv3 as a backbone for dense-prediction heads, with the outputs of transformers' `DINOv3ViTBackbone`:
    `feature_maps` of shape `(batch_size, hidden_size, h, w)` for each stage of `config.out_features` (`(batch_size,
    h * w, hidden_size)` patch tokens when `config.reshape_hidden_states` is off), the final LayerNorm applied to the
    last stage always and to the others when `config.apply_layernorm`; `cls_tokens` of those stages when
    `config.return_class_token`; `last_hidden_state`, the final-normed last stage."""

    def __init__(self, config: AlibiDinov3Config, **kwargs) -> None:
        super().__init__(config, **kwargs)
        self.num_features = [config.hidden_size for _ in range(config.num_hidden_layers + 1)]
        self.post_init()

    @can_return_tuple
    @filter_output_hidden_states
    def forward(
        self, pixel_values: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs
    ) -> DINOv3ViTBackboneOutput:
        """`pixel_values` of shape `(batch_size, num_channels, height, width)` -> `DINOv3ViTBackboneOutput`;
        `kwargs` as for [`AlibiDinov3Model.forward`]."""
        # `filter_output_hidden_states` asks for every stage's tokens, and drops them afterwards unless requested.
        output = self._embed_and_encode(pixel_values, attention_mask=attention_mask, **kwargs)
        grid_size = patch_grid(pixel_values, self.config)
        last_stage = len(self.stage_names) - 1
        normed = [
            self.norm(hidden_state) if index == last_stage or self.config.apply_layernorm else hidden_state
            for index, hidden_state in enumerate(output.hidden_states)
        ]
        selected = [
            hidden_state for stage, hidden_state in zip(self.stage_names, normed) if stage in self.out_features
        ]
        if self.config.reshape_hidden_states:
            feature_maps = [patch_tokens_to_map(tokens, self.num_prefix_tokens, *grid_size) for tokens in selected]
        else:
            feature_maps = [tokens[:, self.num_prefix_tokens :] for tokens in selected]
        return_class_token = getattr(self.config, "return_class_token", False)
        backbone_output = DINOv3ViTBackboneOutput(
            feature_maps=tuple(feature_maps),
            cls_tokens=tuple(tokens[:, 0] for tokens in selected) if return_class_token else None,
            hidden_states=output.hidden_states,
            attentions=output.attentions,
        )
        backbone_output.last_hidden_state = normed[last_stage]
        return backbone_output


# `save_pretrained` copies this file, the configuration and `alibi_attention.py` into the output folder and writes
# `auto_map`, so that `AutoModel.from_pretrained(folder, trust_remote_code=True)` works where this project is not
# installed.
AlibiDinov3Config.register_for_auto_class()
AlibiDinov3Model.register_for_auto_class("AutoModel")
AlibiDinov3Backbone.register_for_auto_class("AutoBackbone")
# Importing the module also makes the Auto classes resolve `model_type = "alibi_dinov3"` without remote code.
AutoConfig.register(AlibiDinov3Config.model_type, AlibiDinov3Config, exist_ok=True)
AutoModel.register(AlibiDinov3Config, AlibiDinov3Model, exist_ok=True)
AutoBackbone.register(AlibiDinov3Config, AlibiDinov3Backbone, exist_ok=True)


__all__ = ["AlibiDinov3Backbone", "AlibiDinov3Model", "AlibiDinov3PreTrainedModel"]
