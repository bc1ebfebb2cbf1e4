# Copyright 2026 The alibi-dinov2 authors. Licensed under the Apache License, Version 2.0.
"""The 2D ALiBi attention bias of ALiBi-DINOv2 and ALiBi-DINOv3: one implementation for both model types.

The bias added to the attention logits between patch tokens i and j at grid positions (y, x) is
`-m_head * d(i, j) / d_max`, `d` the (wrapped) Euclidean or Manhattan distance on the patch grid; the rows and
columns of the CLS and register tokens get 0. This module holds the options of the bias, the distances, the bias
module with its cache, the streamed attention paths (`alibi_chunked`, `alibi_flex`, registered with transformers'
attention interface), the choice of the attention path per call, and the input checks both models share.

This file is copied into Hub repositories as remote code beside the modeling and configuration files: it imports
only torch and transformers.
"""

from collections import OrderedDict

import torch
from torch import nn
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.masking_utils import create_bidirectional_mask, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import logging


logger = logging.get_logger(__name__)

ALIBI_METRICS = ("euclidean", "manhattan")
ALIBI_SLOPES = ("constant", "geometric", "learned")
# Memory options of the attention at run time, with their defaults. They describe the machine, not the weights: the
# model takes them at load time (`from_pretrained(folder, alibi_chunk_memory_mb=512)`) or per call
# (`model(pixel_values, alibi_chunk_memory_mb=512)`), and no configuration stores them.
ALIBI_RUNTIME_DEFAULTS = {
    "alibi_dense_max_tokens": 8192,
    "alibi_query_chunk_size": 1024,
    "alibi_chunk_memory_mb": 1024,
}



def _check_choice(name: str, value, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"`{name}` must be one of {', '.join(repr(a) for a in allowed)}; got {value!r}.")


def check_alibi_config(config, kwargs: dict) -> None:
    """Check the ALiBi fields of a model configuration, and drop from `kwargs` (the configuration's extra keyword
    arguments) the runtime options that configurations saved by earlier versions carry, with a warning where a
    value differs from its default, so that they are not saved again."""
    _check_choice("alibi_metric", config.alibi_metric, ALIBI_METRICS)
    _check_choice("alibi_slopes", config.alibi_slopes, ALIBI_SLOPES)
    if config.alibi_jitter < 0:
        raise ValueError(f"`alibi_jitter` is a standard deviation and must be >= 0; got {config.alibi_jitter}.")
    if config.num_register_tokens < 0:
        raise ValueError(f"`num_register_tokens` must be >= 0; got {config.num_register_tokens}.")
    if config.hidden_size % config.num_attention_heads != 0:
        raise ValueError(
            f"`hidden_size` ({config.hidden_size}) must be a multiple of `num_attention_heads` "
            f"({config.num_attention_heads})."
        )
    for name, default in ALIBI_RUNTIME_DEFAULTS.items():
        value = kwargs.pop(name, default)
        if value != default:
            logger.warning(
                f"`{name}={value!r}` is ignored: it is an option of the model, not of its configuration. Pass it "
                f"to `from_pretrained(..., {name}=...)` or to the forward call instead."
            )


_BIASLESS_ATTENTION = ("flash_attention_2", "flash_attention_3", "flash_attention_4", "flex_attention")
# Bias tensors kept per model: enough for the few resolutions a job alternates between, bounded for huge grids.
_BIAS_CACHE_SIZE = 8


def _axis_offsets(a: torch.Tensor, b: torch.Tensor, size: int, wrap: bool) -> torch.Tensor:
    """|a - b| along one grid axis of `size` cells; on a torus with `wrap`."""
    offsets = (a - b).abs()
    return torch.minimum(offsets, size - offsets) if wrap else offsets


def _combine_offsets(dy: torch.Tensor, dx: torch.Tensor, metric: str) -> torch.Tensor:
    # sqrt of the sum of squares rather than `hypot`, which is no core ATen operator (exported programs keep it, for
    # backends that may lack it); exact for these small integers.
    return (dy * dy + dx * dx).sqrt() if metric == "euclidean" else dy + dx


