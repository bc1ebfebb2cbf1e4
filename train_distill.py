# Copyright 2026 The alibi-dinov2 authors. Licensed under the Apache License, Version 2.0.
"""Retrofit DINOv2 into ALiBi-DINOv2 (or DINOv3 into ALiBi-DINOv3) by distillation from the stock checkpoint.

The teacher is the stock model (learned absolute position embedding, or DINOv3's RoPE; frozen). The student is the
teacher converted by `convert_checkpoint.py`, of the architecture the teacher's checkpoint names: the same weights
with the position embedding (or RoPE) removed and the 2D ALiBi bias added (`--variant alibi`) or with no position
information at all (`--variant nope`), and learns to reproduce the teacher's final-normed patch tokens:

    loss = mean over images and patch tokens of (1 - cos(student_token, teacher_token))

The teacher's most positional output channels can be blanked (set to 0) in the target only (`--blank_channels`),
so that the student is not asked to re-create the positional ramps it is meant to lose.

    # Stage 1 (224 px) then stage 2 (518 px) of the reference recipe, ViT-S/14 with registers on COCO, 8 GPUs
    python train_distill.py configs/distill_stage1_224.json --num_processes 8
    python train_distill.py configs/distill_stage2_518.json --num_processes 8

    # Any flag after the config file overrides it
    python train_distill.py configs/distill_stage1_224.json --train_dir /data/coco/train2017 --dataset_name ""

    # A DINOv3 teacher gives an ALiBi-DINOv3 student
    python train_distill.py --teacher facebook/dinov3-vits16plus-pretrain-lvd1689m --train_dir images/ \\
        --output_dir outputs/alibi-dinov3 --image_size 224

    # A folder of micrographs, targets cached on disk, resumable
    python train_distill.py --train_dir images/ --output_dir outputs/alibi-micro --image_size 224 \\
        --cache_teacher_embeddings outputs/teacher-cache --checkpointing_steps 500 --resume_from_checkpoint latest

The final model is written to `--output_dir` as a remote-code folder (`AutoModel.from_pretrained(folder,
trust_remote_code=True)`) with a model card that records the hyperparameters and the last positional-probe scores,
next to `train_summary.json`, and nothing else: checkpoints (`OUTPUT_DIR-run/checkpoints/checkpoint_<step>`, the
newest `--checkpoints_total_limit` kept) and tracker logs (`OUTPUT_DIR-run/logs/`) live in the run folder beside it.

This script holds the options and the entry point; the run lives in `alibi_dinov2.training` (`data`: the images,
`targets`: the teacher targets and their cache, `objective`: loss and roll, `students`: the two models,
`distillation`: the run itself) and the positional probe it reports in `evaluation.distillation_probe`.
"""

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from alibi_dinov2.cli import CONFIG_SUFFIXES, ArgumentParser, run_command
from alibi_dinov2.errors import InputError
from alibi_dinov2.io.images import IMAGE_SUFFIXES
from alibi_dinov2.training import distillation
from alibi_dinov2.training.arguments import RunArguments
from alibi_dinov2.training.distillation import AUTO_BLANK_CHANNEL_COUNT, TrainingResult
from alibi_dinov2.training.launch import launch, needs_launch
from evaluation.distillation_probe import DistillationProbe


DEFAULT_TEACHER = "facebook/dinov2-with-registers-small"


