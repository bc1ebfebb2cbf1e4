"""The streamed ALiBi attention paths (`alibi_chunked`, `alibi_flex`) against the dense `sdpa` path."""

import os
import shutil
import subprocess
import sys
import textwrap
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from alibi_attention import ALIBI_RUNTIME_DEFAULTS, compile_flex_attention
from configuration_alibi_dinov2 import AlibiDinov2Config
from conftest import ALIBI_MODEL_TYPES, REPO_ROOT, bias_module, tiny_alibi_model
from modeling_alibi_dinov2 import AlibiDinov2Model


def alibi_model(tiny_kwargs, alibi_query_chunk_size=7, **options):
    """A tiny model whose `alibi_chunked` blocks hold 7 queries: several blocks and a ragged last one on tiny grids."""
    torch.manual_seed(0)
    config = AlibiDinov2Config(**tiny_kwargs, **options)
    return AlibiDinov2Model(config, alibi_query_chunk_size=alibi_query_chunk_size).eval()


def grid_images(model, batch_size, grid, seed=1):
    """Random pixel values for a `grid = (h, w)` patch grid of `model`."""
    patch = model.config.patch_size
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch_size, 3, grid[0] * patch, grid[1] * patch, generator=generator)


def outputs(model, pixel_values, implementation, **kwargs):
    model.set_attn_implementation(implementation)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # CPU FlexAttention warns that it runs uncompiled
        return model(pixel_values, **kwargs).last_hidden_state


CASES = [
    dict(),
    dict(num_register_tokens=0),
    dict(alibi_slopes="geometric"),
    dict(alibi_slopes="learned"),
    dict(alibi_wrap=False, alibi_metric="manhattan"),
    dict(alibi_normalize=False),
]