def largest_grid_distance(height: int, width: int, metric: str = "euclidean", wrap: bool = True) -> float:
    """The largest distance between two cells of a `height x width` grid (0 for a single cell). Symbolic sizes
    (torch.compile with dynamic shapes, torch.export) give a symbolic result."""
    dy, dx = (height // 2, width // 2) if wrap else (height - 1, width - 1)
    return torch.sym_sqrt(dy * dy + dx * dx) if metric == "euclidean" else torch.sym_float(dy + dx)


def normalizing_divisor(height: int, width: int, metric: str, wrap: bool, device=None) -> float | torch.Tensor:
    """What normalisation divides the distances of a `height x width` grid by: the largest one, or 1 on a single
    cell (whose only distance is 0). No branch on the grid size, which torch.export could not keep dynamic: two
    distinct cells are at least 1 apart, so `max(largest, 1)` is exactly that.

    A Python float in eager mode. In a traced graph (torch.compile, torch.export, the TorchScript tracer of the
    legacy ONNX exporter) a 0-dim float32 tensor on `device`, computed from the grid size: ONNX has no symbolic
    square root, and the tracer records sizes as tensors, which a Python square root would freeze into a constant.
    """
    if not _tracing():
        return torch.sym_max(largest_grid_distance(height, width, metric, wrap), 1.0)
    largest = [
        _axis_offsets(torch.arange(size, device=device, dtype=torch.float32), 0, size, wrap).amax(0)
        for size in (height, width)
    ]
    return _combine_offsets(*largest, metric).clamp(min=1.0)


def _tracing() -> bool:
    """Under torch.compile, torch.export or the TorchScript tracer (the legacy ONNX exporter): Python-side caches
    would become guards, one graph per image size, or constants of the traced graph."""
    return torch.compiler.is_compiling() or torch.compiler.is_exporting() or torch.jit.is_tracing()


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


def _token_distances(
    query_index: torch.Tensor, key_index: torch.Tensor, num_prefix_tokens: int, grid_size, metric: str, wrap: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Grid distance between the tokens of two (broadcast) index tensors, unnormalised, and whether both are patches
    (for a CLS or register token the distance means nothing)."""
    height, width = grid_size
    query_y, query_x, query_is_patch = _token_grid_coordinates(query_index, num_prefix_tokens, width)
    key_y, key_x, key_is_patch = _token_grid_coordinates(key_index, num_prefix_tokens, width)
    distance = _combine_offsets(
        _axis_offsets(query_y, key_y, height, wrap), _axis_offsets(query_x, key_x, width, wrap), metric
    )
    return distance, query_is_patch & key_is_patch


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
        distance.div_(normalizing_divisor(height, width, metric, wrap, device))
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
        fix = (
            " Repeat a grayscale image to 3 channels, e.g. `pixel_values.expand(-1, 3, -1, -1)`."
            if channels == 1
            else ""
        )
        raise ValueError(
            f"`pixel_values` has {channels} channels but the model expects {num_channels} "
            f"(shape {tuple(pixel_values.shape)}).{fix}"
        )
    if height < patch_size or width < patch_size:
        raise ValueError(
            f"The image ({height} x {width} px) is smaller than one {patch_size} x {patch_size} patch. "
            f"Resize or pad it to at least {patch_size} px per side."
        )


def patch_size_pair(config) -> tuple[int, int]:
    """`config.patch_size` as `(height, width)` in pixels."""
    patch_size = config.patch_size
    return tuple(patch_size) if isinstance(patch_size, (list, tuple)) else (patch_size, patch_size)


def patch_grid(pixel_values: torch.Tensor, config) -> tuple[int, int]:
    """The `(h, w)` patch grid of `pixel_values` `(batch_size, channels, height, width)`, checked first with
    [`check_pixel_values`] against `config.num_channels` and `config.patch_size`."""
    patch_height, patch_width = patch_size_pair(config)
    check_pixel_values(pixel_values, config.num_channels, min(patch_height, patch_width))
    height, width = pixel_values.shape[-2:]
    return height // patch_height, width // patch_width


def mirror_patch_tokens(tensor: torch.Tensor, num_prefix_tokens: int, dim: int = -2) -> torch.Tensor:
    """`tensor` with its patch tokens along `dim` in reverse order, the prefix (CLS, registers) first as before: the
    key order of [`AlibiPositionBias.mirrored_rows`]. Mirroring twice restores the order. One gather, one copy."""
    num_tokens = tensor.shape[dim]
    order = torch.arange(num_tokens, device=tensor.device)
    order = torch.where(order < num_prefix_tokens, order, num_tokens - 1 + num_prefix_tokens - order)
    return tensor.index_select(dim, order)


def _patch_rectangles(first: int, stop: int, width: int):
    """Patches `first:stop` (row-major on a grid `width` wide) as at most three rectangles of whole grid cells:
    yields `(offset of the rectangle's first patch from first, (y, x, grid rows, columns))`."""
    patch = first
    while patch < stop:
        y, x = divmod(patch, width)
        if x == 0 and stop - patch >= width:
            rectangle = (y, 0, (stop - patch) // width, width)
        else:
            rectangle = (y, x, 1, min(width - x, stop - patch))
        yield patch - first, rectangle
        patch += rectangle[2] * rectangle[3]


def extra_attention_mask(config, embeddings: torch.Tensor, attention_mask: torch.Tensor | None):
    """A caller's attention mask in the form the attention takes (transformers' bidirectional mask), or None when
    there is none: no all-True mask is made, which exported graphs would carry as a constant."""
    if attention_mask is None:
        return None
    return create_bidirectional_mask(config=config, inputs_embeds=embeddings, attention_mask=attention_mask)


class AlibiPositionBias(nn.Module):
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

    The streamed attention paths never build the `N x N` bias: `alibi_chunked` asks for blocks of rows against
    mirrored keys, copied out of a small table of the bias by patch offset ([`~AlibiPositionBias.offset_table`],
    [`~AlibiPositionBias.mirrored_rows`]; [`~AlibiPositionBias.rows`] gives them in token order), `alibi_flex` for a
    FlexAttention `score_mod` ([`~AlibiPositionBias.score_mod`]).
    """

    def __init__(self, config) -> None:
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
        """Bias of layer `layer_index` from [`~AlibiPositionBias.grid_bias`]: `(1, 1 or heads, N, N)` in
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

    def offset_table(
        self, grid_size: tuple[int, int], layer_index: int, dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        """The bias between two patches of a `grid_size = (h, w)` grid as a function of their offset: shape
        `(1 or heads, 2h - 1, 2w - 1)` in `dtype`, contiguous, entry `[h - 1 + dy, w - 1 + dx]` the bias between
        patches `dy` rows and `dx` columns apart. Every bias row is a window of it (see [`mirrored_rows`]). Fixed
        slopes give one table for every layer, cached like the dense bias."""
        if self.slopes is None:
            key = ("offset table", *grid_size, torch.device(device), dtype)
            return self._cached(key, lambda: self._offset_table(grid_size, 0, dtype, device))
        return self._offset_table(grid_size, layer_index, dtype, device)

    def _offset_table(
        self, grid_size: tuple[int, int], layer_index: int, dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        height, width = grid_size
        dy, dx = (
            _axis_offsets(torch.arange(2 * size - 1, device=device, dtype=torch.float32), size - 1, size, self.wrap)
            for size in (height, width)
        )
        distance = _combine_offsets(dy[:, None], dx[None, :], self.metric)
        if self.normalize:
            distance = distance / normalizing_divisor(height, width, self.metric, self.wrap, device)
        return self._scale(distance, layer_index)[0].to(dtype).contiguous()

    def mirrored_rows(
        self,
        table: torch.Tensor,
        grid_size: tuple[int, int],
        start: int,
        stop: int,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Rows `start:stop` of the bias whose [`offset_table`] is `table`, against the keys in mirrored order
        (prefix tokens, then the patches last to first; see [`mirror_patch_tokens`]): `(1, 1 or heads, stop - start,
        N)` in the table's dtype, a view of rows padded to a multiple of 8 elements.

        Against mirrored keys, the row of the patch at `(y, x)` is the window of the table that starts at `(y, x)`,
        and a rectangle of query patches is one strided view of the table: a block of rows costs one copy per
        rectangle (at most three), no arithmetic and no `(rows, N)` temporary. `out`, a tensor of shape `(1 or heads,
        >= stop - start, aligned N)`, takes the rows instead of a new one: a large new tensor is paged in by the
        operating system as it is first written, which costs several times the copy itself."""
        height, width = grid_size
        prefix = self.num_prefix_tokens
        num_tokens = prefix + height * width
        heads = table.shape[0]
        if out is None:
            out = torch.empty(heads, stop - start, aligned_length(num_tokens), dtype=table.dtype, device=table.device)
        rows = out[:, : stop - start]
        prefix_rows = max(0, prefix - start)
        rows[:, :, :prefix] = 0  # CLS and register columns
        rows[:, :prefix_rows] = 0  # CLS and register rows
        patch_rows = rows[:, prefix_rows:, prefix:num_tokens]
        table_strides = (table.stride(0), table.stride(1), 1, table.stride(1), 1)
        for row, (y, x, grid_rows, columns) in _patch_rectangles(start + prefix_rows - prefix, stop - prefix, width):
            # The window's corner as a view, not as a storage offset: torch.compile cannot trace `storage_offset()`.
            corner = table.flatten(1)[:, y * table.stride(1) + x :]
            window = corner.as_strided((heads, grid_rows, columns, height, width), table_strides)
            rectangle = patch_rows[:, row : row + grid_rows * columns]
            rectangle.unflatten(1, (grid_rows, columns)).unflatten(-1, (height, width)).copy_(window)
        bias = rows[None, ..., :num_tokens]
        return self._with_jitter(bias) if self.jitter > 0 else bias

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
        (a view of rows padded to a multiple of 8 elements), without the `N x N` matrix: [`mirrored_rows`] with the
        patch columns put back in token order. In a traced graph, whose block bounds and grid are symbolic and would
        make those copies specialise on them, computed from the token indices instead."""
        prefix = self.num_prefix_tokens
        if _tracing():
            height, width = grid_size
            distance, between_patches = _token_distances(
                torch.arange(start, stop, device=device)[:, None],
                torch.arange(prefix + height * width, device=device)[None],
                prefix, grid_size, self.metric, self.wrap,
            )
            if self.normalize:
                distance = distance / normalizing_divisor(height, width, self.metric, self.wrap, device)
            bias = self._scale(torch.where(between_patches, distance, 0.0), layer_index).to(dtype)
            return self._with_jitter(bias) if self.jitter > 0 else bias
        mirrored = self.mirrored_rows(self.offset_table(grid_size, layer_index, dtype, device), grid_size, start, stop)
        rows = torch.empty(*mirrored.shape[:-1], aligned_length(mirrored.shape[-1]), dtype=dtype, device=device)
        rows = rows[..., : mirrored.shape[-1]]
        rows[..., :prefix] = 0
        rows[..., prefix:] = mirrored[..., prefix:].flip(-1)
        return rows

    def score_mod(self, grid_size: tuple[int, int], layer_index: int, device: torch.device):
        """A FlexAttention `score_mod` adding this layer's bias, computed from the token indices alone."""
        if self.jitter > 0:
            raise ValueError(
                '`alibi_jitter` is not supported by attn_implementation="alibi_flex"; use "alibi_chunked".'
            )
        height, width = grid_size
        prefix, metric, wrap = self.num_prefix_tokens, self.metric, self.wrap
        scale = 1.0 / normalizing_divisor(height, width, metric, wrap, device) if self.normalize else 1.0
        slopes = self.head_slopes(layer_index, device) * scale

        def add_alibi_bias(score, batch_index, head_index, query_index, key_index):
            distance, between_patches = _token_distances(query_index, key_index, prefix, grid_size, metric, wrap)
            bias = torch.where(between_patches, -slopes[head_index] * distance, 0.0)
            return score + bias.to(score.dtype)

        return add_alibi_bias


def alibi_query_block_size(num_tokens: int, num_heads: int, max_chunk_size: int, memory_mb: float) -> int:
    """Queries per block of the chunked path: at most `max_chunk_size`, and few enough that one block's scores
    (per head, as an unfused kernel makes them) and bias rows, float32 and with room for four more such rows, fit in
    `memory_mb`. The fused CPU kernel of inference holds the bias rows alone; blocks below a few hundred queries
    slow it down (it then splits the queries finer and reads the keys more often)."""
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
    alibi: AlibiPositionBias | None = None,
    alibi_grid_size: tuple[int, int] | None = None,
    alibi_layer_index: int = 0,
    alibi_query_chunk_size: int = ALIBI_RUNTIME_DEFAULTS["alibi_query_chunk_size"],
    alibi_chunk_memory_mb: float = ALIBI_RUNTIME_DEFAULTS["alibi_chunk_memory_mb"],
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Exact attention with the ALiBi bias, one block of queries at a time (`attn_implementation="alibi_chunked"`).

    Each block of queries (`alibi_query_chunk_size` at most, fewer when a block's scores would exceed
    `alibi_chunk_memory_mb`) gets its rows of the bias and one SDPA call, so memory grows linearly with the token
    count instead of quadratically; no compilation is involved. The keys and values take the mirrored order of
    [`AlibiPositionBias.mirrored_rows`], whose rows are copies out of a `(2h - 1) x (2w - 1)` table, written into one
    buffer reused by every block. Traced graphs (torch.compile, torch.export) take the form of
    [`_traced_chunked_attention`], one graph per doubling of the token count.

    Args:
        query, key, value: `(batch_size, heads, N, head_dim)`.
    Returns:
        `(batch_size, N, heads, head_dim)` and no attention weights.
    """
    batch_size, num_heads, num_tokens, head_dim = query.shape
    if _tracing():
        return _traced_chunked_attention(
            query, key, value, attention_mask, scaling, dropout, alibi, alibi_grid_size, alibi_layer_index,
            alibi_query_chunk_size,
        )
    chunk_size = alibi_query_block_size(num_tokens, num_heads, alibi_query_chunk_size, alibi_chunk_memory_mb)
    if alibi is not None:
        # Keys (and their mask columns) in mirrored order, so that every block of bias rows is a plain copy out of
        # the small offset table; attention does not depend on the order of the keys.
        prefix = alibi.num_prefix_tokens
        key, value = mirror_patch_tokens(key, prefix), mirror_patch_tokens(value, prefix)
        if attention_mask is not None:
            attention_mask = mirror_patch_tokens(attention_mask, prefix, dim=-1)
        table = alibi.offset_table(alibi_grid_size, alibi_layer_index, query.dtype, query.device)
        # One buffer for the rows of every block, unless autograd keeps each block's bias for the backward pass.
        keeps_bias = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value, table))
        workspace = None if keeps_bias else table.new_empty(table.shape[0], chunk_size, aligned_length(num_tokens))
    output = query.new_empty(batch_size, num_tokens, num_heads, head_dim)
    for start in range(0, num_tokens, chunk_size):
        stop = min(start + chunk_size, num_tokens)
        mask = None if attention_mask is None else attention_mask[..., start:stop, :]
        if alibi is not None:
            mask = merge_attention_masks(alibi.mirrored_rows(table, alibi_grid_size, start, stop, workspace), mask)
        block = nn.functional.scaled_dot_product_attention(
            query[:, :, start:stop], key, value, attn_mask=mask, dropout_p=dropout, scale=scaling
        )
        output[:, start:stop] = block.transpose(1, 2)
    return output, None


def _traced_chunked_attention(
    query, key, value, attention_mask, scaling, dropout, alibi, grid_size, layer_index, chunk_size
) -> tuple[torch.Tensor, None]:
    """`alibi_chunked` as traced graphs take it: a power of two of blocks of at most `chunk_size` queries, equal in
    size to within one, their bias rows in token order from [`AlibiPositionBias.rows`] (computed from the token
    indices), keys in token order.

    The loop over blocks is unrolled into the graph, so the graph depends on the number of blocks; a power of two
    makes it depend only on the range `(chunk_size * blocks / 2, chunk_size * blocks]` the token count falls in (a
    guard on that range, not on the count itself): one graph per doubling of the image area. (The eager path's
    memory bound would tie the block size, and so the graph, to the exact token count.)"""
    num_tokens = query.shape[2]
    num_blocks = 1
    while num_blocks * chunk_size < num_tokens:
        num_blocks *= 2
    blocks = []
    for block in range(num_blocks):
        # Bounds without min/max, whose symbolic forms slow tracing down: sizes differ by one at most.
        start, stop = block * num_tokens // num_blocks, (block + 1) * num_tokens // num_blocks
        mask = None if attention_mask is None else attention_mask[..., start:stop, :]
        if alibi is not None:
            rows = alibi.rows(grid_size, layer_index, start, stop, query.dtype, query.device)
            mask = merge_attention_masks(rows, mask)
        blocks.append(
            nn.functional.scaled_dot_product_attention(
                query[:, :, start:stop], key, value, attn_mask=mask, dropout_p=dropout, scale=scaling
            )
        )
    return torch.cat(blocks, dim=2).transpose(1, 2), None


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
    alibi: AlibiPositionBias | None = None,
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


def layer_attention_arguments(
    alibi: "AlibiPositionBias | None",
    grid_size: tuple[int, int],
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor | None,
    attn_implementation: str,
    num_layers: int,
):
    """What each layer's attention gets for the bias, in layer order: `(attention_mask, keyword arguments)`.

    On the dense paths (`sdpa`, `eager`) the mask is the layer's bias merged with `attention_mask`, from one grid
    bias made per forward pass; the streamed paths get the bias module and the grid instead, and compute their rows
    themselves. Every layer's queries share one dtype and device (the residual stream keeps its dtype).
    """
    streamed = attn_implementation in STREAMED_ATTENTION
    if alibi is not None and not streamed:
        bias_dtype = query_dtype(hidden_states)
        grid_bias = alibi.grid_bias(grid_size, bias_dtype, hidden_states.device)
    for layer_index in range(num_layers):
        if streamed:
            yield attention_mask, dict(alibi=alibi, alibi_grid_size=grid_size, alibi_layer_index=layer_index)
        elif alibi is not None:
            yield merge_attention_masks(alibi.layer_bias(grid_bias, layer_index, bias_dtype), attention_mask), {}
        else:
            yield attention_mask, {}


def attention_heads(module: nn.Module, hidden_states: torch.Tensor):
    """Queries, keys and values of a transformers ViT attention `module` (its `q_proj`, `k_proj`, `v_proj` and
    `head_dim`): `(batch_size, N, hidden_size)` -> three `(batch_size, heads, N, head_dim)` tensors."""
    hidden_shape = (*hidden_states.shape[:-1], -1, module.head_dim)
    return tuple(
        projection(hidden_states).view(hidden_shape).transpose(1, 2)
        for projection in (module.q_proj, module.k_proj, module.v_proj)
    )


def attend(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    attn_implementation: str | None,
    eager_attention,
    dropout: float,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The attention of a transformers ViT attention `module` on the path `attn_implementation`, then its output
    projection `o_proj`. The path of one call overrides `module.config._attn_implementation`, which the model shares
    between calls and threads and therefore never changes while it runs; `eager_attention` is the model family's
    eager function, `dropout` its attention dropout (applied in training only).

    Args:
        query, key, value: `(batch_size, heads, N, head_dim)`.
    Returns:
        `(batch_size, N, hidden_size)` and the attention weights (eager only).
    """
    attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(
        attn_implementation or module.config._attn_implementation, eager_attention
    )
    attn_output, attn_weights = attention_interface(
        module,
        query,
        key,
        value,
        attention_mask,
        dropout=dropout if module.training else 0.0,
        scaling=module.scaling,
        **kwargs,
    )
    batch_size, num_tokens = attn_output.shape[:2]
    return module.o_proj(attn_output.reshape(batch_size, num_tokens, -1).contiguous()), attn_weights


def run_alibi_layers(
    layers: nn.ModuleList,
    alibi: "AlibiPositionBias | None",
    hidden_states: torch.Tensor,
    grid_size: tuple[int, int],
    attention_mask: torch.Tensor | None,
    attn_implementation: str,
    **kwargs,
) -> torch.Tensor:
    """Run `hidden_states` `(batch_size, N, hidden_size)` through transformers' ViT `layers`, each attending on the
    path `attn_implementation` with its ALiBi bias of the `grid_size` patch grid (see [`layer_attention_arguments`]);
    `kwargs` reach every layer (DINOv3's `position_embeddings`, transformers' output options, the streamed paths'
    options)."""
    layer_arguments = layer_attention_arguments(
        alibi, grid_size, hidden_states, attention_mask, attn_implementation, len(layers)
    )
    for layer, (layer_mask, alibi_kwargs) in zip(layers, layer_arguments):
        hidden_states = layer(
            hidden_states, layer_mask, attn_implementation=attn_implementation, **kwargs, **alibi_kwargs
        )
    return hidden_states


class AlibiAttentionMixin:
    """What an ALiBi model's pre-trained base class adds to transformers': the attention's memory options
    (`ALIBI_RUNTIME_DEFAULTS`) as keyword arguments of the constructor and of `from_pretrained`, kept as attributes
    and overridable per call; refusal of attention implementations that cannot add a bias; the attention path of
    each call. Put it first among the bases; the configuration needs `use_alibi`."""

    def __init__(self, config, *inputs, **kwargs) -> None:
        options = {name: kwargs.pop(name, default) for name, default in ALIBI_RUNTIME_DEFAULTS.items()}
        super().__init__(config, *inputs, **kwargs)
        for name, value in options.items():
            setattr(self, name, _runtime_option(name, value))

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
