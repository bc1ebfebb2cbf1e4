"""Peak memory and time of the ALiBi attention paths on large grids, against transformers' DINOv2.

ViT-S/14 with 4 registers, random weights shared by both models. For each grid (37 x 37 = 518 px up to
146 x 146 = 2044 px) it times, in paired rounds (each round runs every variant once, back to back; see
`benchmarks.common`), one forward pass of:

- `stock sdpa`: transformers' `Dinov2WithRegistersModel` (learned position embedding, no bias), the reference of
  every ratio;
- `alibi sdpa`: ALiBi-DINOv2 with the dense cached bias (skipped where that bias exceeds `--max_dense_bias_gb`);
- `alibi alibi_chunked`: bias rows per block of queries, once for each `--query_chunk_size` x `--chunk_memory_mb`
  (per-call options; the defaults are what `sdpa` itself switches to above `alibi_dense_max_tokens`);
- `alibi alibi_flex`: FlexAttention with the bias computed in the kernel (GPU only: on CPU it is not compiled).

Targets on CPU: the bounded path at least 0.9x the stock throughput at 2044 x 2044 px with a peak resident growth of
at most 1 GiB. The table gives, per variant, the queries per block and the bias rows one block holds, the paired
throughput ratio against stock (wall clock and CPU time, median and quartiles) and the peak growth of one forward
pass in a fresh process: the memory-time trade-off of the block size. JSON on disk.

    python benchmarks/bench_large.py --threads 2                                      # CPU, grids 37 74 110 146
    python benchmarks/bench_large.py --grids 110 --paths stock:sdpa alibi:alibi_chunked --chunk_memory_mb 256 1024 4096
    python benchmarks/bench_large.py --device cuda --dtype bfloat16 --repeats 10
    # compiled, both models
    python benchmarks/bench_large.py --device cuda --compile inductor --paths stock:sdpa alibi:sdpa
"""

import itertools
import resource
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from alibi_attention import ALIBI_RUNTIME_DEFAULTS, alibi_query_block_size, aligned_length  # noqa: E402
from benchmarks.bench_attention import VIT_S, build_models, forward, peak_memory_bytes, time_forward  # noqa: E402
from benchmarks.common import (  # noqa: E402
    RunArguments,
    format_ratio,
    paired_ratio,
    paired_rounds,
    parse,
    run_and_write,
)


PATCH = 14
PREFIX_TOKENS = 5
KNOWN_PATHS = ("stock:sdpa", "alibi:sdpa", "alibi:alibi_chunked", "alibi:alibi_flex")


def dense_bias_bytes(grid: int, dtype: torch.dtype) -> int:
    tokens = PREFIX_TOKENS + grid * grid
    return tokens * aligned_length(tokens) * torch.finfo(dtype).bits // 8


def paths_for(device: str, requested: list[str] | None = None) -> list[tuple[str, str]]:
    """(model, attention implementation) pairs measured on `device`: `requested` ones ("alibi:alibi_chunked"),
    or all that run there. The stock model always comes first: it is the reference of the ratios."""
    paths = [tuple(path.split(":", 1)) for path in requested] if requested else [
        ("stock", "sdpa"), ("alibi", "sdpa"), ("alibi", "alibi_chunked")
    ] + ([("alibi", "alibi_flex")] if device.startswith("cuda") else [])
    return [("stock", "sdpa")] + [path for path in paths if path != ("stock", "sdpa")]


def variants_for(args, device: str) -> list[dict]:
    """What is timed: a model, its attention path and the per-call options of the path."""
    variants = []
    for model, implementation in paths_for(device, args.paths):
        # The streamed paths are picked per call, the models staying on `sdpa`.
        streamed = dict(attn_implementation=implementation) if implementation.startswith("alibi_") else {}
        if implementation != "alibi_chunked":
            variants.append(dict(name=f"{model} {implementation}", model=model, path=implementation, options=streamed))
            continue
        for chunk, memory_mb in itertools.product(args.query_chunk_size, args.chunk_memory_mb):
            options = dict(streamed, alibi_query_chunk_size=chunk, alibi_chunk_memory_mb=memory_mb)
            variants.append(dict(name=f"alibi chunked {chunk}q/{memory_mb:g}MB", model=model, path=implementation,
                                 options=options))
    return variants


def block_rows(variant: dict, tokens: int, dtype: torch.dtype) -> tuple[int | None, int | None]:
    """Queries per block of a chunked variant and the bytes of one block's bias rows (shared slope: one head)."""
    if variant["path"] != "alibi_chunked":
        return None, None
    options = variant["options"]
    queries = alibi_query_block_size(
        tokens, VIT_S["num_attention_heads"], options["alibi_query_chunk_size"], options["alibi_chunk_memory_mb"]
    )
    return queries, queries * aligned_length(tokens) * torch.finfo(dtype).bits // 8