@pytest.mark.parametrize("options", CASES, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
@pytest.mark.parametrize("implementation", ["alibi_chunked", "alibi_flex"])
@pytest.mark.parametrize("grid", [(4, 4), (3, 7), (1, 5)])
@pytest.mark.parametrize("model_type", ALIBI_MODEL_TYPES)
def test_streamed_paths_match_dense_sdpa(model_type, options, implementation, grid):
    model = tiny_alibi_model(model_type, model_options=dict(alibi_query_chunk_size=7), **options)
    pixel_values = grid_images(model, 2, grid)
    dense = outputs(model, pixel_values, "sdpa")
    torch.testing.assert_close(outputs(model, pixel_values, implementation), dense, atol=1e-4, rtol=0)


def test_chunked_path_honours_a_padding_mask(tiny_kwargs):
    model = alibi_model(tiny_kwargs)
    pixel_values = torch.randn(2, 3, 42, 56, generator=torch.Generator().manual_seed(1))
    keep = torch.ones(2, 5 + 12, dtype=torch.bool)
    keep[0, -4:] = False
    dense = outputs(model, pixel_values, "sdpa", attention_mask=keep)
    assert not torch.allclose(dense, outputs(model, pixel_values, "sdpa"), atol=1e-4)
    torch.testing.assert_close(
        outputs(model, pixel_values, "alibi_chunked", attention_mask=keep), dense, atol=1e-4, rtol=0
    )


def test_chunked_path_gives_the_same_gradients(tiny_kwargs):
    pixel_values = torch.randn(2, 3, 42, 56, generator=torch.Generator().manual_seed(1))
    gradients = []
    for implementation in ("sdpa", "alibi_chunked"):
        model = alibi_model(tiny_kwargs, alibi_slopes="learned").train()
        model.set_attn_implementation(implementation)
        model(pixel_values).last_hidden_state.square().mean().backward()
        gradients.append({name: p.grad for name, p in model.named_parameters() if p.grad is not None})
    for name, gradient in gradients[0].items():
        torch.testing.assert_close(gradients[1][name], gradient, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("model_type", ALIBI_MODEL_TYPES)
def test_large_grids_switch_to_the_chunked_path_by_themselves(model_type):
    model = tiny_alibi_model(model_type, model_options=dict(alibi_dense_max_tokens=20, alibi_query_chunk_size=7))
    small, large = grid_images(model, 1, (3, 3)), grid_images(model, 1, (4, 5))  # 5 + 9 and 5 + 20 tokens
    cache = bias_module(model)._cache

    def cached(kind):
        return [key[1:3] for key in cache if key[0] == kind]

    outputs(model, small, "sdpa")
    assert cached("bias") == [(3, 3)] and cached("offset table") == []
    switched = outputs(model, large, "sdpa")
    assert cached("bias") == [(3, 3)]  # no dense bias was built for 4 x 5
    assert cached("offset table") == [(4, 5)]  # one table served every layer's rows
    assert model.config._attn_implementation == "sdpa"
    dense = outputs(model, large, "sdpa", alibi_dense_max_tokens=8192)  # a per-call bound overrides the model's
    assert cached("bias") == [(3, 3), (4, 5)]
    torch.testing.assert_close(switched, dense, atol=1e-4, rtol=0)
    model.alibi_dense_max_tokens = 8192
    torch.testing.assert_close(outputs(model, large, "sdpa"), dense, atol=0, rtol=0)


def test_large_inputs_stream_without_touching_the_shared_config(tiny_kwargs):
    """The path of a large input is chosen per call: the config reads the same from inside every attention layer,
    and a large and a small input run at the same time in two threads give their results of one at a time."""
    torch.manual_seed(0)
    model = AlibiDinov2Model(AlibiDinov2Config(**tiny_kwargs), alibi_dense_max_tokens=20, alibi_query_chunk_size=7)
    model.eval()
    inputs = {"small": torch.randn(1, 3, 42, 42), "large": torch.randn(1, 3, 56, 70)}  # 5 + 9 and 5 + 20 tokens
    with torch.no_grad():
        sequential = {name: model(pixel_values).last_hidden_state for name, pixel_values in inputs.items()}

    seen = []
    both_inside = threading.Barrier(2, timeout=60)

    def record(module, args, kwargs):
        thread = threading.current_thread().name
        seen.append((thread, module.config._attn_implementation, kwargs.get("attn_implementation")))
        if module is model.encoder.layer[0].attention:
            both_inside.wait()  # neither thread leaves its first layer before the other has entered its own

    def run(name):
        threading.current_thread().name = name
        with torch.no_grad():
            return model(inputs[name]).last_hidden_state

    hooks = [layer.attention.register_forward_pre_hook(record, with_kwargs=True) for layer in model.encoder.layer]
    try:
        with ThreadPoolExecutor(max_workers=2) as pool:
            concurrent = dict(zip(inputs, pool.map(run, inputs)))
    finally:
        for hook in hooks:
            hook.remove()
    assert sorted(seen) == [("large", "sdpa", "alibi_chunked")] * 2 + [("small", "sdpa", "sdpa")] * 2, seen
    for name in inputs:
        torch.testing.assert_close(concurrent[name], sequential[name], atol=0, rtol=0)


def counting_sdpa(monkeypatch) -> list:
    """Replace SDPA by a wrapper that records the query length of every call; returns the record."""
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def recording_sdpa(query, key, value, *args, **kwargs):
        calls.append(query.shape[-2])
        return sdpa(query, key, value, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording_sdpa)
    return calls


def test_per_call_options_set_the_blocks_of_the_chunked_path(tiny_kwargs, monkeypatch):
    model = alibi_model(tiny_kwargs, alibi_query_chunk_size=1024)
    pixel_values = torch.randn(2, 3, 56, 70, generator=torch.Generator().manual_seed(1))  # 5 + 20 = 25 tokens
    dense = outputs(model, pixel_values, "sdpa")
    calls = counting_sdpa(monkeypatch)
    by_blocks, by_memory = {}, {}
    for block in (25, 10, 4):
        calls.clear()
        by_blocks[block] = outputs(model, pixel_values, "sdpa", alibi_dense_max_tokens=0, alibi_query_chunk_size=block)
        assert len(calls) == 2 * -(-25 // block) and max(calls) == block, (block, calls)
        torch.testing.assert_close(by_blocks[block], dense, atol=1e-5, rtol=0)
    # The memory bound shrinks the blocks below the query count: 25 tokens x (2 heads + 4) x 4 bytes per query.
    for memory_mb, block in ((25 * 6 * 4 * 5 / 2**20, 5), (25 * 6 * 4 * 2 / 2**20, 2)):
        calls.clear()
        by_memory[block] = outputs(model, pixel_values, "alibi_chunked", alibi_chunk_memory_mb=memory_mb)
        assert max(calls) == block and len(calls) == 2 * -(-25 // block), (memory_mb, calls)
        torch.testing.assert_close(by_memory[block], dense, atol=1e-5, rtol=0)
    assert model.alibi_query_chunk_size == 1024
    assert model.alibi_chunk_memory_mb == ALIBI_RUNTIME_DEFAULTS["alibi_chunk_memory_mb"]
    for name, value in (("alibi_query_chunk_size", 0), ("alibi_chunk_memory_mb", -1), ("alibi_dense_max_tokens", -1)):
        with pytest.raises(ValueError, match=f"`{name}` must be (positive|>= 0)"):
            outputs(model, pixel_values, "sdpa", **{name: value})


def test_a_call_may_pick_a_streamed_path_only(tiny_kwargs, monkeypatch):
    model = alibi_model(tiny_kwargs)
    pixel_values = torch.randn(1, 3, 42, 56, generator=torch.Generator().manual_seed(1))  # 5 + 12 tokens
    dense = outputs(model, pixel_values, "eager")
    calls = counting_sdpa(monkeypatch)
    chunked = outputs(model, pixel_values, "eager", attn_implementation="alibi_chunked")
    assert calls == [7, 7, 3] * 2 and model.config._attn_implementation == "eager"
    torch.testing.assert_close(chunked, dense, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match=r"streamed paths \('alibi_chunked', 'alibi_flex'\).*set_attn_implementation"):
        outputs(model, pixel_values, "alibi_chunked", attn_implementation="sdpa")


def aligned_for_fused_kernels(bias):
    """PyTorch's memory-efficient SDPA takes a mask as it is only when every stride but the last (1) is a multiple
    of 8 elements; otherwise it pads a copy at every call."""
    return bias.stride(-1) == 1 and all(stride % 8 == 0 for stride in bias.stride()[:-1])


@pytest.mark.parametrize("options", [dict(), dict(alibi_slopes="geometric"), dict(alibi_slopes="learned"),
                                     dict(alibi_jitter=0.1)], ids=["constant", "geometric", "learned", "jitter"])
def test_every_bias_has_aligned_rows(tiny_kwargs, options):
    model = alibi_model(tiny_kwargs, **options)
    alibi, cpu = model.encoder.alibi, torch.device("cpu")
    heads = 2 if options.get("alibi_slopes", "constant") != "constant" else 1
    bias = alibi((3, 4), 1, dtype=torch.float16, device=cpu)  # 5 prefix + 12 patches = 17 tokens, rows of 24
    assert bias.shape == (1, heads, 17, 17) and bias.dtype == torch.float16
    assert aligned_for_fused_kernels(bias) and bias.stride(-2) == 24
    rows = alibi.rows((3, 4), 1, 3, 10, torch.float16, cpu)
    assert rows.shape == (1, heads, 7, 17) and aligned_for_fused_kernels(rows)
    if "alibi_jitter" not in options:
        torch.testing.assert_close(rows, bias[:, :, 3:10])
        assert bias[:, :, :5].abs().sum() == 0 and bias[:, :, :, :5].abs().sum() == 0  # prefix tokens: no bias



@pytest.mark.parametrize("implementation", ["sdpa", "alibi_chunked"])
def test_bias_reaches_sdpa_in_the_query_dtype_under_autocast(tiny_kwargs, monkeypatch, implementation):
    """Mixed precision keeps the residual stream in float32 while the projections give bfloat16 queries: a float32
    bias there would be cast (copied) at every call, and some fused kernels mishandle a mask of another dtype."""
    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def recording_sdpa(query, key, value, attn_mask=None, **kwargs):
        seen.append((query.dtype, None if attn_mask is None else attn_mask.dtype))
        return sdpa(query, key, value, attn_mask=attn_mask, **kwargs)

    model = alibi_model(tiny_kwargs, alibi_slopes="geometric")
    pixel_values = torch.randn(1, 3, 42, 56, generator=torch.Generator().manual_seed(1))
    reference = outputs(model, pixel_values, implementation)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording_sdpa)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = outputs(model, pixel_values, implementation)
    assert seen and all(dtypes == (torch.bfloat16, torch.bfloat16) for dtypes in seen), seen
    torch.testing.assert_close(mixed.float(), reference, atol=0.1, rtol=0.05)

def test_flex_path_refuses_what_it_cannot_do(tiny_kwargs):
    model = alibi_model(tiny_kwargs, alibi_jitter=0.1)
    with pytest.raises(ValueError, match="alibi_jitter.*alibi_chunked"):
        outputs(model, torch.randn(1, 3, 28, 28), "alibi_flex")
    model = alibi_model(tiny_kwargs)
    with pytest.raises(ValueError, match="takes no attention_mask"):
        padding = torch.ones(1, 1 + 4 + 4, dtype=torch.bool)
        padding[0, -1] = False
        outputs(model, torch.randn(1, 3, 28, 28), "alibi_flex", attention_mask=padding)



@pytest.mark.compile
def test_compiled_flex_path_stops_recompiling_for_new_image_sizes(tiny_kwargs, monkeypatch):
    """A folder of micrographs of many sizes must not exhaust dynamo's recompile limit (8 by default), past which
    the compiled kernel silently gives way to the unfused one. `aot_eager` traces and guards exactly like the GPU
    compile without generating kernels."""
    import torch._dynamo
    from torch._dynamo.testing import CompileCounterWithBackend

    import alibi_attention

    counter = CompileCounterWithBackend("aot_eager")
    torch._dynamo.reset()
    monkeypatch.setattr(alibi_attention, "_flex_attention_kernel", lambda device: compile_flex_attention(counter))
    model = alibi_model(tiny_kwargs, alibi_slopes="learned")
    # Token count, batch size and grid width change once each; dynamo specialises a size of 1, so batch sizes 1
    # and >1 keep a graph each.
    warm_up = [(1, 28, 28), (1, 42, 28), (2, 56, 28), (1, 56, 70), (2, 70, 42)]
    new_sizes = [(1, 28 + 14 * i, 14 * (i % 4 + 1)) for i in range(1, 10)] + [(3, 98, 42)]
    try:
        for batch_size, height, width in warm_up + new_sizes:
            if (batch_size, height, width) == new_sizes[0]:
                compiles_after_warm_up = counter.frame_count
            pixel_values = torch.randn(batch_size, 3, height, width, generator=torch.Generator().manual_seed(height))
            torch.testing.assert_close(
                outputs(model, pixel_values, "alibi_flex"), outputs(model, pixel_values, "sdpa"), atol=1e-4, rtol=0
            )
    finally:
        torch._dynamo.reset()
    assert counter.frame_count == compiles_after_warm_up <= len(warm_up)



@pytest.mark.skipif(
    shutil.which("g++") is None and shutil.which("c++") is None, reason="inductor needs a C++ compiler"
)
@pytest.mark.slow
@pytest.mark.compile
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-4), (torch.bfloat16, 5e-2)])
def test_inductor_compiles_the_alibi_score_mod(tiny_kwargs, monkeypatch, dtype, tolerance):
    """The score_mod (integer grid coordinates, wrap, Euclidean distance, per-head slopes) lowers through inductor
    into a fused kernel, here its CPU backend, and matches the dense path."""
    import torch._dynamo

    import alibi_attention

    torch._dynamo.reset()
    monkeypatch.setattr(alibi_attention, "_flex_attention_kernel", lambda device: compile_flex_attention())
    model = alibi_model(tiny_kwargs, alibi_slopes="geometric").to(dtype)
    pixel_values = torch.randn(1, 3, 56, 42, generator=torch.Generator().manual_seed(1)).to(dtype)
    try:
        compiled = outputs(model, pixel_values, "alibi_flex")
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(compiled, outputs(model, pixel_values, "sdpa"), atol=tolerance, rtol=tolerance)


