"""The one run layer of the project's Accelerate jobs (distillation, semantic-segmentation probes).

Built from accelerate's own pieces: an `Accelerator` with a `ProjectConfiguration` rooted at the run's output
folder, `save_state` / `load_state` for checkpoints, `register_for_checkpointing` for the job's own progress
(:class:`StateDictDataclass`) and `skip_first_batches` to resume in the middle of an epoch.

One layout for every run: the output folder holds the results only (the model folder that is loaded and pushed),
and the run's own files lie beside it, in the run folder::

    OUTPUT_DIR/                             the results (a distillation's model folder: config, weights, card)
    OUTPUT_DIR-run/
        checkpoints/checkpoint_00000300/    accelerator.save_state: model, optimizer, RNG of every process,
                                            registered objects (custom_checkpoint_<i>.pkl)
        checkpoints/.tmp_checkpoint_.../    a checkpoint being written (never picked by "latest")
        logs/                               tracker logs (ProjectConfiguration.logging_dir)

A checkpoint is complete or absent: :func:`save_checkpoint` lets `save_state` write into a temporary sibling folder
and renames it once every process has finished, so a run killed while saving leaves nothing that
:func:`resolve_resume_checkpoint` would pick.

Typical use::

    accelerator = make_accelerator(output_dir, mixed_precision="bf16", seed=0)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    progress = Progress()                                   # a StateDictDataclass
    accelerator.register_for_checkpointing(progress)
    checkpoint = resolve_resume_checkpoint("latest", output_dir)
    if checkpoint is not None:
        load_checkpoint(accelerator, checkpoint)
    for batch in epoch_batches(accelerator, loader, progress.epoch, progress.step_in_epoch):
        ...
        save_checkpoint(accelerator, output_dir, progress.global_step, total_limit=2)
    release_accelerator()                                   # lets the process run another job
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any, Iterable, Union

import torch

from alibi_dinov2.errors import SourceNotFoundError
from alibi_dinov2.hub.push import CHECKPOINTS_FOLDER, LOGS_FOLDER


logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

CHECKPOINT_PREFIX = "checkpoint_"
RUN_FOLDER_SUFFIX = "-run"
DEFAULT_CHECKPOINTS_TOTAL_LIMIT = 2
_CHECKPOINT_NAME = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")
_TEMPORARY_PREFIX = ".tmp_"
_REPLACED_PREFIX = ".old_"
# accelerate's save_state writes the RNG state of process 0 into every checkpoint, whatever else it holds.
_ALWAYS_SAVED = "random_states_0.pkl"


# --------------------------------------------------------------------------------------------------
# The accelerator
# --------------------------------------------------------------------------------------------------
def distributed_without_accelerator() -> bool:
    """True for a multi-process launch (`accelerate launch --multi_gpu`, `torchrun`) on a machine with no GPU: the
    processes must then form a CPU (gloo) group, not train as independent copies of the same job."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    xpu = getattr(torch, "xpu", None)
    return not (torch.cuda.is_available() or (xpu is not None and xpu.is_available()))


def make_accelerator(
    output_dir: PathLike,
    mixed_precision: str = "no",
    log_with=None,
    cpu: bool | None = None,
    seed: int | None = None,
    **accelerator_kwargs,
):
    """An `Accelerator` whose project folder is the run folder of `output_dir` (tracker logs in
    `OUTPUT_DIR-run/logs`).

    Args:
        mixed_precision: "no", "fp16" or "bf16".
        log_with: trackers (`"tensorboard"`, `"all"`, ...), or None for none.
        cpu: True runs on the CPU; None or False uses the accelerator when there is one. A multi-process launch
            on a machine without one always forms a CPU (gloo) group.
        seed: when given, `accelerate.utils.set_seed(seed)` (Python, numpy and torch on every process).
        accelerator_kwargs: passed on (`gradient_accumulation_steps`, `dataloader_config`, ...).

    Raises:
        RuntimeError: the launcher started more processes than the group accelerate formed (each would train its
            own copy into the same folder).
    """
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed

    folder = run_folder(output_dir)
    project = ProjectConfiguration(project_dir=str(folder), logging_dir=str(folder / LOGS_FOLDER))
    accelerator = Accelerator(
        mixed_precision=mixed_precision,
        log_with=log_with,
        cpu=bool(cpu) or distributed_without_accelerator(),
        project_config=project,
        **accelerator_kwargs,
    )
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        raise RuntimeError(
            f"{launched} processes were launched but accelerate formed a group of {accelerator.num_processes}; each "
            "would train its own copy into the same folder. On CPU-only machines launch with `accelerate launch "
            "--multi_gpu --num_processes N` or `torchrun --nproc_per_node N` (accelerate's `--cpu` runs one process "
            "unless it is given an MPI host file)."
        )
    if seed is not None:
        set_seed(int(seed))
    return accelerator


