"""Throughput and peak memory of AlibiDinov2Model against transformers' Dinov2WithRegistersModel.

Both models are ViT-S/14 with 4 registers and the same (random) weights, both on the `sdpa` attention path; the
ALiBi model drops the learned position embedding and adds the cached 2D bias. Target: the dense ALiBi path at least
0.97x the stock throughput at 518 px. Both models are timed back to back in every round (see `benchmarks.common`):
the ratios printed are medians of per-round ratios with their quartiles, by wall clock and by process CPU time.
Sizes, ratios and a table are printed; everything is written as JSON.

    python benchmarks/bench_attention.py --threads 2                 # CPU, 224 / 518 / 1036 px
    python benchmarks/bench_attention.py --sizes 518 --repeats 21 --threads 2 --profile   # + top ops per model
    python benchmarks/bench_attention.py --device cuda --dtype bfloat16 --batch_size 8
    python benchmarks/bench_attention.py --device cuda --compile inductor   # both models through torch.compile

Peak memory is the largest resident-set growth of a fresh process during one forward pass on CPU, and
`torch.cuda.max_memory_allocated` on a GPU.
"""

import multiprocessing
import platform
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    RunArguments,
    format_ratio,
    paired_ratio,
    paired_rounds,
    parse,
    run_and_write,
    timed,
)
from configuration_alibi_dinov2 import AlibiDinov2Config  # noqa: E402
from modeling_alibi_dinov2 import AlibiDinov2Model  # noqa: E402


VIT_S = dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, patch_size=14, image_size=518)
MODELS = ("stock", "alibi")


def build_models(
    dtype: torch.dtype, device: str, alibi_options: dict | None = None, compile_backend: str | None = None
) -> dict:
    """The stock model and the ALiBi model with the same weights (the ALiBi model has no position embedding);
    `alibi_options` are keyword arguments of `AlibiDinov2Model` (the attention's memory options). With a
    `compile_backend`, both come wrapped by `torch.compile` (shapes left to its automatic dynamic mode)."""
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    torch.manual_seed(0)
    stock = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(**VIT_S, num_register_tokens=4))
    alibi = AlibiDinov2Model(AlibiDinov2Config(**VIT_S, num_register_tokens=4), **(alibi_options or {}))
    for model in (stock, alibi):
        model.set_attn_implementation("sdpa")
    weights = {k: v for k, v in stock.state_dict().items() if "position_embeddings" not in k}
    alibi.load_state_dict(weights, strict=True)
    models = {name: model.to(device=device, dtype=dtype).eval() for name, model in zip(MODELS, (stock, alibi))}
    if compile_backend:
        models = {name: torch.compile(model, backend=compile_backend) for name, model in models.items()}
    return models


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def forward(model, pixel_values, device: str, call_options: dict | None = None) -> None:
    """One inference forward pass, finished on the device; `call_options` are per-call keyword arguments."""
    with torch.inference_mode():
        model(pixel_values, **(call_options or {}))
    synchronize(device)


def time_forward(model, pixel_values, repeats: int, device: str, call_options: dict | None = None) -> list[float]:
    """Wall-clock seconds of `repeats` forward passes."""
    synchronize(device)
    return [timed(lambda: forward(model, pixel_values, device, call_options))[0] for _ in range(repeats)]


def profile_top_ops(model, pixel_values, device: str, call_options: dict | None = None, rows: int = 10) -> list:
    """The operators of one forward pass with the most self CPU time: `[(name, milliseconds, calls), ...]`."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        forward(model, pixel_values, device, call_options)
    events = sorted(profiler.key_averages(), key=lambda event: event.self_cpu_time_total, reverse=True)
    return [(event.key, round(event.self_cpu_time_total / 1e3, 1), event.count) for event in events[:rows]]


def print_profile(title: str, top_ops: list) -> None:
    print(f"  top ops, {title}: " + "; ".join(f"{name} {ms:.0f} ms x{calls}" for name, ms, calls in top_ops))


def _status_kib(field: str) -> int:
    """A memory figure of this process from /proc/self/status (VmRSS: resident now, VmHWM: its peak), in KiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}; peak memory is measured on Linux only")


def _cpu_peak_worker(name, size, batch_size, dtype_name, implementation, alibi_options, call_options, compile_backend,
                     threads, queue) -> None:
    torch.set_num_threads(threads)
    model = build_models(getattr(torch, dtype_name), "cpu", alibi_options, compile_backend)[name]
    model.set_attn_implementation(implementation)
    pixel_values = torch.randn(batch_size, 3, size, size, dtype=getattr(torch, dtype_name))
    if compile_backend:
        forward(model, pixel_values, "cpu", call_options)  # compiles: not part of the measured pass
    baseline = _status_kib("VmRSS")
    # Reset the high-water mark (Linux >= 4.0) so that the peak of building both models does not count.
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
    forward(model, pixel_values, "cpu", call_options)
    queue.put((_status_kib("VmHWM") - baseline) * 1024)