MEMORY_PROBE = """
import sys, torch
from configuration_alibi_dinov2 import AlibiDinov2Config
from modeling_alibi_dinov2 import AlibiDinov2Model
implementation, side = sys.argv[1], int(sys.argv[2])
torch.set_num_threads(1)
config = AlibiDinov2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=1, patch_size=2, image_size=8,
                           num_register_tokens=0)
model = AlibiDinov2Model(config, alibi_dense_max_tokens=10**9, alibi_query_chunk_size=256).eval()
model.set_attn_implementation(implementation)
def status_kib(field):
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))
with torch.inference_mode():
    model(torch.randn(1, 3, 8, 8))  # first call: lazy initialisation outside the measurement
    baseline = status_kib("VmRSS")
    # Reset the high-water mark (Linux >= 4.0): peaks of imports and start-up must not count.
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
    model(torch.randn(1, 3, 2 * side, 2 * side))
print((status_kib("VmHWM") - baseline) * 1024)
"""


def peak_forward_bytes(implementation: str, side: int) -> int:
    """Resident-memory growth of one forward pass on a `side x side` grid, in a fresh process."""
    # Large blocks straight from mmap and back on free: resident memory then tracks live allocations, instead of
    # glibc's heap keeping freed blocks around at its whim.
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), MALLOC_MMAP_THRESHOLD_="65536")
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(MEMORY_PROBE), implementation, str(side)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return int(result.stdout.split()[-1])


