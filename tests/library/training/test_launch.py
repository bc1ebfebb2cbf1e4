"""Several processes of one job through accelerate's launcher: no defaults warning, and a failure reported by the
process itself (one line), never followed by the launcher's traceback."""

import logging
import os
import subprocess
import sys

import pytest
from accelerate.commands import launch as accelerate_launch
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

from alibi_dinov2.training import launch
from conftest import REPO_ROOT


DEFAULTS_WARNING = "were not passed to `accelerate launch` and had defaults used instead"


def validated(options, caplog) -> str:
    """What accelerate says while it completes the launch settings `options`."""
    arguments = accelerate_launch.launch_command_parser().parse_args([*options, "script.py"])
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        accelerate_launch._validate_launch_command(arguments)
    return caplog.text


def test_the_launch_settings_leave_accelerate_nothing_to_default(monkeypatch, caplog):
    monkeypatch.setattr(launch, "has_accelerate_config", lambda: False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert DEFAULTS_WARNING in validated(["--num_processes", "2"], caplog)  # what a bare launch says
    assert DEFAULTS_WARNING not in validated(launch.launch_options(2, None), caplog)
    assert launch.launch_options(2, "bf16")[-6:-2] == ["--mixed_precision", "bf16", "--dynamo_backend", "no"]


def test_a_launched_process_does_not_launch_again(monkeypatch):
    for name in ("LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert launch.needs_launch(2) and not launch.needs_launch(1) and not launch.needs_launch(None)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert not launch.needs_launch(2)


@pytest.mark.parametrize(
    "failure, status, said",
    [
        (subprocess.CalledProcessError(2, ["python"]), 2, ""),  # the user error: said by the process itself
        (ChildFailedError("alibi-distill", {1: ProcessFailure(1, 123, 3, "")}), 3,
         "alibi-distill: a process of the 2 failed (exit status 3)\n"),
    ],
)
def test_a_failed_process_ends_the_launch_with_its_status_and_no_traceback(monkeypatch, capsys, failure, status,
                                                                            said):
    def failing(arguments):
        assert arguments.module and arguments.training_script == "alibi_dinov2.commands"
        assert arguments.training_script_args == ["alibi-distill", "--teacher", "t"]
        raise failure

    monkeypatch.setattr(accelerate_launch, "launch_command", failing)
    with pytest.raises(SystemExit) as exit_info:
        launch.launch("alibi-distill", ["--teacher", "t"], 2)
    assert exit_info.value.code == status
    assert exit_info.value.__cause__ is None and exit_info.value.__suppress_context__
    assert capsys.readouterr().err == said


@pytest.mark.slow
@pytest.mark.multiprocess
def test_a_user_error_in_two_launched_processes_is_one_line(tmp_path):
    command = [sys.executable, "-m", "alibi_dinov2.commands", "alibi-distill", "--num_processes", "2",
               "--teacher", "./no-such-teacher", "--train_dir", str(tmp_path), "--output_dir", str(tmp_path / "out")]
    environment = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO_ROOT))
    for name in ("LOCAL_RANK", "WORLD_SIZE", "RANK"):
        environment.pop(name, None)
    finished = subprocess.run(command, cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 2
    assert finished.stderr.strip().splitlines() == [
        "alibi-distill: error: not found: ./no-such-teacher (no such file or folder, and not a Hub id)"
    ], finished.stderr