def release_accelerator() -> None:
    """Forget accelerate's process-wide settings after a job, so the same process can run another one.

    accelerate keeps one `AcceleratorState` / `GradientState` per process and refuses a later `Accelerator` with
    other settings (mixed precision, CPU, ...); both are reset here. The process group (`PartialState`) is kept:
    a launched group stays formed for the next job.
    """
    from accelerate.state import AcceleratorState, GradientState

    for state in (AcceleratorState, GradientState):
        if hasattr(state, "_reset_state"):
            state._reset_state()


def epoch_batches(accelerator, dataloader, epoch: int, done: int = 0) -> Iterable:
    """The batches of `epoch` still to run: the prepared `dataloader` reshuffled for that epoch, its first `done`
    batches skipped (`accelerator.skip_first_batches`), so a resumed run sees what an unbroken one would."""
    if hasattr(dataloader, "set_epoch"):
        # A prepared loader re-seeds its sampler from its own epoch counter on every pass: set it, not the sampler.
        dataloader.set_epoch(int(epoch))
    return accelerator.skip_first_batches(dataloader, int(done)) if done else dataloader


# --------------------------------------------------------------------------------------------------
# Progress objects
# --------------------------------------------------------------------------------------------------
class StateDictDataclass:
    """Mixin giving a dataclass `state_dict()` / `load_state_dict()`, so that an instance can be registered with
    `accelerator.register_for_checkpointing` and is saved and restored with every checkpoint.

    Example:
        >>> @dataclasses.dataclass
        ... class Progress(StateDictDataclass):
        ...     global_step: int = 0
        ...     losses: list = dataclasses.field(default_factory=list)

    Keys unknown to the dataclass (a checkpoint of an older or newer version) are ignored; fields missing from
    the state keep their current values.
    """

    def state_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        known = {item.name for item in dataclasses.fields(self)}
        for name, value in state.items():
            if name in known:
                setattr(self, name, value)


# --------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------
def run_folder(output_dir: PathLike) -> Path:
    """`OUTPUT_DIR-run`: the folder beside the output folder that holds the run's checkpoints and logs."""
    output_dir = Path(output_dir)
    if output_dir.name in ("", ".", ".."):
        output_dir = output_dir.resolve()
    return output_dir.with_name(output_dir.name + RUN_FOLDER_SUFFIX)


def checkpoints_root(output_dir: PathLike) -> Path:
    """`OUTPUT_DIR-run/checkpoints`."""
    return run_folder(output_dir) / CHECKPOINTS_FOLDER


def checkpoint_path(output_dir: PathLike, step: int) -> Path:
    """`OUTPUT_DIR-run/checkpoints/checkpoint_<step:08d>`."""
    return checkpoints_root(output_dir) / f"{CHECKPOINT_PREFIX}{int(step):08d}"


def checkpoint_step(checkpoint: PathLike) -> int:
    """The step in a checkpoint folder's name (`checkpoint_00000300` -> 300)."""
    match = _CHECKPOINT_NAME.match(Path(checkpoint).name)
    if match is None:
        raise ValueError(f"{checkpoint} is not named {CHECKPOINT_PREFIX}<step>")
    return int(match.group(1))


