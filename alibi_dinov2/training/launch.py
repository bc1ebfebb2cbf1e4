"""Several processes for one Accelerate job of the project (`alibi-distill --num_processes 4`,
`alibi-linear-seg ... --num_processes 4`), started through accelerate's own launcher in this process:

* every launch setting is given (`--num_machines 1`, `--mixed_precision`, `--dynamo_backend no`, the threads of
  each process), so accelerate prints no "values were not passed ... defaults used instead" warning; where an
  `accelerate config` file exists, its settings are used and only the process count is given;
* each process runs the same command (`python -m alibi_dinov2.commands COMMAND ...`), so a user error ends the run
  with the command's one line (from the main process) and its exit status, with no launcher traceback after it.

`accelerate launch train_distill.py ...` keeps working; the two points above are what this adds.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
from typing import Sequence

from alibi_dinov2.cli import available_cpus


USER_ERROR_STATUS = 2  # what `alibi_dinov2.cli.run_command` exits with after its one line


def launched() -> bool:
    """Whether this process is one of a launched group (accelerate launch --multi_gpu, torchrun)."""
    return "LOCAL_RANK" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1


def needs_launch(num_processes: int | None) -> bool:
    """Whether a command asked for `num_processes` must start them (more than one, and not started yet)."""
    return bool(num_processes) and num_processes > 1 and not launched()


def has_accelerate_config() -> bool:
    from accelerate.commands.config import default_config_file

    return os.path.isfile(default_config_file)


def free_port() -> int:
    """A TCP port of this machine that nothing listens on now (the group's rendezvous; the default one may be held by
    another job)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch_options(num_processes: int, mixed_precision: str | None) -> list[str]:
    """`accelerate launch` options that leave it nothing to default (and so nothing to warn about)."""
    options = ["--multi_gpu", "--num_processes", str(num_processes)]
    if has_accelerate_config():
        return options + (["--mixed_precision", mixed_precision] if mixed_precision else [])
    return options + ["--num_machines", "1", "--mixed_precision", mixed_precision or "no", "--dynamo_backend", "no",
                      "--main_process_port", str(free_port())]


def _exit_status(error: BaseException) -> int:
    if isinstance(error, subprocess.CalledProcessError):
        return error.returncode or 1
    codes = [failure.exitcode for failure in getattr(error, "failures", {}).values() if failure.exitcode]
    return codes[0] if codes and codes[0] > 0 else 1


def launch(command: str, argv: Sequence[str], num_processes: int, mixed_precision: str | None = None) -> None:
    """Run `command argv` (an `alibi-*` command of `alibi_dinov2.commands`) in `num_processes` processes, and
    return when all have finished.

    Raises:
        SystemExit: a process failed; its exit status, after its own message (no traceback of the launcher).
    """
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    threads = max(1, available_cpus() // num_processes)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))  # else torchrun warns that it sets 1
    options = launch_options(num_processes, mixed_precision)
    arguments = launch_command_parser().parse_args([*options, "-m", "alibi_dinov2.commands", command, *argv])
    elastic = logging.getLogger("torch.distributed.elastic")  # its report of a failed process is said below
    level = elastic.level
    elastic.setLevel(logging.CRITICAL)
    try:
        launch_command(arguments)
    except (subprocess.CalledProcessError, ChildFailedError) as error:
        status = _exit_status(error)
        if status != USER_ERROR_STATUS:  # a user error was said in one line by the process itself
            print(f"{command}: a process of the {num_processes} failed (exit status {status})", file=sys.stderr)
        raise SystemExit(status) from None
    finally:
        elastic.setLevel(level)
