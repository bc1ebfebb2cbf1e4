"""The options every Accelerate job of the project shares, under the names of transformers'
`examples/pytorch/*_no_trainer.py` scripts (`--per_device_train_batch_size`, `--num_train_epochs`,
`--max_train_steps`, `--checkpointing_steps`, ...) and of `TrainingArguments` where those scripts have none
(`--hub_private_repo`, `--dataloader_num_workers`).

A job's options subclass :class:`RunArguments`, add their own fields and may redefine a shared field to change its
default (the distillation trains 15 epochs at 1e-4, the linear segmentation probe 50 at 1e-3):

    @dataclass
    class DistillationArguments(RunArguments):
        teacher: str = field(default="facebook/dinov2-with-registers-small", metadata={"help": "..."})
        num_train_epochs: int = field(default=15, metadata={"help": "epochs"})
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from alibi_dinov2.errors import InputError
from alibi_dinov2.training.runs import DEFAULT_CHECKPOINTS_TOTAL_LIMIT


def parse_checkpointing_steps(value) -> int | str | None:
    """`--checkpointing_steps`: None, a positive number of optimiser steps, or `"epoch"` (the end of every epoch).

    Raises:
        InputError: anything else.
    """
    if value is None or value == "epoch":
        return value
    try:
        steps = int(value)
    except (TypeError, ValueError):
        steps = 0
    if steps < 1 or str(value).strip() not in (str(steps), f"{steps}.0"):
        raise InputError(f"--checkpointing_steps must be a positive integer or `epoch`; got {value!r}")
    return steps


@dataclass
class RunArguments:
    """Options of one Accelerate run: optimisation, precision, checkpoints, tracking and the Hub."""

    output_dir: str | None = field(default=None, metadata={"help": "folder of the run's results"})
    seed: int = field(default=42, metadata={"help": "seed of the weights' RNG, shuffling and data order"})
    # Optimisation
    per_device_train_batch_size: int = field(default=32, metadata={"help": "training images per device and batch"})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "batches per optimiser step"})
    num_train_epochs: int = field(default=15, metadata={"help": "training epochs"})
    max_train_steps: int | None = field(
        default=None, metadata={"help": "total optimiser steps; overrides --num_train_epochs"}
    )
    learning_rate: float = field(default=1e-4, metadata={"help": "AdamW learning rate"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay"})
    max_train_samples: int | None = field(
        default=None, metadata={"help": "use only the first N training samples (quick runs)"}
    )
    # Devices
    mixed_precision: Literal["no", "fp16", "bf16"] | None = field(
        default=None,
        metadata={"help": "accelerate's mixed precision (None: the `accelerate launch` / accelerate config setting)"},
    )
    cpu: bool = field(default=False, metadata={"help": "run on the CPU even when a GPU is available"})
    num_processes: int | None = field(
        default=None,
        metadata={"help": "processes to run (one per GPU; without GPUs, CPU processes in one group): above 1 the "
                  "command starts them through accelerate's launcher. None: this process alone, or those an "
                  "`accelerate launch` started"},
    )
    dataloader_num_workers: int | None = field(
        default=None,
        metadata={"help": "DataLoader worker processes per process (None: 4, capped by the CPUs of each process)"},
    )
    # Checkpoints
    checkpointing_steps: str | None = field(
        default=None,
        metadata={"help": "save the training state every N optimiser steps, or at the end of every `epoch`, into "
                  "OUTPUT_DIR-run/checkpoints/checkpoint_<step> (beside the output folder, which holds the results "
                  "only; the tracker logs go to OUTPUT_DIR-run/logs)"},
    )
    checkpoints_total_limit: int | None = field(
        default=DEFAULT_CHECKPOINTS_TOTAL_LIMIT, metadata={"help": "keep only the newest N checkpoints (null in a "
                                                                   "config file: all)"}
    )
    resume_from_checkpoint: str | None = field(
        default=None,
        metadata={"help": "continue from a checkpoint folder, or `latest` for the newest one of --output_dir (a "
                  "fresh start when there is none)"},
    )
    # Tracking and the Hub
    report_to: str = field(
        default="tensorboard", metadata={"help": "accelerate tracker(s): tensorboard, wandb, all, or none"}
    )
    logging_steps: int = field(default=10, metadata={"help": "log the loss and the learning rate every N steps"})
    push_to_hub: bool = field(default=False, metadata={"help": "upload the run's results to the Hub at the end"})
    hub_model_id: str | None = field(
        default=None, metadata={"help": "Hub repository of --push_to_hub (None: the name of --output_dir)"}
    )
    hub_private_repo: bool = field(default=False, metadata={"help": "create the --push_to_hub repository as private"})
    strict: bool = field(
        default=False, metadata={"help": "fail on the first unreadable or too-small image instead of skipping it"}
    )

    def __post_init__(self) -> None:
        self.checkpointing_steps = parse_checkpointing_steps(self.checkpointing_steps)
        for name in ("per_device_train_batch_size", "gradient_accumulation_steps", "num_train_epochs"):
            if getattr(self, name) < 1:
                raise InputError(f"--{name} must be a positive integer; got {getattr(self, name)}")
        for name in ("max_train_steps", "max_train_samples", "checkpoints_total_limit", "logging_steps",
                     "num_processes"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise InputError(f"--{name} must be a positive integer (or left unset); got {value}")
        for name in ("weight_decay", "dataloader_num_workers"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise InputError(f"--{name} must be >= 0; got {value}")
        if self.mixed_precision not in (None, "no", "fp16", "bf16"):
            raise InputError(f"--mixed_precision must be no, fp16 or bf16 (or unset); got {self.mixed_precision!r}")
        if not self.learning_rate > 0:
            raise InputError(f"--learning_rate must be positive; got {self.learning_rate}")
        resume = self.resume_from_checkpoint
        if resume and resume != "latest" and not Path(resume).is_dir():
            raise InputError(f"--resume_from_checkpoint {resume} is not a folder (or use `latest`)")
        if self.push_to_hub and not self.hub_model_id and self.output_dir:
            self.hub_model_id = Path(self.output_dir).resolve().name
        self.report_to = (self.report_to or "none").strip()

    @property
    def trackers(self) -> str | None:
        """`report_to` as accelerate's `log_with` (None for `none`)."""
        return None if self.report_to == "none" else self.report_to