def is_complete_checkpoint(path: PathLike) -> bool:
    """A folder written by `save_state` to the end: not a temporary name, and holding accelerate's RNG state."""
    path = Path(path)
    return path.is_dir() and not path.name.startswith(".") and (path / _ALWAYS_SAVED).is_file()


def list_checkpoints(output_dir: PathLike) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = checkpoints_root(output_dir)
    if not root.is_dir():
        return []
    found = [path for path in root.iterdir() if _CHECKPOINT_NAME.match(path.name) and is_complete_checkpoint(path)]
    return sorted(found, key=checkpoint_step)


def resolve_resume_checkpoint(resume_from_checkpoint: str | None, output_dir: PathLike) -> Path | None:
    """The checkpoint to resume from.

    Args:
        resume_from_checkpoint: None (start afresh), "latest" (the newest complete checkpoint of `output_dir`, or
            None when there is none yet) or the path of a checkpoint folder.

    Raises:
        SourceNotFoundError: the path is not a complete checkpoint.
    """
    if not resume_from_checkpoint:
        return None
    if resume_from_checkpoint == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            logger.info("No checkpoint in %s yet: starting from scratch.", checkpoints_root(output_dir))
        return found[-1] if found else None
    path = Path(resume_from_checkpoint).expanduser()
    if not is_complete_checkpoint(path):
        raise SourceNotFoundError(
            f"not found: {resume_from_checkpoint} (no complete checkpoint there; pass 'latest' or a "
            f"{CHECKPOINT_PREFIX}<step> folder under {checkpoints_root(output_dir)})"
        )
    return path


def _remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def save_checkpoint(
    accelerator, output_dir: PathLike, step: int, total_limit: int | None = DEFAULT_CHECKPOINTS_TOTAL_LIMIT
) -> Path:
    """Save everything accelerate tracks (prepared models, optimizers, schedulers, dataloaders, the RNG states of
    every process, and what was registered with `accelerator.register_for_checkpointing`) as
    `OUTPUT_DIR-run/checkpoints/checkpoint_<step:08d>`, complete or not at all; then keep the newest `total_limit`
    checkpoints (None or 0 keeps all). Every process must call it.
    """
    final = checkpoint_path(output_dir, step)
    temporary = final.with_name(f"{_TEMPORARY_PREFIX}{final.name}")
    if accelerator.is_main_process:
        final.parent.mkdir(parents=True, exist_ok=True)
        _remove_tree(temporary)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(temporary))
    except BaseException:
        if accelerator.is_main_process:
            _remove_tree(temporary)
        raise
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():  # the same step saved by an earlier run into this folder: swap, never leave it half-way
            replaced = final.with_name(f"{_REPLACED_PREFIX}{final.name}")
            _remove_tree(replaced)
            os.replace(final, replaced)
            os.replace(temporary, final)
            _remove_tree(replaced)
        else:
            os.replace(temporary, final)
        if total_limit:
            for old in list_checkpoints(output_dir)[: -int(total_limit)]:
                _remove_tree(old)
        logger.info("Saved checkpoint %s", final)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, checkpoint: PathLike) -> None:
    """Restore a checkpoint written by :func:`save_checkpoint` into the prepared objects and the registered ones
    (register them first, in the order they were registered when saving).

    Raises:
        SourceNotFoundError: `checkpoint` is not a complete checkpoint.
    """
    if not is_complete_checkpoint(checkpoint):
        raise SourceNotFoundError(f"not found: {checkpoint} (no complete checkpoint there)")
    logger.info("Resuming from %s", checkpoint)
    accelerator.load_state(str(checkpoint))


def remove_incomplete_checkpoints(output_dir: PathLike) -> None:
    """Delete the temporary folders a run killed while saving may have left in `OUTPUT_DIR-run/checkpoints`
    (call it on the main process only, before training starts)."""
    root = checkpoints_root(output_dir)
    if root.is_dir():
        for path in root.iterdir():
            if path.is_dir() and path.name.startswith((_TEMPORARY_PREFIX, _REPLACED_PREFIX)):
                _remove_tree(path)