def peak_memory_bytes(
    name: str,
    size: int,
    batch_size: int,
    dtype: torch.dtype,
    device: str,
    models: dict,
    implementation: str = "sdpa",
    alibi_options: dict | None = None,
    compile_backend: str | None = None,
    call_options: dict | None = None,
) -> int:
    """Extra memory one forward pass of `models[name]` on `implementation` needs beyond the loaded model, with this
    process's thread count."""
    if device.startswith("cuda"):
        model = models[name]
        model.set_attn_implementation(implementation)
        pixel_values = torch.randn(batch_size, 3, size, size, device=device, dtype=dtype)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
        forward(model, pixel_values, device, call_options)
        return torch.cuda.max_memory_allocated() - baseline
    # A fresh process per measurement: no allocator cache or earlier run inflates the resident set.
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    dtype_name = str(dtype).split(".")[-1]
    arguments = (name, size, batch_size, dtype_name, implementation, alibi_options, call_options, compile_backend,
                 torch.get_num_threads(), queue)
    process = context.Process(target=_cpu_peak_worker, args=arguments)
    process.start()
    result = queue.get()
    process.join()
    return result


def run(args) -> dict:
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    models = build_models(dtype, device, compile_backend=args.compile)
    rows = []
    for size in args.sizes:
        pixel_values = torch.randn(args.batch_size, 3, size, size, device=device, dtype=dtype)
        for name in MODELS:
            # A compiled model's first pass at a new size may compile: never time it.
            time_forward(models[name], pixel_values, max(args.warmup, int(bool(args.compile))), device)
        calls = {name: (lambda model=models[name]: forward(model, pixel_values, device)) for name in MODELS}
        times = paired_rounds(calls, args.repeats)
        row = {"size": size, "tokens": 1 + 4 + (size // 14) ** 2}
        for name in MODELS:
            row[f"{name}_images_per_s"] = args.batch_size / statistics.median(times[name]["seconds"])
            row[f"{name}_seconds"] = times[name]["seconds"]
            row[f"{name}_cpu_seconds"] = times[name]["cpu_seconds"]
            if args.memory:
                row[f"{name}_peak_bytes"] = peak_memory_bytes(
                    name, size, args.batch_size, dtype, device, models, compile_backend=args.compile
                )
        row["throughput_ratio"] = row["alibi_images_per_s"] / row["stock_images_per_s"]
        row["paired_ratio"] = paired_ratio(times["stock"]["seconds"], times["alibi"]["seconds"])
        row["paired_cpu_ratio"] = paired_ratio(times["stock"]["cpu_seconds"], times["alibi"]["cpu_seconds"])
        if args.memory:
            row["memory_ratio"] = row["alibi_peak_bytes"] / max(row["stock_peak_bytes"], 1)
        print_row(row)
        if args.profile:
            row["top_ops"] = {name: profile_top_ops(models[name], pixel_values, device) for name in MODELS}
            for name in MODELS:
                print_profile(f"{name}, {size} px", row["top_ops"][name])
        rows.append(row)
    return {
        "benchmark": "bench_attention",
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor() or "cpu",
        "device_type": device,
        "dtype": args.dtype,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "compile_backend": args.compile,
        "torch": torch.__version__,
        "target": "dense ALiBi throughput >= 0.97x stock at 518 px (paired ratio)",
        "rows": rows,
    }


HEADER = (
    f"{'size':>6} {'tokens':>7} {'stock img/s':>12} {'alibi img/s':>12} {'paired (IQR)':>19} "
    f"{'paired CPU time (IQR)':>21} {'stock MiB':>10} {'alibi MiB':>10}"
)


def print_row(row: dict) -> None:
    mib = 2**20
    memory = (
        f"{row['stock_peak_bytes'] / mib:>10.1f} {row['alibi_peak_bytes'] / mib:>10.1f}"
        if "stock_peak_bytes" in row else f"{'-':>10} {'-':>10}"
    )
    print(
        f"{row['size']:>6} {row['tokens']:>7} {row['stock_images_per_s']:>12.3f} {row['alibi_images_per_s']:>12.3f} "
        f"{format_ratio(row['paired_ratio']):>19} {format_ratio(row['paired_cpu_ratio']):>21} {memory}",
        flush=True,
    )


@dataclass
class AttentionBenchmarkArguments(RunArguments):
    sizes: list[int] = field(default_factory=lambda: [224, 518, 1036], metadata={"help": "square input sizes in px"})
    batch_size: int = field(default=1, metadata={"help": "images per forward pass"})
    repeats: int = field(default=5, metadata={"help": "timed rounds per size, each timing both models once"})
    warmup: int = field(default=2, metadata={"help": "untimed forward passes per model and size"})
    memory: bool = field(default=True, metadata={"help": "measure the peak memory of each model (fresh processes)"})
    profile: bool = field(default=False, metadata={"help": "print the operators with the most CPU time per model"})


def main(argv=None) -> dict:
    (args,) = parse(AttentionBenchmarkArguments, argv, __doc__, "benchmarks/bench_attention.py")
    return run_and_write(run, args, HEADER, "bench_attention.json")


if __name__ == "__main__":
    main()
