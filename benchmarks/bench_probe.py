"""Speed of the vectorised per-channel positional probe against a scikit-learn loop.

The reference fits ``StandardScaler`` + ``Ridge(alpha)`` on each channel alone (384 fits for ViT-S);
``per_channel_probe`` does all channels in one closed-form pass. Both see the same sample positions,
and the largest difference between their R^2 values is reported alongside the timings.

    python benchmarks/bench_probe.py --output bench_probe.json
"""

from __future__ import annotations

import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from sklearn.linear_model import Ridge
from sklearn.metrics import r2_score
from sklearn.preprocessing import StandardScaler


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import parse, write_results  # noqa: E402
from evaluation.positional_probe import (  # noqa: E402
    expand_ramps,
    linear_probe,
    per_channel_probe,
    ramp_targets,
    sample_positions,
)


def sklearn_per_channel(features, ramp, step, sampling, alpha, seed) -> np.ndarray:
    """Plain loop: one StandardScaler + Ridge per channel, R^2 over all patches (mean over ramps)."""
    height, width, channels = features.shape
    flat = features.reshape(-1, channels)
    index = sample_positions(height, width, step, sampling, seed)
    targets = ramp_targets(expand_ramps(ramp), height, width, seed)
    scores = np.empty(channels)
    for channel in range(channels):
        column = flat[:, [channel]]
        scaler = StandardScaler().fit(column[index])
        ridge = Ridge(alpha=alpha).fit(scaler.transform(column[index]), targets[index])
        prediction = ridge.predict(scaler.transform(column)).reshape(len(column), -1)
        scores[channel] = np.mean([r2_score(targets[:, t], prediction[:, t]) for t in range(targets.shape[1])])
    return scores


def sklearn_probe(features, ramp, step, sampling, alpha, seed) -> float:
    """One StandardScaler + Ridge on all channels (the reference for `linear_probe`)."""
    height, width, channels = features.shape
    flat = features.reshape(-1, channels)
    index = sample_positions(height, width, step, sampling, seed)
    targets = ramp_targets(expand_ramps(ramp), height, width, seed)
    scaler = StandardScaler().fit(flat[index])
    ridge = Ridge(alpha=alpha).fit(scaler.transform(flat[index]), targets[index])
    prediction = ridge.predict(scaler.transform(flat)).reshape(len(flat), -1)
    return float(np.mean([r2_score(targets[:, t], prediction[:, t]) for t in range(targets.shape[1])]))


def best_time(function, repeats: int) -> float:
    """Smallest wall time of `repeats` calls (seconds)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times)


def make_features(grid: int, channels: int, seed: int = 0) -> np.ndarray:
    """Noise features with a few positional channels, like a ViT-S output grid."""
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(grid, grid, channels))
    ramp = np.linspace(0.0, 1.0, grid)
    features[..., : min(4, channels)] += 3.0 * ramp[None, :, None]
    return features


def run(grid: int = 37, channels: int = 384, repeats: int = 5, step: int = 6, alpha: float = 1.0) -> dict:
    features = make_features(grid, channels)
    rows = []
    for sampling in ("random", "grid"):
        for ramp in ("lr", "lr+ud"):
            seed = 0
            vectorised = best_time(
                lambda: per_channel_probe(features, ramp, step, sampling, alpha, seed=seed), 10 * repeats
            )
            loop = best_time(
                lambda: sklearn_per_channel(features, ramp, step, sampling, alpha, seed), max(1, repeats // 2)
            )
            difference = np.abs(
                per_channel_probe(features, ramp, step, sampling, alpha, seed=seed)
                - sklearn_per_channel(features, ramp, step, sampling, alpha, seed)
            ).max()
            rows.append(
                {
                    "probe": "per-channel",
                    "sampling": sampling,
                    "ramp": ramp,
                    "vectorised_s": vectorised,
                    "sklearn_s": loop,
                    "speedup": loop / vectorised,
                    "max_abs_difference": float(difference),
                }
            )
        ramp = "lr+ud"
        ours = best_time(lambda: linear_probe(features, ramp, step, sampling, alpha, seed=0), 10 * repeats)
        reference = best_time(lambda: sklearn_probe(features, ramp, step, sampling, alpha, 0), repeats)
        difference = abs(
            linear_probe(features, ramp, step, sampling, alpha, seed=0)
            - sklearn_probe(features, ramp, step, sampling, alpha, 0)
        )
        rows.append(
            {
                "probe": "all channels",
                "sampling": sampling,
                "ramp": ramp,
                "vectorised_s": ours,
                "sklearn_s": reference,
                "speedup": reference / ours,
                "max_abs_difference": float(difference),
            }
        )
    return {
        "grid": [grid, grid],
        "channels": channels,
        "step": step,
        "alpha": alpha,
        "repeats": repeats,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "machine": platform.machine(),
        "rows": rows,
    }


def format_rows(rows: list[dict]) -> str:
    header = (
        f"{'probe':<13} {'sampling':<8} {'ramp':<6} {'ours (ms)':>10} {'sklearn (ms)':>13} "
        f"{'speed-up':>9} {'max |diff|':>11}"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        lines.append(
            f"{row['probe']:<13} {row['sampling']:<8} {row['ramp']:<6} {1e3 * row['vectorised_s']:>10.2f} "
            f"{1e3 * row['sklearn_s']:>13.1f} {row['speedup']:>8.0f}x {row['max_abs_difference']:>11.1e}"
        )
    return "\n".join(lines)


@dataclass
class ProbeBenchmarkArguments:
    grid: int = field(default=37, metadata={"help": "grid side (37 = 518 px / 14)"})
    channels: int = field(default=384, metadata={"help": "feature channels"})
    repeats: int = field(default=5, metadata={"help": "timing repeats (best is kept)"})
    step: int = field(default=6, metadata={"help": "probe sampling step"})
    output: str | None = field(
        default=None, metadata={"help": "JSON file (default benchmarks/results/bench_probe.json)"}
    )


def main(argv=None) -> dict:
    (args,) = parse(ProbeBenchmarkArguments, argv, __doc__, "benchmarks/bench_probe.py")
    result = run(grid=args.grid, channels=args.channels, repeats=args.repeats, step=args.step)
    print(f"per-channel positional probe, {args.grid}x{args.grid} grid, {args.channels} channels, step {args.step}")
    print(format_rows(result["rows"]))
    write_results(result, args.output, "bench_probe.json")
    return result


if __name__ == "__main__":
    main()
