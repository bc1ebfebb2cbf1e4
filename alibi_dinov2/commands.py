"""Console entry points of the project's commands (see `setup.py`): each runs a module's `main` through
`alibi_dinov2.cli.run_command`, so a user error ends with one line and exit status 2 and no traceback.

| command | module |
|---|---|
| `alibi-convert` | `convert_checkpoint` |
| `alibi-distill` | `train_distill` (also `accelerate launch train_distill.py`) |
| `alibi-quickstart` | `quickstart` |
| `alibi-probe` | `evaluation.probe_runner` |
| `alibi-report` | `evaluation.report` |
| `alibi-scribbles` | `evaluation.scribble_benchmark` |
| `alibi-linear-seg` | `evaluation.linear_segmentation` |
| `alibi-segment` | `alibi_dinov2.segmentation.command` |
| `alibi-demo` | `demo.app` |
| `alibi-publish` | `evaluation.publish` |

The table names the modules as strings and imports one only when its command runs, so this module is the top of the
layers (above the scripts, which it names) while importing only `alibi_dinov2.cli` itself.
"""

from __future__ import annotations

import importlib
import sys
from typing import Callable

from alibi_dinov2.cli import run_command


COMMANDS = {
    "alibi-convert": "convert_checkpoint",
    "alibi-distill": "train_distill",
    "alibi-quickstart": "quickstart",
    "alibi-probe": "evaluation.probe_runner",
    "alibi-report": "evaluation.report",
    "alibi-scribbles": "evaluation.scribble_benchmark",
    "alibi-linear-seg": "evaluation.linear_segmentation",
    "alibi-segment": "alibi_dinov2.segmentation.command",
    "alibi-demo": "demo.app",
    "alibi-publish": "evaluation.publish",
}


def _entry_point(command: str) -> Callable[[], None]:
    def entry() -> None:
        module = importlib.import_module(COMMANDS[command])
        run_command(module.main, prog=command)

    entry.__name__ = command.replace("-", "_")
    entry.__doc__ = f"`{command}`: `{COMMANDS[command]}.main` on the command line."
    return entry


convert = _entry_point("alibi-convert")
distill = _entry_point("alibi-distill")
quickstart = _entry_point("alibi-quickstart")
probe = _entry_point("alibi-probe")
report = _entry_point("alibi-report")
scribbles = _entry_point("alibi-scribbles")
linear_seg = _entry_point("alibi-linear-seg")
segment = _entry_point("alibi-segment")
demo = _entry_point("alibi-demo")
publish = _entry_point("alibi-publish")


def command_parsers(command: str) -> dict:
    """The `alibi_dinov2.cli.ArgumentParser` of `command` (its module's `build_parser`), by command line:
    `{"alibi-probe": parser}`, or one per subcommand (`{"alibi-segment train": ..., "alibi-segment apply": ...}`)."""
    module = importlib.import_module(COMMANDS[command])
    subcommands = getattr(module, "SUBCOMMANDS", ())
    if subcommands:
        return {f"{command} {subcommand}": module.build_parser(subcommand) for subcommand in subcommands}
    return {command: module.build_parser()}


def console_scripts() -> list[str]:
    """The `entry_points["console_scripts"]` lines of `setup.py`."""
    return [f"{command} = alibi_dinov2.commands:{command[len('alibi-'):].replace('-', '_')}" for command in COMMANDS]


if __name__ == "__main__":  # `python -m alibi_dinov2.commands alibi-distill ARGS`: what a launcher starts per process
    run_command(importlib.import_module(COMMANDS[sys.argv[1]]).main, sys.argv[2:], prog=sys.argv[1])
