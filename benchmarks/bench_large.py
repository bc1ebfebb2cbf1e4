"""Peak memory and time of the ALiBi attention paths on large grids, against transformers' DINOv2.

ViT-S/14 with 4 registers, random weights shared by both models. For each grid (37 x 37 = 518 px up to
146 x 146 = 2044 px) it measures one forward pass of:

- `stock`: transformers' `Dinov2WithRegistersModel` on `sdpa` (learned position embedding, no bias);
- `sdpa`: ALiBi-DINOv2 with the dense cached bias (skipped where that bias exceeds `--max_dense_bias_gb`);
- `alibi_chunked`: bias rows per block of queries;
- `alibi_flex`: FlexAttention with the bias computed in the kernel (GPU only: on CPU it is not compiled).

Targets: a 2044 x 2044 forward on CPU under 4 GB peak resident memory; on a GPU, ALiBi at 518 px within 5% of
stock throughput. A table on stdout, JSON on disk.

    python benchmarks/bench_large.py                                  # CPU, grids 37 74 110 146
    python benchmarks/bench_large.py --device cuda --dtype bfloat16 --repeats 10
    python benchmarks/bench_large.py --device cuda --compile inductor --paths stock:sdpa alibi:sdpa   # compiled, both models
"""

import resource
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_attention import build_models, peak_memory_bytes, time_forward  # noqa: E402
from alibi_attention import ALIBI_RUNTIME_DEFAULTS  # noqa: E402
from benchmarks.common import RunArguments, parse, run_and_write  # noqa: E402


PATCH = 14
PREFIX_TOKENS = 5


def dense_bias_bytes(grid: int, dtype: torch.dtype) -> int:
    tokens = PREFIX_TOKENS + grid * grid
    return tokens * (-(-tokens // 8) * 8) * torch.finfo(dtype).bits // 8


def paths_for(device: str, requested: list[str] | None = None) -> list[tuple[str, str]]:
    """(model, attention implementation) pairs measured on `device`: `requested` ones ("alibi:alibi_chunked"),
    or all that run there."""
    if requested:
        return [tuple(path.split(":", 1)) for path in requested]
    paths = [("stock", "sdpa"), ("alibi", "sdpa"), ("alibi", "alibi_chunked")]
    if device.startswith("cuda"):
        paths.append(("alibi", "alibi_flex"))
    return paths


def measure(args) -> dict:
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    # The dense path measured as such, never switched to the chunked one by size.
    alibi_options = dict(
        alibi_dense_max_tokens=10**9,
        alibi_query_chunk_size=args.query_chunk_size,
        alibi_chunk_memory_mb=args.chunk_memory_mb,
    )
    models = build_models(dtype, device, alibi_options, args.compile)
    rows = []
    for grid in args.grids:
        size = grid * PATCH
        pixel_values = torch.randn(args.batch_size, 3, size, size, device=device, dtype=dtype)
        for name, implementation in paths_for(device, args.paths):
            row = {"grid": grid, "size": size, "tokens": PREFIX_TOKENS + grid * grid, "model": name, "path": implementation}
            if name == "alibi" and implementation == "sdpa" and dense_bias_bytes(grid, dtype) > args.max_dense_bias_gb * 2**30:
                row["skipped"] = f"dense bias of {dense_bias_bytes(grid, dtype) / 2**30:.1f} GiB"
                rows.append(row)
                print_row(row)
                continue
            model = models[name]
            model.set_attn_implementation(implementation)
            # A compiled path's first pass compiles: never time it.
            compiles = implementation == "alibi_flex" or bool(args.compile)
            time_forward(model, pixel_values, max(args.warmup, int(compiles)), device)
            seconds = time_forward(model, pixel_values, args.repeats, device)
            row["seconds"] = seconds
            row["images_per_s"] = args.batch_size / statistics.median(seconds)
            row["peak_bytes"] = peak_memory_bytes(
                name, size, args.batch_size, dtype, device, models, implementation, alibi_options, args.compile
            )
            rows.append(row)
            print_row(row)
    return {
        "benchmark": "bench_large",
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
        "threads": torch.get_num_threads(),
        "dtype": args.dtype,
        "batch_size": args.batch_size,
        "query_chunk_size": args.query_chunk_size,
        "chunk_memory_mb": args.chunk_memory_mb,
        "compile_backend": args.compile,
        "torch": torch.__version__,
        "targets": {"cpu_2044px_peak_gb": 4.0, "gpu_518px_throughput_ratio": 0.95},
        "max_rss_bytes_of_this_process": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "rows": rows,
    }


HEADER = f"{'grid':>5} {'px':>5} {'tokens':>7} {'model':>6} {'path':>14} {'img/s':>9} {'peak MiB':>10}"


def print_row(row: dict) -> None:
    if "skipped" in row:
        tail = f"skipped ({row['skipped']})"
    else:
        tail = f"{row['images_per_s']:>9.4f} {row['peak_bytes'] / 2**20:>10.1f}"
    print(f"{row['grid']:>5} {row['size']:>5} {row['tokens']:>7} {row['model']:>6} {row['path']:>14} {tail}", flush=True)


@dataclass
class LargeImageBenchmarkArguments(RunArguments):
    grids: list[int] = field(default_factory=lambda: [37, 74, 110, 146], metadata={"help": "patch grids per side"})
    batch_size: int = field(default=1, metadata={"help": "images per forward pass"})
    repeats: int = field(default=1, metadata={"help": "timed forward passes per path and grid"})
    warmup: int = field(default=0, metadata={"help": "untimed forward passes per path and grid"})
    query_chunk_size: int = field(default=1024, metadata={"help": "most queries per block of alibi_chunked"})
    chunk_memory_mb: float = field(default=ALIBI_RUNTIME_DEFAULTS["alibi_chunk_memory_mb"], metadata={"help": "memory bound of one alibi_chunked block"})
    paths: list[str] | None = field(
        default=None,
        metadata={"help": "paths to measure, of stock:sdpa alibi:sdpa alibi:alibi_chunked alibi:alibi_flex "
                          "(default: all that run on the device)"},
    )
    max_dense_bias_gb: float = field(default=2.0, metadata={"help": "skip the dense path above this bias size"})

    def __post_init__(self):
        known = ("stock:sdpa", "alibi:sdpa", "alibi:alibi_chunked", "alibi:alibi_flex")
        unknown = sorted(set(self.paths or ()) - set(known))
        if unknown:
            raise ValueError(f"--paths: unknown {unknown}; choose from {', '.join(known)}")


def main(argv=None) -> dict:
    (args,) = parse(LargeImageBenchmarkArguments, argv, __doc__, "benchmarks/bench_large.py")
    return run_and_write(measure, args, HEADER, "bench_large.json")


if __name__ == "__main__":
    main()