def measure(args) -> dict:
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    # The dense path measured as such, never switched to the chunked one by size.
    alibi_options = dict(alibi_dense_max_tokens=10**9)
    models = build_models(dtype, device, alibi_options, args.compile)
    rows = []
    for grid in args.grids:
        size, tokens = grid * PATCH, PREFIX_TOKENS + grid * grid
        pixel_values = torch.randn(args.batch_size, 3, size, size, device=device, dtype=dtype)
        calls, grid_rows, variant_of_block = {}, [], {}
        for variant in variants_for(args, device):
            row = {"grid": grid, "size": size, "tokens": tokens, "variant": variant["name"], "model": variant["model"],
                   "path": variant["path"], "options": variant["options"]}
            row["block_queries"], row["block_bias_bytes"] = block_rows(variant, tokens, dtype)
            grid_rows.append(row)
            if variant["path"] == "sdpa" and variant["model"] == "alibi" and (
                dense_bias_bytes(grid, dtype) > args.max_dense_bias_gb * 2**30
            ):
                row["skipped"] = f"dense bias of {dense_bias_bytes(grid, dtype) / 2**30:.1f} GiB"
                continue
            if row["block_queries"] in variant_of_block:  # the same blocks as another variant: the same computation
                row["skipped"] = f"same blocks as {variant_of_block[row['block_queries']]}"
                continue
            if row["block_queries"]:
                variant_of_block[row["block_queries"]] = variant["name"]
            model = models[variant["model"]]
            # A compiled path's first pass compiles: never time it.
            compiles = variant["path"] == "alibi_flex" or bool(args.compile)
            time_forward(model, pixel_values, max(args.warmup, int(compiles)), device, variant["options"])
            calls[variant["name"]] = lambda model=model, options=variant["options"]: forward(
                model, pixel_values, device, options
            )
        times = paired_rounds(calls, args.repeats)
        for row in grid_rows:
            if "skipped" in row:
                print_row(row)
                continue
            seconds = times[row["variant"]]
            row.update(seconds=seconds["seconds"], cpu_seconds=seconds["cpu_seconds"])
            row["images_per_s"] = args.batch_size / statistics.median(seconds["seconds"])
            row["paired_ratio"] = paired_ratio(times["stock sdpa"]["seconds"], seconds["seconds"])
            row["paired_cpu_ratio"] = paired_ratio(times["stock sdpa"]["cpu_seconds"], seconds["cpu_seconds"])
            if args.memory:
                row["peak_bytes"] = peak_memory_bytes(
                    row["model"], size, args.batch_size, dtype, device, models, "sdpa", alibi_options, args.compile,
                    row["options"],
                )
            print_row(row)
        rows += grid_rows
    return {
        "benchmark": "bench_large",
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
        "dtype": args.dtype,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "compile_backend": args.compile,
        "torch": torch.__version__,
        "targets": {"cpu_2044px_bounded_paired_ratio": 0.9, "cpu_2044px_bounded_peak_gib": 1.0},
        "max_rss_bytes_of_this_process": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "rows": rows,
    }


HEADER = (
    f"{'grid':>5} {'px':>5} {'tokens':>7} {'variant':>30} {'block q':>8} {'block MiB':>9} {'img/s':>9} "
    f"{'paired (IQR)':>19} {'paired CPU time':>19} {'peak MiB':>9}"
)


def print_row(row: dict) -> None:
    head = f"{row['grid']:>5} {row['size']:>5} {row['tokens']:>7} {row['variant']:>30}"
    block = (f"{row['block_queries']:>8} {row['block_bias_bytes'] / 2**20:>9.1f}" if row["block_queries"]
             else f"{'-':>8} {'-':>9}")
    if "skipped" in row:
        print(f"{head} {block} skipped ({row['skipped']})", flush=True)
        return
    peak = f"{row['peak_bytes'] / 2**20:>9.1f}" if "peak_bytes" in row else f"{'-':>9}"
    print(f"{head} {block} {row['images_per_s']:>9.4f} {format_ratio(row['paired_ratio']):>19} "
          f"{format_ratio(row['paired_cpu_ratio']):>19} {peak}", flush=True)


@dataclass
class LargeImageBenchmarkArguments(RunArguments):
    grids: list[int] = field(default_factory=lambda: [37, 74, 110, 146], metadata={"help": "patch grids per side"})
    batch_size: int = field(default=1, metadata={"help": "images per forward pass"})
    repeats: int = field(default=2, metadata={"help": "timed rounds per grid, each timing every variant once"})
    warmup: int = field(default=0, metadata={"help": "untimed forward passes per variant and grid"})
    query_chunk_size: list[int] = field(
        default_factory=lambda: [ALIBI_RUNTIME_DEFAULTS["alibi_query_chunk_size"]],
        metadata={"help": "most queries per block of alibi_chunked (several: one variant each)"},
    )
    chunk_memory_mb: list[float] = field(
        default_factory=lambda: [ALIBI_RUNTIME_DEFAULTS["alibi_chunk_memory_mb"]],
        metadata={"help": "memory bound of one alibi_chunked block (several: one variant each)"},
    )
    paths: list[str] | None = field(
        default=None,
        metadata={"help": "paths to measure, of stock:sdpa alibi:sdpa alibi:alibi_chunked alibi:alibi_flex "
                          "(default: all that run on the device; stock:sdpa is always measured)"},
    )
    max_dense_bias_gb: float = field(default=2.0, metadata={"help": "skip the dense path above this bias size"})
    memory: bool = field(default=True, metadata={"help": "measure the peak memory of each variant (fresh processes)"})

    def __post_init__(self):
        super().__post_init__()
        unknown = sorted(set(self.paths or ()) - set(KNOWN_PATHS))
        if unknown:
            raise ValueError(f"--paths: unknown {unknown}; choose from {', '.join(KNOWN_PATHS)}")


def main(argv=None) -> dict:
    (args,) = parse(LargeImageBenchmarkArguments, argv, __doc__, "benchmarks/bench_large.py")
    return run_and_write(measure, args, HEADER, "bench_large.json")


if __name__ == "__main__":
    main()
