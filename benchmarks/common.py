"""What the benchmark scripts share: the project's command-line convention (`evaluation.cli.ArgumentParser`:
dataclass options, underscore flags, a JSON or YAML file of options first) and the table-then-JSON run."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evaluation.cli import ArgumentParser  # noqa: E402
from evaluation.files import write_json_atomic  # noqa: E402


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
    """Print the table header, run `measure(args)` (which prints the rows) and write its results as JSON."""
    print(header)
    results = measure(args)
    write_results(results, getattr(args, "output", None), default_name)
    return results
