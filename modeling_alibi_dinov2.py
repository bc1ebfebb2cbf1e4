# Copyright 2026 The alibi-dinov2 authors. Licensed under the Apache License, Version 2.0.
"""PyTorch ALiBi-DINOv2: DINOv2 with a 2D ALiBi attention bias instead of a learned absolute position embedding.

DINOv2's learned position embedding leaks into its output features (some channels are nearly pure left-right or
radial ramps). ALiBi-DINOv2 drops it and adds, in every attention layer, a bias that falls linearly with the
(wrapped, normalised) distance between patch positions, so that features describe what a patch shows rather than
where it sits.

The model reuses transformers' DINOv2-with-registers patch embedding, transformer layers, attention and
LayerScale; the bias reaches the attention as its additive `attention_mask`, so the `sdpa` path runs it inside
`torch.nn.functional.scaled_dot_product_attention`. The attention function is chosen per call (a large input streams
its bias through `alibi_chunked`), so the model never writes to its configuration while it runs.

This file is copied into Hub repositories as remote code: it imports only torch, transformers,
`configuration_alibi_dinov2` and `alibi_attention` (the bias and attention paths, shared with ALiBi-DINOv3).
"""

import math

import torch
from torch import nn
from transformers import AutoBackbone, AutoConfig, AutoModel
from transformers import initialization as init
from transformers.backbone_utils import BackboneMixin, filter_output_hidden_states
from transformers.modeling_outputs import BackboneOutput, BaseModelOutput, BaseModelOutputWithPooling
from transformers.models.dinov2_with_registers.modeling_dinov2_with_registers import (
    Dinov2WithRegistersAttention,
    Dinov2WithRegistersLayer,
    Dinov2WithRegistersPatchEmbeddings,
    Dinov2WithRegistersPreTrainedModel,
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
    from .configuration_alibi_dinov2 import AlibiDinov2Config
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
    from configuration_alibi_dinov2 import AlibiDinov2Config


class AlibiDinov2Embeddings(nn.Module):
    """CLS token, register tokens, mask token and patch embeddings; the learned absolute position embedding only
    when `config.use_absolute_position_embeddings` (stock DINOv2 behaviour).

    Token order of the output: `[CLS, register_1 .. register_R, patches in row-major order]`.
    """

    def __init__(self, config: AlibiDinov2Config) -> None:
        super().__init__()
        self.config = config
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.mask_token = nn.Parameter(torch.zeros(1, config.hidden_size))
        self.patch_embeddings = Dinov2WithRegistersPatchEmbeddings(config)
        if config.use_absolute_position_embeddings:
            self.position_embeddings = nn.Parameter(
                torch.zeros(1, self.patch_embeddings.num_patches + 1, config.hidden_size)
            )
        else:
            self.position_embeddings = None
        if config.num_register_tokens > 0:
            self.register_tokens = nn.Parameter(torch.zeros(1, config.num_register_tokens, config.hidden_size))
        else:
            self.register_tokens = None
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    @property
    def num_prefix_tokens(self) -> int:
        return 1 + self.config.num_register_tokens

    def interpolate_pos_encoding(self, num_patches: int, height: int, width: int) -> torch.Tensor:
        """Learned position embedding (CLS position first) resized bicubically to the grid of a `height x width`
        px input. Shape `(1, 1 + grid_h * grid_w, hidden_size)`. Antialiasing follows `config.interpolate_antialias`
        (transformers' `Dinov2WithRegistersModel` antialiases, `Dinov2Model` does not)."""
        num_positions = self.position_embeddings.shape[1] - 1
        if not torch.jit.is_tracing() and num_patches == num_positions and height == width:
            return self.position_embeddings
        class_pos_embed = self.position_embeddings[:, :1]
        patch_pos_embed = self.position_embeddings[:, 1:]
        dim = patch_pos_embed.shape[-1]
        side = int(math.sqrt(num_positions))
        patch_height, patch_width = self.patch_embeddings.patch_size
        patch_pos_embed = patch_pos_embed.reshape(1, side, side, dim).permute(0, 3, 1, 2)
        # Resampled in float32: bicubic interpolation in half precision shifts the embedding.
        patch_pos_embed = nn.functional.interpolate(
            patch_pos_embed.to(torch.float32),
            size=(height // patch_height, width // patch_width),
            mode="bicubic",
            align_corners=False,
            antialias=self.config.interpolate_antialias,
        ).to(self.position_embeddings.dtype)
        patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).reshape(1, -1, dim)
        return torch.cat((class_pos_embed, patch_pos_embed), dim=1)

    def forward(self, pixel_values: torch.Tensor, bool_masked_pos: torch.Tensor | None = None) -> torch.Tensor:
        """`(batch_size, channels, height, width)` -> `(batch_size, 1 + R + grid_h * grid_w, hidden_size)`."""
        batch_size, _, height, width = pixel_values.shape
        embeddings = self.patch_embeddings(pixel_values)
        if bool_masked_pos is not None:
            embeddings = torch.where(
                bool_masked_pos.unsqueeze(-1), self.mask_token.to(embeddings.dtype).unsqueeze(0), embeddings
            )
        embeddings = torch.cat((self.cls_token.expand(batch_size, -1, -1), embeddings), dim=1)
        if self.position_embeddings is not None:
            embeddings = embeddings + self.interpolate_pos_encoding(embeddings.shape[1] - 1, height, width)
        if self.register_tokens is not None:
            registers = self.register_tokens.expand(batch_size, -1, -1)
            embeddings = torch.cat((embeddings[:, :1], registers, embeddings[:, 1:]), dim=1)
        return self.dropout(embeddings)




class AlibiDinov2Attention(Dinov2WithRegistersAttention):
    """transformers' DINOv2 attention (same projections and weights) whose attention function can be chosen for one
    call: `attn_implementation` passed to `forward` overrides `config._attn_implementation`, which the model shares
    between calls and threads and therefore never changes while it runs."""

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        attn_implementation: str | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`(batch_size, N, hidden_size)` -> `(batch_size, N, hidden_size)` and the attention weights (eager only)."""
        query, key, value = attention_heads(self, hidden_states)
        return attend(
            self, query, key, value, attention_mask, attn_implementation, eager_attention_forward,
            self.attention_dropout, **kwargs,
        )


class AlibiDinov2Layer(Dinov2WithRegistersLayer):
    """transformers' DINOv2 layer with [`AlibiDinov2Attention`]; parameters and their names are unchanged."""

    def __init__(self, config: AlibiDinov2Config) -> None:
        super().__init__(config)
        self.attention = AlibiDinov2Attention(config)


class AlibiDinov2PreTrainedModel(AlibiAttentionMixin, Dinov2WithRegistersPreTrainedModel):
    """Weight initialisation and the shared embed-and-encode step; the attention's options, checks and per-call path
    come from [`AlibiAttentionMixin`]."""

    config_class = AlibiDinov2Config
    config: AlibiDinov2Config
    base_model_prefix = "alibi_dinov2"
    _no_split_modules = ["AlibiDinov2Embeddings", "AlibiDinov2Layer"]
    _can_compile_fullgraph = True  # under compilation the bias is computed in the graph, the cache left alone

    @torch.no_grad()
    def _init_weights(self, module) -> None:
        super()._init_weights(module)
        if isinstance(module, AlibiDinov2Embeddings):
            init.trunc_normal_(module.cls_token, mean=0.0, std=self.config.initializer_range)
            init.zeros_(module.mask_token)
            if module.position_embeddings is not None:
                init.trunc_normal_(module.position_embeddings, mean=0.0, std=self.config.initializer_range)
            if module.register_tokens is not None:
                init.zeros_(module.register_tokens)
        if isinstance(module, AlibiPositionBias) and module.slopes is not None:
            init.uniform_(module.slopes, 0.0, 1.0)

    def _embed_and_encode(
        self,
        pixel_values: torch.Tensor,
        bool_masked_pos: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> BaseModelOutput:
        """Check the input, embed it and run the encoder with the ALiBi bias of its grid, on the attention path
        chosen for this call."""
        grid_size = patch_grid(pixel_values, self.config)
        kwargs.update(self._attention_plan(self.embeddings.num_prefix_tokens + grid_size[0] * grid_size[1], kwargs))
        embedding_output = self.embeddings(pixel_values, bool_masked_pos=bool_masked_pos)
        attention_mask = extra_attention_mask(self.config, embedding_output, attention_mask)
        return self.encoder(embedding_output, grid_size=grid_size, attention_mask=attention_mask, **kwargs)


class AlibiDinov2Encoder(AlibiDinov2PreTrainedModel):
    """transformers' DINOv2 layers, each attending with the ALiBi bias of the input's patch grid."""

    def __init__(self, config: AlibiDinov2Config) -> None:
        super().__init__(config)
        self.layer = nn.ModuleList([AlibiDinov2Layer(config) for _ in range(config.num_hidden_layers)])
        self.alibi = AlibiPositionBias(config) if config.use_alibi else None
        self.post_init()

    @merge_with_config_defaults
    @capture_outputs(tie_last_hidden_states=False)
    def forward(
        self,
        hidden_states: torch.Tensor,
        grid_size: tuple[int, int],
        attention_mask: torch.Tensor | None = None,
        attn_implementation: str | None = None,
        **kwargs,
    ) -> BaseModelOutput:
        """
        Args:
            hidden_states: `(batch_size, 1 + R + h * w, hidden_size)` embeddings.
            grid_size: `(h, w)`, the patch grid the tokens come from.
            attention_mask: optional extra mask (boolean or additive), merged with the ALiBi bias.
            attn_implementation: attention path of this call (default: `config._attn_implementation`); the streamed
                paths take their options (`alibi_query_chunk_size`, ...) from `kwargs`.
        """
        attn_implementation = attn_implementation or self.config._attn_implementation
        hidden_states = run_alibi_layers(
            self.layer, self.alibi, hidden_states, grid_size, attention_mask, attn_implementation, **kwargs
        )
        return BaseModelOutput(last_hidden_state=hidden_states)


class AlibiDinov2Model(AlibiDinov2PreTrainedModel):
    """ALiBi-DINOv2 image encoder.

    Outputs follow transformers' `Dinov2WithRegistersModel`: `last_hidden_state` of shape
    `(batch_size, 1 + R + h * w, hidden_size)` = `[CLS, registers, patches]` after the final LayerNorm,
    `pooler_output` (the CLS token), and on request `hidden_states` and `attentions` (eager only). The patch grid
    is `h = H // patch_size`, `w = W // patch_size` for any `H, W >= patch_size`.

    Patch features as a `(batch_size, hidden_size, h, w)` map, in one line:

    ```python
    >>> features = model.get_patch_features(pixel_values)
    ```

    The attention's memory options are keyword arguments of the constructor and of `from_pretrained`, kept as
    attributes of the model, and of every call (`forward`, `get_patch_features`), which overrides them for that call:

    - `alibi_dense_max_tokens` (8192): above this many tokens `sdpa` and `eager` stream the bias through
      `alibi_chunked` instead of building the `N x N` matrix (0 streams every input);
    - `alibi_query_chunk_size` (1024): most queries per block of `alibi_chunked`;
    - `alibi_chunk_memory_mb` (1024): bound on one block's scores and bias rows; blocks shrink below
      `alibi_query_chunk_size` to stay under it.

    A call may also pick a streamed path for itself, `attn_implementation="alibi_chunked"` or `"alibi_flex"`, whatever
    the model's own implementation:

    ```python
    >>> model = AlibiDinov2Model.from_pretrained(folder, alibi_chunk_memory_mb=512)
    >>> features = model.get_patch_features(
    ...     pixel_values, attn_implementation="alibi_chunked", alibi_chunk_memory_mb=64
    ... )
    ```
    """

    def __init__(self, config: AlibiDinov2Config, **kwargs) -> None:
        super().__init__(config, **kwargs)
        self.config = config
        self.embeddings = AlibiDinov2Embeddings(config)
        self.encoder = AlibiDinov2Encoder(config)
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_init()

    def get_input_embeddings(self) -> Dinov2WithRegistersPatchEmbeddings:
        return self.embeddings.patch_embeddings

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
                `alibi_dense_max_tokens`, `alibi_query_chunk_size`, `alibi_chunk_memory_mb`; see the class).
        """
        encoder_outputs = self._embed_and_encode(pixel_values, bool_masked_pos, attention_mask, **kwargs)
        sequence_output = self.layernorm(encoder_outputs.last_hidden_state)
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
        grid_size = patch_grid(pixel_values, self.config)
        return patch_tokens_to_map(last_hidden_state, self.embeddings.num_prefix_tokens, *grid_size)


class AlibiDinov2Backbone(BackboneMixin, AlibiDinov2PreTrainedModel):
    """ALiBi-DINOv2 as a backbone for dense-prediction heads: `feature_maps` of shape
    `(batch_size, hidden_size, h, w)` for each stage of `config.out_features` (final LayerNorm applied when
    `config.apply_layernorm`; `(batch_size, N, hidden_size)` tokens when `config.reshape_hidden_states` is off)."""

    def __init__(self, config: AlibiDinov2Config, **kwargs) -> None:
        super().__init__(config, **kwargs)
        self.num_features = [config.hidden_size for _ in range(config.num_hidden_layers + 1)]
        self.embeddings = AlibiDinov2Embeddings(config)
        self.encoder = AlibiDinov2Encoder(config)
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_init()

    def get_input_embeddings(self) -> Dinov2WithRegistersPatchEmbeddings:
        return self.embeddings.patch_embeddings

    @can_return_tuple
    @filter_output_hidden_states
    def forward(
        self, pixel_values: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs
    ) -> BackboneOutput:
        """`pixel_values` of shape `(batch_size, num_channels, height, width)` -> `BackboneOutput`; `kwargs` as for
        [`AlibiDinov2Model.forward`]."""
        output = self._embed_and_encode(pixel_values, attention_mask=attention_mask, **kwargs)
        height, width = patch_grid(pixel_values, self.config)
        feature_maps = ()
        for stage, hidden_state in zip(self.stage_names, output.hidden_states):
            if stage in self.out_features:
                if self.config.apply_layernorm:
                    hidden_state = self.layernorm(hidden_state)
                if self.config.reshape_hidden_states:
                    hidden_state = patch_tokens_to_map(
                        hidden_state, self.embeddings.num_prefix_tokens, height, width
                    )
                feature_maps += (hidden_state,)
        return BackboneOutput(
            feature_maps=feature_maps, hidden_states=output.hidden_states, attentions=output.attentions
        )


# `save_pretrained` copies this file and the configuration into the output folder and writes `auto_map`, so that
# `AutoModel.from_pretrained(folder, trust_remote_code=True)` works where this project is not installed.
AlibiDinov2Config.register_for_auto_class()
AlibiDinov2Model.register_for_auto_class("AutoModel")
AlibiDinov2Backbone.register_for_auto_class("AutoBackbone")
# Importing the module also makes the Auto classes resolve `model_type = "alibi_dinov2"` without remote code.
AutoConfig.register(AlibiDinov2Config.model_type, AlibiDinov2Config, exist_ok=True)
AutoModel.register(AlibiDinov2Config, AlibiDinov2Model, exist_ok=True)
AutoBackbone.register(AlibiDinov2Config, AlibiDinov2Backbone, exist_ok=True)


__all__ = ["AlibiDinov2Backbone", "AlibiDinov2Model", "AlibiDinov2PreTrainedModel"]