# ---------------------------------------------------------------------------------------------------------------------
# Options
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class DistillationArguments(RunArguments):
    """Every option of a distillation run; `--help` lists them: the shared run options of
    :class:`~alibi_dinov2.training.arguments.RunArguments` (batch size, epochs, steps, precision, checkpoints,
    tracking, the Hub) and the distillation's own. `__post_init__` checks the values (each error names its option)
    and fills the derived ones, whether they come from the command line or from Python."""

    # Models
    teacher: str = field(
        default=DEFAULT_TEACHER,
        metadata={"help": "teacher: a Hub id, a transformers DINOv2 or DINOv3 folder, a Meta (DINOv2 or dinov3) "
                  ".pth or a timm .pth, read with convert_checkpoint.py and reproduced exactly; a DINOv3 teacher "
                  "gives an ALiBi-DINOv3 student"},
    )
    variant: Literal["alibi", "nope"] = field(
        default="alibi",
        metadata={"help": "student position scheme: 2D ALiBi bias, or no position information (NoPE baseline)"},
    )
    init_from: str | None = field(
        default=None,
        metadata={"help": "start the student from this model (e.g. the stage-1 output folder) instead of the "
                  "teacher's weights"},
    )
    # Data
    train_dir: str | None = field(
        default=None,
        metadata={"help": "folder of training images, searched recursively (" + ", ".join(IMAGE_SUFFIXES) + ")"},
    )
    dataset_name: str | None = field(
        default=None, metadata={"help": "Hub dataset of training images (instead of --train_dir)"}
    )
    dataset_config_name: str | None = field(
        default=None, metadata={"help": "configuration (subset) of --dataset_name"}
    )
    train_split: str = field(default="train", metadata={"help": "split of --dataset_name"})
    image_column: str | None = field(
        default=None, metadata={"help": "column of --dataset_name holding the images (None: its first image column)"}
    )
    streaming: bool = field(
        default=False,
        metadata={"help": "stream --dataset_name instead of downloading it first (needs --max_train_steps)"},
    )
    image_size: int = field(
        default=224,
        metadata={"help": "shortest side resized to this, then centre-cropped to a square of this size"},
    )
    # Distillation target
    blank_channels: list[str] = field(
        default_factory=list,
        metadata={"help": "teacher output channels set to 0 in the target only: channel indices, `auto` (the "
                  f"{AUTO_BLANK_CHANNEL_COUNT} most positional channels found with the per-channel probe on the "
                  "held-out images) or `none`"},
    )
    loss: Literal["cosine", "mse"] = field(
        default="cosine", metadata={"help": "1 - cosine per patch token, or squared error"}
    )
    random_roll: bool = field(
        default=False,
        metadata={"help": "roll each image and its target by the same random whole number of patches (image_size "
                  "must be a multiple of the patch size)"},
    )
    cache_teacher_embeddings: str | None = field(
        default=None,
        metadata={"help": "compute the teacher targets once and keep them in this folder (float16, keyed by a hash "
                  "of the preprocessed image and the teacher), reused across epochs and runs"},
    )
    # Optimisation (beside the shared options)
    lr_scheduler: Literal["constant", "constant_with_warmup", "cosine", "linear"] = field(
        default="constant", metadata={"help": "learning-rate schedule (constant, as the paper)"}
    )
    num_warmup_steps: int = field(default=0, metadata={"help": "warm-up steps"})
    # Positional probe
    probe_dir: str | None = field(
        default=None, metadata={"help": "held-out images for the probe metric and `--blank_channels auto`"}
    )
    num_probe_images: int = field(
        default=8,
        metadata={"help": "without --probe_dir: hold out this many training images for the probe (0: no probe)"},
    )
    probe_every_n_steps: int = field(default=500, metadata={"help": "probe the student every N steps"})
    probe_image_size: int = field(
        default=448,
        metadata={"help": "probe images are resized and centre-cropped to this size, so that the grid holds enough "
                  "patches for the sparse probe"},
    )
    # The config file the options came from (set by `parse_args`; not an option itself).
    config: str | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check_sources()
        self._check_numbers()
        self.blank_channels = _blank_channel_list(self.blank_channels)
        if self.blank_channels == "auto" and not self.probe_dir and self.num_probe_images == 0:
            raise InputError(
                "--blank_channels auto ranks channels on held-out images: give --probe_dir or --num_probe_images > 0"
            )

    def _check_sources(self) -> None:
        if not self.output_dir:
            raise InputError("--output_dir is required: the folder of the final model (checkpoints and logs go to "
                             "OUTPUT_DIR-run beside it)")
        self.dataset_name = self.dataset_name or None  # `--dataset_name ""` undoes a config file's dataset
        self.train_dir = self.train_dir or None
        if bool(self.train_dir) == bool(self.dataset_name):
            raise InputError(
                "give the training images with exactly one of --train_dir FOLDER or --dataset_name HUB_DATASET"
                + (" (both were given)" if self.train_dir else " (neither was given)")
            )
        for name in ("train_dir", "probe_dir"):
            folder = getattr(self, name)
            if folder and not Path(folder).is_dir():
                raise InputError(f"--{name} {folder} is not a folder")
        if self.streaming and not self.dataset_name:
            raise InputError("--streaming applies to --dataset_name only")
        if self.streaming and not self.max_train_steps:
            raise InputError("--streaming needs --max_train_steps: a streamed dataset has no known length")

    def _check_numbers(self) -> None:
        for name in ("image_size", "probe_every_n_steps", "probe_image_size"):
            if getattr(self, name) < 1:
                raise InputError(f"--{name} must be a positive integer; got {getattr(self, name)}")
        for name in ("num_probe_images", "num_warmup_steps"):
            if getattr(self, name) < 0:
                raise InputError(f"--{name} must be >= 0; got {getattr(self, name)}")


def _blank_channel_list(values) -> list[int] | str:
    """`--blank_channels`: a sorted list of distinct channel indices, or "auto"."""
    values = [values] if isinstance(values, (str, int)) else list(values or [])
    words = [str(value).strip().lower() for value in values]
    if words in ([], ["none"]):
        return []
    if words == ["auto"]:
        return "auto"
    try:
        channels = [int(word) for word in words]
    except ValueError:
        raise InputError(
            f"--blank_channels takes channel indices, `auto` or `none`; got {' '.join(map(str, values))!r}"
        ) from None
    if any(channel < 0 for channel in channels) or len(set(channels)) != len(channels):
        raise InputError(f"--blank_channels must be distinct non-negative channel indices; got {channels}")
    return sorted(channels)


def build_parser() -> ArgumentParser:
    """The command-line parser over [`DistillationArguments`]."""
    return ArgumentParser(DistillationArguments, prog="train_distill.py", description=__doc__)


def parse_args(argv=None) -> DistillationArguments:
    """Parse command-line tokens (`None`: `sys.argv[1:]`), a config file first if given; exits with status 2 and
    a message naming the option on a bad value."""
    argv = list(sys.argv[1:] if argv is None else argv)
    (args,) = build_parser().parse(argv)
    if argv and not argv[0].startswith("-") and argv[0].lower().endswith(CONFIG_SUFFIXES):
        args.config = argv[0]
    return args


# ---------------------------------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------------------------------


def train(args: DistillationArguments) -> TrainingResult:
    """Run the distillation described by `args`, with the evaluation package's positional probe on the held-out
    images. accelerate's settings are released afterwards (even after an error), so that the same process can run
    another stage."""
    return distillation.train(args, monitor=DistillationProbe())


def main(argv=None) -> TrainingResult | None:
    """Run the distillation described by the command-line tokens `argv` (`None`: `sys.argv[1:]`); with
    `--num_processes N` above 1, in N processes started here (then None: the results are in `--output_dir`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if needs_launch(args.num_processes):
        return launch("alibi-distill", argv, args.num_processes, args.mixed_precision)
    return train(args)


if __name__ == "__main__":
    run_command(main)
