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

This file is copied into Hub repositories as remote code: it imports only torch, transformers and
`configuration_alibi_dinov2`.
"""

import math
from collections import OrderedDict

import torch
from torch import nn
from transformers import AttentionInterface, AttentionMaskInterface, AutoBackbone, AutoConfig, AutoModel
from transformers import initialization as init
from transformers.backbone_utils import BackboneMixin, filter_output_hidden_states
from transformers.masking_utils import create_bidirectional_mask, sdpa_mask
from transformers.modeling_outputs import BackboneOutput, BaseModelOutput, BaseModelOutputWithPooling
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
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
    from .configuration_alibi_dinov2 import ALIBI_RUNTIME_DEFAULTS, AlibiDinov2Config
except ImportError:  # imported from the project itself (top-level modules)
    from configuration_alibi_dinov2 import ALIBI_RUNTIME_DEFAULTS, AlibiDinov2Config


# Attention implementations that cannot add an arbitrary (N, N) bias to the logits.
_BIASLESS_ATTENTION = ("flash_attention_2", "flash_attention_3", "flash_attention_4", "flex_attention")
# Bias tensors kept per model: enough for the few resolutions a job alternates between, bounded for huge grids.
_BIAS_CACHE_SIZE = 8


def _axis_offsets(a: torch.Tensor, b: torch.Tensor, size: int, wrap: bool) -> torch.Tensor:
    """|a - b| along one grid axis of `size` cells; on a torus with `wrap`."""
    offsets = (a - b).abs()
    return torch.minimum(offsets, size - offsets) if wrap else offsets


def _wrap_offsets_(offsets: torch.Tensor, size: int) -> torch.Tensor:
    """In place: offsets `0 <= d < size` along an axis -> `min(d, size - d)`, the offsets on a ring of `size` cells
    (`size / 2 - |d - size / 2|`; exact for the small integers involved)."""
    half = size / 2
    return offsets.sub_(half).abs_().neg_().add_(half)


def _combine_offsets(dy: torch.Tensor, dx: torch.Tensor, metric: str) -> torch.Tensor:
    # sqrt of the sum of squares rather than `hypot`, which is no core ATen operator (exported programs keep it, for
    # backends that may lack it); exact for these small integers.
    return (dy * dy + dx * dx).sqrt() if metric == "euclidean" else dy + dx


def largest_grid_distance(height: int, width: int, metric: str = "euclidean", wrap: bool = True) -> float:
    """The largest distance between two cells of a `height x width` grid (0 for a single cell). Symbolic sizes
    (torch.compile with dynamic shapes, torch.export) give a symbolic result."""
    dy, dx = (height // 2, width // 2) if wrap else (height - 1, width - 1)
    return torch.sym_sqrt(dy * dy + dx * dx) if metric == "euclidean" else torch.sym_float(dy + dx)


def normalizing_divisor(height: int, width: int, metric: str, wrap: bool) -> float:
    """What normalisation divides the distances of a `height x width` grid by: the largest one, or 1 on a single
    cell (whose only distance is 0). No branch on the grid size, which torch.export could not keep dynamic: two
    distinct cells are at least 1 apart, so `max(largest, 1)` is exactly that."""
    return torch.sym_max(largest_grid_distance(height, width, metric, wrap), 1.0)


def _tracing() -> bool:
    """Under torch.compile or torch.export: Python-side caches would become guards, one graph per image size."""
    return torch.compiler.is_compiling() or torch.compiler.is_exporting()


def aligned_length(num_tokens: int) -> int:
    """The smallest multiple of 8 above `num_tokens`: the row length of every bias tensor, so that its rows start at
    aligned addresses as the fused SDPA kernels require. Always at least one column of padding: a bias that were a
    plain contiguous tensor at some sizes and a strided view at others would make torch.compile guard on which, and
    compile twice."""
    return (num_tokens // 8 + 1) * 8


def _token_grid_coordinates(token_index: torch.Tensor, num_prefix_tokens: int, width: int):
    """Row, column (float32) and is-patch flag of tokens laid out as `[prefix tokens, patches in row-major order]`."""
    patch_index = token_index - num_prefix_tokens
    is_patch = patch_index >= 0
    patch_index = patch_index.clamp(min=0)
    return (patch_index // width).to(torch.float32), (patch_index % width).to(torch.float32), is_patch


def alibi_distance_matrix(
    height: int,
    width: int,
    metric: str = "euclidean",
    wrap: bool = True,
    normalize: bool = True,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Distances between the patches of a `height x width` grid, in row-major token order.

    Returns:
        `torch.FloatTensor` of shape `(height * width, height * width)`, float32. With `wrap`, distances are
        measured on a torus; with `normalize` they are divided by the largest one, so they lie in [0, 1]. A grid
        with no distinct positions (1 x 1) gives zeros.
    """
    if metric not in ("euclidean", "manhattan"):
        raise ValueError(f"`metric` must be 'euclidean' or 'manhattan'; got {metric!r}.")
    rows = torch.arange(height, device=device, dtype=torch.float32)
    columns = torch.arange(width, device=device, dtype=torch.float32)
    # Per-axis tables of shape (h, 1, h, 1) and (1, w, 1, w) broadcast to (h, w, h, w): one N x N allocation.
    dy = _axis_offsets(rows[:, None, None, None], rows[None, None, :, None], height, wrap)
    dx = _axis_offsets(columns[None, :, None, None], columns[None, None, None, :], width, wrap)
    distance = _combine_offsets(dy, dx, metric).reshape(height * width, height * width)
    if normalize:
        distance.div_(normalizing_divisor(height, width, metric, wrap))
    return distance


