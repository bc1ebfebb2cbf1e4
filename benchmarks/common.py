"""What the benchmark scripts share: the project's command-line convention (`alibi_dinov2.cli.ArgumentParser`:
dataclass options, underscore flags, a JSON or YAML file of options first), the table-then-JSON run, and paired
timing.

Paired timing is what makes ratios trustworthy on a machine shared with other work, whose speed drifts by a factor of
several within minutes: every round times each contestant once, back to back (the order reversed every other round),
and a ratio is the median over rounds of the per-round ratios, reported with its quartiles and range. Wall-clock
and process CPU time are both kept; CPU time leaves out the time the process waited for a core."""

from __future__ import annotations

import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

import torch


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from alibi_dinov2.cli import ArgumentParser
from alibi_dinov2.io.files import write_json_atomic


RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class RunArguments:
    """Device, precision and output options shared by the model benchmarks."""

    device: str = field(default="auto", metadata={"help": "'auto' (cuda when available), 'cpu' or 'cuda'"})
    dtype: Literal["float32", "float16", "bfloat16"] = field(default="float32", metadata={"help": "model precision"})
    compile: str | None = field(
        default=None,
        metadata={"help": "compare both models through torch.compile with this backend (inductor; aot_eager traces "
                          "without building kernels)"},
    )
    output: str | None = field(default=None, metadata={"help": "JSON file to write (default: benchmarks/results/)"})
    threads: int | None = field(
        default=None, metadata={"help": "torch.set_num_threads for every measurement (default: torch's own choice)"}
    )

    def __post_init__(self):
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"--threads must be >= 1; got {self.threads}")


def parse(dataclass_types, argv, description: str, prog: str) -> tuple:
    """Parse a benchmark's options with the project's one parser."""
    return ArgumentParser(dataclass_types, prog=prog, description=description).parse(argv)


def write_results(results: dict, output: str | Path | None, default_name: str) -> Path:
    """Write the results as JSON (atomically) to `output`, or `benchmarks/results/<default_name>`."""
    path = Path(output) if output else RESULTS / default_name
    write_json_atomic(path, results)
    print(f"written {path}")
    return path


def run_and_write(measure: Callable[[object], dict], args, header: str, default_name: str) -> dict:
    """Fix the thread count, print the table header, run `measure(args)` (which prints the rows) and write its
    results as JSON, with the thread count and the machine's load averages before and after."""
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    print(header)
    results = measure(args)
    results.update(
        threads=torch.get_num_threads(), load_average_before=load_before, load_average_after=os.getloadavg()
    )
    write_results(results, getattr(args, "output", None), default_name)
    return results


def timed(call: Callable[[], object]) -> tuple[float, float]:
    """Wall-clock and process CPU seconds (all threads) of one `call()`."""
    wall, cpu = time.perf_counter(), time.process_time()
    call()
    return time.perf_counter() - wall, time.process_time() - cpu


def paired_rounds(calls: dict[str, Callable[[], object]], rounds: int) -> dict[str, dict[str, list[float]]]:
    """Time every call once per round, back to back, in the given order on even rounds and reversed on odd ones.
    Returns `{name: {"seconds": [...], "cpu_seconds": [...]}}`, one entry per round."""
    times = {name: {"seconds": [], "cpu_seconds": []} for name in calls}
    for round_index in range(rounds):
        names = list(calls) if round_index % 2 == 0 else list(reversed(calls))
        for name in names:
            wall, cpu = timed(calls[name])
            times[name]["seconds"].append(wall)
            times[name]["cpu_seconds"].append(cpu)
    return times


def paired_ratio(reference: list[float], other: list[float]) -> dict:
    """Throughput of `other` over that of `reference` (time of the reference over time of the other) from paired
    rounds: the median of the per-round ratios, its quartiles (the ratio itself when there is one round) and range."""
    ratios = sorted(ref / time_ for ref, time_ in zip(reference, other))
    quartiles = statistics.quantiles(ratios, n=4, method="inclusive")[::2] if len(ratios) > 1 else ratios * 2
    return {"median": statistics.median(ratios), "quartiles": quartiles, "range": [ratios[0], ratios[-1]],
            "rounds": len(ratios)}


def format_ratio(ratio: dict) -> str:
    """`0.981 (0.962-0.990)`: the median and quartiles of a [`paired_ratio`]."""
    low, high = ratio["quartiles"]
    return f"{ratio['median']:.3f} ({low:.3f}-{high:.3f})"