@pytest.mark.slow
@pytest.mark.multiprocess
def test_chunked_memory_grows_linearly_with_tokens():
    # 3600 then 14400 tokens: 4x the tokens costs ~4x the memory when linear, ~16x when quadratic.
    chunked = [peak_forward_bytes("alibi_chunked", side) for side in (60, 120)]
    assert chunked[1] < 6 * chunked[0], chunked
    # The measurement does see a quadratic cost: the dense path's N x N bias at 14400 tokens (830 MB in float32).
    dense = peak_forward_bytes("sdpa", 120)
    assert dense > 8 * chunked[1], (dense, chunked)


# --- the chunked path in traced graphs ----------------------------------------------------------------------------
@pytest.mark.parametrize("options", CASES, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
@pytest.mark.parametrize("num_tokens_grid", [(5, 15), (3, 3), (1, 1)])
def test_traced_form_of_the_chunked_path_equals_dense_attention(tiny_kwargs, options, num_tokens_grid, monkeypatch):
    """The form traced graphs take (a power of two of blocks equal to within one query, rows from token indices;
    with one query per block, more blocks than tokens, some empty) gives dense attention with the full bias."""
    import alibi_attention
    from alibi_attention import _traced_chunked_attention

    model = alibi_model(tiny_kwargs, **options)
    alibi = bias_module(model)
    if alibi.slopes is not None:
        torch.nn.init.uniform_(alibi.slopes, 0.2, 1.0)
    grid = num_tokens_grid
    num_tokens = alibi.num_prefix_tokens + grid[0] * grid[1]
    generator = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(2, 2, num_tokens, 8, generator=generator) for _ in range(3))
    with torch.no_grad():
        expected = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=alibi(grid, 1, torch.float32, torch.device("cpu"))
        ).transpose(1, 2)
        monkeypatch.setattr(alibi_attention, "_tracing", lambda: True)  # what a traced graph computes, run eagerly
        for chunk_size in (1, 7, num_tokens):
            output, _ = _traced_chunked_attention(query, key, value, None, None, 0.0, alibi, grid, 1, chunk_size)
            torch.testing.assert_close(output, expected, atol=1e-5, rtol=0)


@pytest.mark.slow
@pytest.mark.compile
@pytest.mark.parametrize("model_type", ALIBI_MODEL_TYPES)
def test_compiled_chunked_path_compiles_once_per_doubling_of_the_tokens(model_type):
    """Every size on `alibi_chunked` (16 queries per block), one image at a time as large images go: the unrolled
    block loop makes a graph per power-of-two block count, not per image size (beyond the two that dynamo's automatic
    dynamic shapes always start with), and the outputs equal eager."""
    from compile_counting import compiled_graph_count
    from test_modeling import COMPILE_SIZES

    model = tiny_alibi_model(model_type, model_options=dict(alibi_dense_max_tokens=0, alibi_query_chunk_size=16))
    patch = model.config.patch_size
    prefix = bias_module(model).num_prefix_tokens
    tokens = [prefix + (height // 14) * (width // 14) for _, height, width in COMPILE_SIZES]
    doublings = {max(0, (number - 1) // 16).bit_length() for number in tokens}
    sizes = [(1, height // 14 * patch, width // 14 * patch) for _, height, width in COMPILE_SIZES]
    count = compiled_graph_count(model, sizes)
    assert count <= len(doublings) + 2 < len(COMPILE_SIZES), (count, sorted(doublings))