def alibi_head_slopes(kind: str, num_heads: int) -> list[float]:
    """Fixed per-head slopes: `"constant"` (all 1) or `"geometric"` (2^(-8 (i + 1) / heads), classic ALiBi)."""
    if kind == "constant":
        return [1.0] * num_heads
    if kind == "geometric":
        return [2.0 ** (-8.0 * (head + 1) / num_heads) for head in range(num_heads)]
    raise ValueError(f"Fixed slopes are 'constant' or 'geometric'; got {kind!r}.")


def merge_attention_masks(bias: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Combine an additive bias with an optional boolean (True = attend) or additive attention mask."""
    if attention_mask is None:
        return bias
    if attention_mask.dtype == torch.bool:
        return torch.where(attention_mask, bias, torch.finfo(bias.dtype).min)
    return bias + attention_mask.to(bias.dtype)


def query_dtype(hidden_states: torch.Tensor) -> torch.dtype:
    """The dtype the attention queries will have: autocast's when it is on for this device (the projections cast
    to it while the residual stream stays float32), else that of the hidden states. A bias in any other dtype is
    copied at every call, and some fused kernels mishandle it."""
    device_type = hidden_states.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return hidden_states.dtype


def patch_tokens_to_map(hidden_state: torch.Tensor, num_prefix_tokens: int, height: int, width: int) -> torch.Tensor:
    """Drop the CLS and register tokens and fold the patch tokens into a feature map.

    Args:
        hidden_state: `(batch_size, num_prefix_tokens + height * width, hidden_size)`.
    Returns:
        `(batch_size, hidden_size, height, width)`.
    """
    patch_tokens = hidden_state[:, num_prefix_tokens:]
    batch_size, _, hidden_size = patch_tokens.shape
    return patch_tokens.reshape(batch_size, height, width, hidden_size).permute(0, 3, 1, 2).contiguous()


def check_pixel_values(pixel_values: torch.Tensor | None, num_channels: int, patch_size: int) -> None:
    """Raise a ValueError that names the problem and the fix for input the model cannot take."""
    if pixel_values is None:
        raise ValueError("`pixel_values` is required: a float tensor of shape (batch_size, channels, height, width).")
    if not isinstance(pixel_values, torch.Tensor):
        raise TypeError(f"`pixel_values` must be a torch.Tensor; got {type(pixel_values).__name__}.")
    if pixel_values.ndim != 4:
        fix = " Add the batch dimension with `pixel_values.unsqueeze(0)`." if pixel_values.ndim == 3 else ""
        raise ValueError(
            f"`pixel_values` must have shape (batch_size, channels, height, width); got a {pixel_values.ndim}-D "
            f"tensor of shape {tuple(pixel_values.shape)}.{fix}"
        )
    channels, height, width = pixel_values.shape[1:]
    if channels != num_channels:
        fix = " Repeat a grayscale image to 3 channels, e.g. `pixel_values.expand(-1, 3, -1, -1)`." if channels == 1 else ""
        raise ValueError(
            f"`pixel_values` has {channels} channels but the model expects {num_channels} "
            f"(shape {tuple(pixel_values.shape)}).{fix}"
        )
    if height < patch_size or width < patch_size:
        raise ValueError(
            f"The image ({height} x {width} px) is smaller than one {patch_size} x {patch_size} patch. "
            f"Resize or pad it to at least {patch_size} px per side."
        )


def _patch_size_of(config: AlibiDinov2Config) -> tuple[int, int]:
    patch_size = config.patch_size
    return tuple(patch_size) if isinstance(patch_size, (list, tuple)) else (patch_size, patch_size)


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


class AlibiDinov2PositionBias(nn.Module):
    """The 2D ALiBi bias added to the attention logits.

    For patch tokens i, j the bias is `-m_head * d(i, j)` with `d` from [`alibi_distance_matrix`]; rows and
    columns of the CLS and register tokens are 0. Fixed slopes ("constant", "geometric") give one bias for every
    layer, built once per (grid, device, dtype) and cached: shape `(1, 1, N, N)` when all heads share the slope,
    `(1, heads, N, N)` otherwise, broadcast over the batch, never expanded in memory, its rows padded to a
    multiple of 8 elements so that fused kernels take it without a copy. Learned slopes (`slopes` parameter of
    shape `(layers, heads)`) give one bias per layer, from a cached distance matrix.

    Under torch.compile and torch.export nothing is cached: the bias is computed inside the graph from the grid
    size (elementwise work, cheap next to the attention), so one graph with dynamic shapes serves every image size
    instead of a guard on the cache per size.

    The streamed attention paths never build the `N x N` bias: `alibi_chunked` asks for blocks of rows
    ([`~AlibiDinov2PositionBias.rows`]), `alibi_flex` for a FlexAttention `score_mod`
    ([`~AlibiDinov2PositionBias.score_mod`]).
    """

    def __init__(self, config: AlibiDinov2Config) -> None:
        super().__init__()
        self.metric = config.alibi_metric
        self.wrap = config.alibi_wrap
        self.normalize = config.alibi_normalize
        self.jitter = config.alibi_jitter
        self.num_prefix_tokens = 1 + config.num_register_tokens
        self.num_heads = config.num_attention_heads
        if config.alibi_slopes == "learned":
            self.slopes = nn.Parameter(torch.empty(config.num_hidden_layers, config.num_attention_heads))
            self.fixed_slopes = None
        else:
            self.slopes = None
            # Python floats, not tensors: models are built on the meta device when loaded.
            self.fixed_slopes = alibi_head_slopes(config.alibi_slopes, config.num_attention_heads)
        self._cache: OrderedDict = OrderedDict()

    @property
    def shared_slope(self) -> float | None:
        """The slope of every head when they all share one fixed slope, else None."""
        if self.fixed_slopes is not None and len(set(self.fixed_slopes)) == 1:
            return self.fixed_slopes[0]
        return None

    def head_slopes(self, layer_index: int, device) -> torch.Tensor:
        """Slopes of the heads of one layer, `(heads,)` float32."""
        if self.slopes is not None:
            return self.slopes[layer_index].to(device=device, dtype=torch.float32)
        # Made once per device: a copy from host memory at every layer would stall the GPU queue each time.
        return self._cached(
            ("slopes", torch.device(device)),
            lambda: torch.tensor(self.fixed_slopes, device=device, dtype=torch.float32),
        )

    def _scale(self, distance: torch.Tensor, layer_index: int) -> torch.Tensor:
        """`(rows, N)` distances -> `(1, 1 or heads, rows, N)` float32 bias."""
        slope = self.shared_slope
        if slope is not None:
            return (distance * -slope)[None, None]
        return -self.head_slopes(layer_index, distance.device)[None, :, None, None] * distance[None, None]

    def _cached(self, key: tuple, build) -> torch.Tensor:
        if _tracing():
            return build()
        # Single dictionary operations only, each atomic: threads sharing the model may evict each other's entries.
        value = self._cache.get(key)
        if value is not None:
            try:
                self._cache.move_to_end(key)
            except KeyError:  # evicted meanwhile by another thread
                pass
            return value
        # Built outside inference mode so that a bias first made for inference can later be used in training.
        with torch.inference_mode(False), torch.no_grad():
            value = build()
        self._cache[key] = value
        while len(self._cache) > _BIAS_CACHE_SIZE:
            try:
                self._cache.popitem(last=False)
            except KeyError:  # emptied meanwhile by another thread
                break
        return value

    def _padded_distance(self, height: int, width: int, device: torch.device) -> torch.Tensor:
        """`(N, aligned N)` float32 distances, N = prefix + h * w: zero in the rows and columns of the prefix tokens
        and in the alignment columns."""
        prefix = self.num_prefix_tokens
        num_tokens = prefix + height * width
        padded = torch.zeros(num_tokens, aligned_length(num_tokens), device=device)
        padded[prefix:, prefix:num_tokens] = alibi_distance_matrix(
            height, width, self.metric, self.wrap, self.normalize, device=device
        )
        return padded

    def _fixed_bias(self, height: int, width: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """`(1, 1 or heads, N, N)` bias of the fixed slopes in `dtype`, a view of aligned rows."""
        distance = self._padded_distance(height, width, device)
        return self._scale(distance, 0).to(dtype)[..., : distance.shape[0]]

    def _with_jitter(self, bias: torch.Tensor) -> torch.Tensor:
        """`bias` plus Gaussian noise of standard deviation `alibi_jitter`, again a view of aligned rows (an
        out-of-place sum of such a view would be allocated unaligned)."""
        columns = bias.shape[-1]
        noise = torch.randn(*bias.shape[:-1], aligned_length(columns), dtype=bias.dtype, device=bias.device)
        return noise[..., :columns].mul_(self.jitter).add_(bias)

    def grid_bias(self, grid_size: tuple[int, int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """What every layer's bias on a `grid_size = (h, w)` patch grid starts from, made once per forward pass (and
        cached outside compilation): the bias itself for fixed slopes, `(1, 1 or heads, N, N)` in `dtype`; the
        distances for learned slopes, `(N, aligned N)` float32."""
        height, width = grid_size
        if self.slopes is None:
            key = ("bias", height, width, torch.device(device), dtype)
            return self._cached(key, lambda: self._fixed_bias(height, width, device, dtype))
        key = ("distance", height, width, torch.device(device))
        return self._cached(key, lambda: self._padded_distance(height, width, device))

    def layer_bias(self, grid_bias: torch.Tensor, layer_index: int, dtype: torch.dtype) -> torch.Tensor:
        """Bias of layer `layer_index` from [`~AlibiDinov2PositionBias.grid_bias`]: `(1, 1 or heads, N, N)` in
        `dtype`, a view of rows padded to a multiple of 8 elements."""
        bias = grid_bias
        if self.slopes is not None:
            # Scaled at full width, then sliced: the view keeps the aligned rows.
            bias = self._scale(grid_bias, layer_index).to(dtype)[..., : grid_bias.shape[0]]
        return self._with_jitter(bias) if self.jitter > 0 else bias

    def forward(
        self, grid_size: tuple[int, int], layer_index: int, dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        """Bias for layer `layer_index` on a `grid_size = (h, w)` patch grid: `(1, 1 or heads, N, N)` in `dtype`,
        a view of rows padded to a multiple of 8 elements."""
        return self.layer_bias(self.grid_bias(grid_size, dtype, device), layer_index, dtype)

    def rows(
        self,
        grid_size: tuple[int, int],
        layer_index: int,
        start: int,
        stop: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> torch.Tensor:
        """Rows `start:stop` of the bias of layer `layer_index`: `(1, 1 or heads, stop - start, N)` in `dtype`
        (a view of rows padded to a multiple of 8 elements), computed from token coordinates without the `N x N`
        matrix."""
        height, width = grid_size
        prefix = self.num_prefix_tokens
        num_tokens = prefix + height * width
        query_y, query_x, _ = _token_grid_coordinates(torch.arange(start, stop, device=device), prefix, width)
        key_index = torch.arange(aligned_length(num_tokens), device=device)
        key_y, key_x, _ = _token_grid_coordinates(key_index, prefix, width)
        # In place wherever possible: two (rows, N) temporaries per block instead of a dozen, which keeps both the
        # memory traffic and the allocator's churn (freed blocks glibc keeps resident) down on large grids.
        distance = (query_y[:, None] - key_y[None, :]).abs_()
        dx = (query_x[:, None] - key_x[None, :]).abs_()
        if self.wrap:
            _wrap_offsets_(distance, height)
            _wrap_offsets_(dx, width)
        if self.metric == "euclidean":
            distance = distance.square_().add_(dx.square_()).sqrt_()
        else:
            distance = distance.add_(dx)
        del dx
        if self.normalize:
            distance.div_(normalizing_divisor(height, width, self.metric, self.wrap))
        # CLS and register rows and columns, and the alignment columns (sliced off below): no bias.
        distance[: max(0, prefix - start)] = 0
        distance[:, :prefix] = 0
        distance[:, num_tokens:] = 0
        slope = self.shared_slope
        bias = distance.mul_(-slope)[None, None] if slope is not None else self._scale(distance, layer_index)
        bias = bias.to(dtype)[..., :num_tokens]
        return self._with_jitter(bias) if self.jitter > 0 else bias

    def score_mod(self, grid_size: tuple[int, int], layer_index: int, device: torch.device):
        """A FlexAttention `score_mod` adding this layer's bias, computed from the token indices alone."""
        if self.jitter > 0:
            raise ValueError('`alibi_jitter` is not supported by attn_implementation="alibi_flex"; use "alibi_chunked".')
        height, width = grid_size
        prefix, metric, wrap = self.num_prefix_tokens, self.metric, self.wrap
        scale = 1.0 / normalizing_divisor(height, width, metric, wrap) if self.normalize else 1.0
        slopes = self.head_slopes(layer_index, device) * scale

        def add_alibi_bias(score, batch_index, head_index, query_index, key_index):
            query_y, query_x, query_is_patch = _token_grid_coordinates(query_index, prefix, width)
            key_y, key_x, key_is_patch = _token_grid_coordinates(key_index, prefix, width)
            distance = _combine_offsets(
                _axis_offsets(query_y, key_y, height, wrap), _axis_offsets(query_x, key_x, width, wrap), metric
            )
            bias = torch.where(query_is_patch & key_is_patch, -slopes[head_index] * distance, 0.0)
            return score + bias.to(score.dtype)

        return add_alibi_bias


