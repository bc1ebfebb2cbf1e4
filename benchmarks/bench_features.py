"""Time the classical feature stack (alibi_dinov2.features.classical) on large images.

Usage::

    python benchmarks/bench_features.py --output outputs/bench_features.json
    python benchmarks/bench_features.py --sizes 1024 2048 4096 --repeats 5 --torch_cpu

Backends timed: ``numpy`` (scipy, CPU) always, ``torch`` on CUDA when a GPU is available, and torch on
the CPU with ``--torch_cpu``. Target: a 1024 x 1024 image in under 5 s on 2 CPU cores (numpy backend).
"""

from __future__ import annotations

import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from alibi_dinov2.features.classical import classical_features, n_features
from alibi_dinov2.synthetic.microstructures import generate_microstructure
from benchmarks.common import parse, write_results  # noqa: E402


TARGET_SECONDS_1024 = 5.0


def time_backend(image: np.ndarray, backend: str, device, repeats: int) -> dict:
    """Run the stack ``repeats`` times after one warm-up; seconds per run."""
    classical_features(image[:64, :64], backend=backend, device=device)  # warm-up (imports, kernels)
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        features = classical_features(image, backend=backend, device=device)
        if device is not None and str(device).startswith("cuda"):
            import torch

            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    return {
        "min_s": min(seconds),
        "mean_s": float(np.mean(seconds)),
        "runs_s": seconds,
        "output_shape": list(features.shape),
        "output_mib": features.nbytes / 2**20,
    }


@dataclass
class FeatureBenchmarkArguments:
    sizes: list[int] = field(default_factory=lambda: [1024, 2048], metadata={"help": "square image sides in px"})
    repeats: int = field(default=3, metadata={"help": "timed runs per backend and size"})
    torch_cpu: bool = field(default=False, metadata={"help": "also time the torch backend on the CPU"})
    output: str | None = field(
        default=None, metadata={"help": "JSON file (default benchmarks/results/bench_features.json)"}
    )


def main(argv=None) -> dict:
    (args,) = parse(FeatureBenchmarkArguments, argv, __doc__, "benchmarks/bench_features.py")

    backends = [("numpy", "numpy", None)]
    try:
        import torch

        if torch.cuda.is_available():
            backends.append((f"torch-cuda ({torch.cuda.get_device_name(0)})", "torch", "cuda"))
        if args.torch_cpu:
            backends.append(("torch-cpu", "torch", "cpu"))
        torch_threads = torch.get_num_threads()
    except ImportError:
        torch_threads = None

    results = []
    for size in args.sizes:
        image, _ = generate_microstructure((size, size), n_phases=3, seed=0)
        for label, backend, device in backends:
            timing = time_backend(image, backend, device, args.repeats)
            results.append({"size": size, "backend": label, **timing})

    print(f"Classical feature stack, {n_features()} channels, CPU cores available: {os.cpu_count()}")
    print(f"{'size':>11} | {'backend':<34} | {'min s':>7} | {'mean s':>7} | {'output MiB':>10}")
    print("-" * 82)
    for row in results:
        print(
            f"{row['size']:>5}x{row['size']:<5} | {row['backend']:<34} | {row['min_s']:7.2f} | "
            f"{row['mean_s']:7.2f} | {row['output_mib']:10.0f}"
        )
    numpy_1024 = [r for r in results if r["size"] == 1024 and r["backend"] == "numpy"]
    if numpy_1024:
        verdict = "meets" if numpy_1024[0]["min_s"] < TARGET_SECONDS_1024 else "MISSES"
        print(f"1024x1024 numpy: {numpy_1024[0]['min_s']:.2f} s, {verdict} the {TARGET_SECONDS_1024:.0f} s target")

    report = {
        "benchmark": "classical_features",
        "n_channels": n_features(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch_threads,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "target_seconds_1024": TARGET_SECONDS_1024,
        "results": results,
    }
    write_results(report, args.output, "bench_features.json")
    return report


if __name__ == "__main__":
    main()