def alibi_query_block_size(num_tokens: int, num_heads: int, max_chunk_size: int, memory_mb: float) -> int:
    """Queries per block of the chunked path: at most `max_chunk_size`, and few enough that one block's scores
    (per head) and bias rows (with their distance temporaries), float32, fit in `memory_mb`."""
    bytes_per_query = num_tokens * (num_heads + 4) * 4
    return int(max(1, min(max_chunk_size, num_tokens, memory_mb * 2**20 // bytes_per_query)))


def alibi_chunked_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    alibi: AlibiDinov2PositionBias | None = None,
    alibi_grid_size: tuple[int, int] | None = None,
    alibi_layer_index: int = 0,
    alibi_query_chunk_size: int = ALIBI_RUNTIME_DEFAULTS["alibi_query_chunk_size"],
    alibi_chunk_memory_mb: float = ALIBI_RUNTIME_DEFAULTS["alibi_chunk_memory_mb"],
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Exact attention with the ALiBi bias, one block of queries at a time (`attn_implementation="alibi_chunked"`).

    Each block of queries (`alibi_query_chunk_size` at most, fewer when a block's scores would exceed
    `alibi_chunk_memory_mb`) gets its rows of the bias and one SDPA call, so memory grows linearly with the token
    count instead of quadratically; no compilation is involved.

    Args:
        query, key, value: `(batch_size, heads, N, head_dim)`.
    Returns:
        `(batch_size, N, heads, head_dim)` and no attention weights.
    """
    num_tokens = query.shape[2]
    chunk_size = alibi_query_block_size(num_tokens, query.shape[1], alibi_query_chunk_size, alibi_chunk_memory_mb)
    outputs = []
    for start in range(0, num_tokens, chunk_size):
        stop = min(start + chunk_size, num_tokens)
        mask = None if attention_mask is None else attention_mask[..., start:stop, :]
        if alibi is not None:
            bias = alibi.rows(alibi_grid_size, alibi_layer_index, start, stop, query.dtype, query.device)
            mask = merge_attention_masks(bias, mask)
        outputs.append(
            nn.functional.scaled_dot_product_attention(
                query[:, :, start:stop], key, value, attn_mask=mask, dropout_p=dropout, scale=scaling
            )
        )
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None


_compiled_flex_attention = None


def compile_flex_attention(backend="inductor"):
    """`flex_attention` compiled for the ALiBi `score_mod`. Shapes are left to torch.compile's automatic dynamic mode:
    a static compile (`dynamic=False`) recompiles for every new image size and, past dynamo's recompile limit (8
    sizes), silently falls back to the unfused form that materialises all `N x N` scores."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, backend=backend)


def _flex_attention_kernel(device: torch.device):
    """FlexAttention, compiled into a fused kernel on GPUs. On CPU the uncompiled form materialises the scores
    (correct, for checks); `alibi_chunked` is the bounded-memory path there."""
    global _compiled_flex_attention
    if device.type == "cpu":
        from torch.nn.attention.flex_attention import flex_attention

        return flex_attention
    if _compiled_flex_attention is None:
        _compiled_flex_attention = compile_flex_attention()
    return _compiled_flex_attention


def alibi_flex_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    alibi: AlibiDinov2PositionBias | None = None,
    alibi_grid_size: tuple[int, int] | None = None,
    alibi_layer_index: int = 0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention through FlexAttention with the ALiBi bias computed inside the kernel from token indices
    (`attn_implementation="alibi_flex"`): no `N x N` tensor at all.

    Args:
        query, key, value: `(batch_size, heads, N, head_dim)`.
    Returns:
        `(batch_size, N, heads, head_dim)` and no attention weights.
    """
    if dropout > 0:
        raise ValueError('attn_implementation="alibi_flex" does not support attention dropout; use "alibi_chunked".')
    if attention_mask is not None:
        raise ValueError('attn_implementation="alibi_flex" takes no attention_mask; use "alibi_chunked" or "sdpa".')
    score_mod = None
    if alibi is not None:
        score_mod = alibi.score_mod(alibi_grid_size, alibi_layer_index, query.device)
    output = _flex_attention_kernel(query.device)(query, key, value, score_mod=score_mod, scale=scaling)
    return output.transpose(1, 2).contiguous(), None


# Streamed paths: registered with transformers' attention interface, so `attn_implementation` selects them.
STREAMED_ATTENTION = {"alibi_chunked": alibi_chunked_attention_forward, "alibi_flex": alibi_flex_attention_forward}
for _name, _function in STREAMED_ATTENTION.items():
    AttentionInterface.register(_name, _function)
    AttentionMaskInterface.register(_name, sdpa_mask)


def _check_attention_takes_bias(attn_implementation: str | None) -> None:
    if attn_implementation in _BIASLESS_ATTENTION:
        raise ValueError(
            f'attn_implementation="{attn_implementation}" cannot add the 2D ALiBi bias to the attention logits. '
            'Use attn_implementation="sdpa" (default, fused) or "eager"; for long inputs "alibi_chunked" (memory '
            'linear in the token count) or "alibi_flex" (FlexAttention with the bias computed in the kernel); or set '
            '`use_alibi=False` in the config.'
        )


def _runtime_option(name: str, value: float) -> float:
    """A memory option of the attention, checked: the token bound may be 0 (stream every input), the others > 0."""
    if name == "alibi_dense_max_tokens" and not value >= 0:
        raise ValueError(f"`{name}` must be >= 0 (0 streams every input); got {value}.")
    if name != "alibi_dense_max_tokens" and not value > 0:
        raise ValueError(f"`{name}` must be positive; got {value}.")
    return value


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
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query_states = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        key_states = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(
            attn_implementation or self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **kwargs,
        )
        attn_output = self.o_proj(attn_output.reshape(*input_shape, -1).contiguous())
        return attn_output, attn_weights


class AlibiDinov2Layer(Dinov2WithRegistersLayer):
    """transformers' DINOv2 layer with [`AlibiDinov2Attention`]; parameters and their names are unchanged."""

    def __init__(self, config: AlibiDinov2Config) -> None:
        super().__init__(config)
        self.attention = AlibiDinov2Attention(config)


class AlibiDinov2PreTrainedModel(Dinov2WithRegistersPreTrainedModel):
    """Weight initialisation, attention-implementation checks and the shared embed-and-encode step."""

    config_class = AlibiDinov2Config
    config: AlibiDinov2Config
    base_model_prefix = "alibi_dinov2"
    _no_split_modules = ["AlibiDinov2Embeddings", "AlibiDinov2Layer"]
    _can_compile_fullgraph = True  # under compilation the bias is computed in the graph, the cache left alone

    def __init__(self, config: AlibiDinov2Config, *inputs, **kwargs) -> None:
        # The attention's memory options (`ALIBI_RUNTIME_DEFAULTS`): keyword arguments of the constructor and of
        # `from_pretrained`, kept as attributes of the model, and overridable per call.
        options = {name: kwargs.pop(name, default) for name, default in ALIBI_RUNTIME_DEFAULTS.items()}
        super().__init__(config, *inputs, **kwargs)
        for name, value in options.items():
            setattr(self, name, _runtime_option(name, value))

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
        if isinstance(module, AlibiDinov2PositionBias) and module.slopes is not None:
            init.uniform_(module.slopes, 0.0, 1.0)

    def _flash_attn_can_dispatch(self, flash_attn_version: int, is_init_check: bool = False) -> bool:
        if self.config.use_alibi:
            _check_attention_takes_bias(f"flash_attention_{flash_attn_version}")
        return super()._flash_attn_can_dispatch(flash_attn_version, is_init_check=is_init_check)

    def _flex_attn_can_dispatch(self, is_init_check: bool = False) -> bool:
        if self.config.use_alibi:
            _check_attention_takes_bias("flex_attention")
        return super()._flex_attn_can_dispatch(is_init_check=is_init_check)

    def _attention_plan(self, num_tokens: int, kwargs: dict) -> dict:
        """The attention of one call: pops the per-call options from `kwargs` and returns the encoder's keyword
        arguments, `attn_implementation` included. Nothing is written to the model or its config."""
        options = {}
        for name in ALIBI_RUNTIME_DEFAULTS:
            value = kwargs.pop(name, None)
            options[name] = getattr(self, name) if value is None else _runtime_option(name, value)
        implementation = kwargs.pop("attn_implementation", None)
        if implementation is not None and implementation not in STREAMED_ATTENTION:
            raise ValueError(
                f"Per call, `attn_implementation` picks one of the streamed paths {tuple(STREAMED_ATTENTION)}; got "
                f"{implementation!r}. Set the model's own with `model.set_attn_implementation({implementation!r})`."
            )
        implementation = implementation or self.config._attn_implementation
        if self.config.use_alibi:
            _check_attention_takes_bias(implementation)
        if (
            self.config.use_alibi
            and implementation in ("sdpa", "eager")
            and num_tokens > options["alibi_dense_max_tokens"]
            and not kwargs.get("output_attentions", self.config.output_attentions)
        ):
            implementation = "alibi_chunked"  # a dense bias this large would dominate memory: stream it
        plan = {"attn_implementation": implementation}
        if implementation == "alibi_chunked":
            plan.update((name, options[name]) for name in ("alibi_query_chunk_size", "alibi_chunk_memory_mb"))
        return plan

    def _embed_and_encode(
        self,
        pixel_values: torch.Tensor,
        bool_masked_pos: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> BaseModelOutput:
        """Check the input, embed it and run the encoder with the ALiBi bias of its grid, on the attention path
        chosen for this call."""
        patch_height, patch_width = _patch_size_of(self.config)
        check_pixel_values(pixel_values, self.config.num_channels, min(patch_height, patch_width))
        height, width = pixel_values.shape[-2:]
        num_tokens = self.embeddings.num_prefix_tokens + (height // patch_height) * (width // patch_width)
        kwargs.update(self._attention_plan(num_tokens, kwargs))
        embedding_output = self.embeddings(pixel_values, bool_masked_pos=bool_masked_pos)
        attention_mask = create_bidirectional_mask(
            config=self.config, inputs_embeds=embedding_output, attention_mask=attention_mask
        )
        grid_size = (height // patch_height, width // patch_width)
        return self.encoder(embedding_output, grid_size=grid_size, attention_mask=attention_mask, **kwargs)


class AlibiDinov2Encoder(AlibiDinov2PreTrainedModel):
    """transformers' DINOv2 layers, each attending with the ALiBi bias of the input's patch grid."""

    def __init__(self, config: AlibiDinov2Config) -> None:
        super().__init__(config)
        self.layer = nn.ModuleList([AlibiDinov2Layer(config) for _ in range(config.num_hidden_layers)])
        self.alibi = AlibiDinov2PositionBias(config) if config.use_alibi else None
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
        streamed = attn_implementation in STREAMED_ATTENTION
        kwargs["attn_implementation"] = attn_implementation
        # Every layer's queries share one dtype and device (the residual stream keeps its dtype across layers).
        bias_dtype = query_dtype(hidden_states)
        if self.alibi is not None and not streamed:
            grid_bias = self.alibi.grid_bias(grid_size, bias_dtype, hidden_states.device)
        for layer_index, layer_module in enumerate(self.layer):
            layer_mask, alibi_kwargs = attention_mask, {}
            if streamed:
                # The attention function computes the bias itself, from the grid geometry.
                alibi_kwargs = dict(alibi=self.alibi, alibi_grid_size=grid_size, alibi_layer_index=layer_index)
            elif self.alibi is not None:
                bias = self.alibi.layer_bias(grid_bias, layer_index, bias_dtype)
                layer_mask = merge_attention_masks(bias, attention_mask)
            hidden_states = layer_module(hidden_states, layer_mask, **kwargs, **alibi_kwargs)
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
    - `alibi_chunk_memory_mb` (256): bound on one block's scores and bias rows; blocks shrink below
      `alibi_query_chunk_size` to stay under it.

    A call may also pick a streamed path for itself, `attn_implementation="alibi_chunked"` or `"alibi_flex"`, whatever
    the model's own implementation:

    ```python
    >>> model = AlibiDinov2Model.from_pretrained(folder, alibi_chunk_memory_mb=512)
    >>> features = model.get_patch_features(pixel_values, attn_implementation="alibi_chunked", alibi_chunk_memory_mb=64)
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
        """Final-normed patch tokens (CLS and registers dropped) as a map of shape `(batch_size, hidden_size, h, w)`."""
        last_hidden_state = self(pixel_values, **kwargs).last_hidden_state
        patch_height, patch_width = _patch_size_of(self.config)
        height, width = pixel_values.shape[-2] // patch_height, pixel_values.shape[-1] // patch_width
        return patch_tokens_to_map(last_hidden_state, self.embeddings.num_prefix_tokens, height, width)


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
        patch_height, patch_width = _patch_size_of(self.config)
        height, width = pixel_values.shape[-2] // patch_height, pixel_values.shape[-1] // patch_width
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
        return BackboneOutput(feature_maps=feature_maps, hidden_states=output.hidden_states, attentions=output.attentions)


# `save_pretrained` copies this file and the configuration into the output folder and writes `auto_map`, so that
# `AutoModel.from_pretrained(folder, trust_remote_code=True)` works where this project is not installed.
AlibiDinov2Config.register_for_auto_class()
AlibiDinov2Model.register_for_auto_class("AutoModel")
AlibiDinov2Backbone.register_for_auto_class("AutoBackbone")
# Importing the module also makes the Auto classes resolve `model_type = "alibi_dinov2"` without remote code.
AutoConfig.register(AlibiDinov2Config.model_type, AlibiDinov2Config, exist_ok=True)
AutoModel.register(AlibiDinov2Config, AlibiDinov2Model, exist_ok=True)
AutoBackbone.register(AlibiDinov2Config, AlibiDinov2Backbone, exist_ok=True)


__all__ = [
    "AlibiDinov2Backbone",
    "AlibiDinov2Model",
    "AlibiDinov2PreTrainedModel",
    "alibi_distance_matrix",
    "alibi_query_block_size",
    "patch_tokens_to_map",
]
