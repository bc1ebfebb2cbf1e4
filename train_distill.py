# Copyright 2026 The alibi-dinov2 authors. Licensed under the Apache License, Version 2.0.
"""Retrofit DINOv2 into ALiBi-DINOv2 (or DINOv3 into ALiBi-DINOv3) by distillation from the stock checkpoint.

The teacher is the stock model (learned absolute position embedding, or DINOv3's RoPE; frozen). The student is the
teacher converted by `convert_checkpoint.py`, of the architecture the teacher's checkpoint names: the same weights
with the position embedding (or RoPE) removed and the 2D ALiBi bias added (`--variant alibi`) or with no position
information at all (`--variant nope`), and learns to reproduce the teacher's final-normed patch tokens:

    loss = mean over images and patch tokens of (1 - cos(student_token, teacher_token))

The teacher's most positional output channels can be blanked (set to 0) in the target only (`--blank_channels`),
so that the student is not asked to re-create the positional ramps it is meant to lose.

    # Stage 1 (224 px) then stage 2 (518 px) of the reference recipe, ViT-S/14 with registers on COCO
    accelerate launch train_distill.py configs/distill_stage1_224.json
    accelerate launch train_distill.py configs/distill_stage2_518.json

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
next to `train_summary.json`. Checkpoints (`checkpoints/checkpoint_<step>`) and tracker logs (`logs/`) live in the
same folder.

The script reads top to bottom: options, images, teacher targets, loss, probes, models, then the run itself
(`prepare_run` builds a `DistillationRun` that every training step receives, `train` loops over the epochs).
"""

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from alibi_dinov2.cli import CONFIG_SUFFIXES, ArgumentParser, default_num_workers, run_command
from alibi_dinov2.errors import InputError
from alibi_dinov2.hub.sources import check_model_source
from alibi_dinov2.features.extraction import patch_size_of, prefix_token_count
from alibi_dinov2.io.files import write_json_atomic
from alibi_dinov2.io.images import IMAGE_SUFFIXES, ImageReadError, SkippedInputs, check_image_size, describe_source, list_image_files, read_rgb01
from alibi_dinov2.features.preprocessing import normalize, resize_and_crop
from alibi_dinov2.training.runs import StateDictDataclass, epoch_batches, load_checkpoint, make_accelerator, release_accelerator, remove_incomplete_checkpoints, resolve_resume_checkpoint, save_checkpoint
from alibi_dinov2.hub.push import push_to_hub
from alibi_dinov2.conversion.convert import convert, save_model_folder


logger = logging.getLogger(__name__)

DEFAULT_TEACHER = "facebook/dinov2-with-registers-small"
LOSSES = ("cosine", "mse")

# `--blank_channels auto`: this many channels, ranked by their best per-channel R^2 over these ramps.
AUTO_BLANK_CHANNEL_COUNT = 4
CHANNEL_PROBE_RAMPS = ("lr", "ud", "radial")
# Positional probe protocol (paper Tables 1-2): step 6, random sampling, Ridge alpha 1, R^2 over all patches;
# 6 samplings per image, with fixed seeds so that successive evaluations differ only through the model.
PROBE_RAMP = "lr+ud"
PROBE_STEP = 6
PROBE_REPEATS = 6

TRACKER_PROJECT = "train_distill"
SUMMARY_FILE = "train_summary.json"
# New teacher targets are written to disk once this many bytes are pending (one shard file per flush).
CACHE_SHARD_BYTES = 256 * 2**20
CONTENT_KEY_BYTES = 16
# Why an image was skipped travels with its (placeholder) sample, as UTF-8 bytes, from the loader to the loop.
ERROR_MESSAGE_BYTES = 256


# ---------------------------------------------------------------------------------------------------------------------
# Options
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class DistillationArguments:
    """Every option of a distillation run; `--help` lists them. `__post_init__` checks the values (each error
    names its option) and fills the derived ones, whether they come from the command line or from Python."""

    # Models
    teacher: str = field(
        default=DEFAULT_TEACHER,
        metadata={"help": "teacher: a Hub id, a transformers DINOv2 or DINOv3 folder, a Meta (DINOv2 or dinov3) .pth or "
                  "a timm .pth, read with convert_checkpoint.py and reproduced exactly; a DINOv3 teacher gives an "
                  "ALiBi-DINOv3 student"},
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
    dataset_config_name: str | None = field(default=None, metadata={"help": "configuration (subset) of --dataset_name"})
    train_split: str = field(default="train", metadata={"help": "split of --dataset_name"})
    image_column: str | None = field(
        default=None, metadata={"help": "column of --dataset_name holding the images (None: its first image column)"}
    )
    streaming: bool = field(
        default=False,
        metadata={"help": "stream --dataset_name instead of downloading it first (needs --max_train_steps)"},
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "train on at most this many images (for quick runs)"}
    )
    image_size: int = field(
        default=224,
        metadata={"help": "shortest side resized to this, then centre-cropped to a square of this size"},
    )
    dataloader_num_workers: int | None = field(
        default=None,
        metadata={"help": "decoding processes per device (None: 4); capped so that the workers of all processes "
                  "fit the available CPUs"},
    )
    strict: bool = field(
        default=False,
        metadata={"help": "fail on an unreadable or too small image instead of skipping it with a warning"},
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
    # Optimisation
    per_device_train_batch_size: int = field(default=32, metadata={"help": "images per device and batch"})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "batches per optimiser step"})
    num_train_epochs: int = field(default=15, metadata={"help": "epochs"})
    max_train_steps: int | None = field(
        default=None, metadata={"help": "total optimiser steps; overrides --num_train_epochs"}
    )
    learning_rate: float = field(default=1e-4, metadata={"help": "AdamW learning rate"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay"})
    lr_scheduler: Literal["constant", "constant_with_warmup", "cosine", "linear"] = field(
        default="constant", metadata={"help": "learning-rate schedule (constant, as the paper)"}
    )
    num_warmup_steps: int = field(default=0, metadata={"help": "warm-up steps"})
    mixed_precision: Literal["no", "fp16", "bf16"] | None = field(
        default=None,
        metadata={"help": "passed to accelerate's Accelerator (None: the `accelerate launch` / accelerate config "
                  "setting)"},
    )
    seed: int = field(default=42, metadata={"help": "seed of the weights' RNG, shuffling and rolls"})
    # Output and checkpoints
    output_dir: str | None = field(
        default=None, metadata={"help": "folder of the final model, train_summary.json, checkpoints and logs"}
    )
    checkpointing_steps: str | None = field(
        default=None,
        metadata={"help": "save the training state every N optimiser steps, or at the end of every `epoch`, into "
                  "OUTPUT_DIR/checkpoints/checkpoint_<step>"},
    )
    checkpoints_total_limit: int | None = field(
        default=None, metadata={"help": "keep only the newest N checkpoints (None: all)"}
    )
    resume_from_checkpoint: str | None = field(
        default=None,
        metadata={"help": "continue from a checkpoint folder, or `latest` for the newest one in --output_dir (a "
                  "fresh start when there is none)"},
    )
    report_to: str = field(
        default="tensorboard", metadata={"help": "accelerate tracker(s): tensorboard, wandb, all, or none"}
    )
    logging_steps: int = field(default=10, metadata={"help": "log loss, lr and throughput every N steps"})
    push_to_hub: bool = field(default=False, metadata={"help": "upload the final model folder to the Hub"})
    hub_model_id: str | None = field(
        default=None, metadata={"help": "Hub repository of --push_to_hub (None: the name of --output_dir)"}
    )
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
        self._check_sources()
        self._check_numbers()
        self.checkpointing_steps = _checkpointing_steps(self.checkpointing_steps)
        self.blank_channels = _blank_channel_list(self.blank_channels)
        if self.blank_channels == "auto" and not self.probe_dir and self.num_probe_images == 0:
            raise InputError(
                "--blank_channels auto ranks channels on held-out images: give --probe_dir or --num_probe_images > 0"
            )
        resume = self.resume_from_checkpoint
        if resume and resume != "latest" and not Path(resume).is_dir():
            raise InputError(f"--resume_from_checkpoint {resume} is not a folder (or use `latest`)")
        if self.push_to_hub and not self.hub_model_id:
            self.hub_model_id = Path(self.output_dir).resolve().name
        self.report_to = (self.report_to or "none").strip()

    def _check_sources(self) -> None:
        if not self.output_dir:
            raise InputError("--output_dir is required: the folder for the final model, checkpoints and logs")
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
        positive = ["image_size", "per_device_train_batch_size", "gradient_accumulation_steps", "num_train_epochs"]
        positive += ["logging_steps", "probe_every_n_steps", "probe_image_size"]
        positive_if_given = ["max_train_steps", "max_train_samples", "checkpoints_total_limit"]
        for name in positive + [name for name in positive_if_given if getattr(self, name) is not None]:
            if getattr(self, name) <= 0:
                raise InputError(f"--{name} must be a positive integer; got {getattr(self, name)}")
        for name in ("dataloader_num_workers", "num_probe_images", "num_warmup_steps"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise InputError(f"--{name} must be >= 0; got {getattr(self, name)}")
        if not self.learning_rate > 0:
            raise InputError(f"--learning_rate must be > 0; got {self.learning_rate}")
        if self.weight_decay < 0:
            raise InputError(f"--weight_decay must be >= 0; got {self.weight_decay}")


def _checkpointing_steps(value) -> int | str | None:
    """`--checkpointing_steps`: None, a positive number of steps, or "epoch"."""
    if value is None or value == "epoch":
        return value
    text = str(value)
    if text.isdigit() and int(text) > 0:
        return int(text)
    raise InputError(f"--checkpointing_steps must be a positive integer or `epoch`; got {text!r}")


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
# Images
# ---------------------------------------------------------------------------------------------------------------------


def read_checked_image(source, patch_size: int = 1, name: str | None = None) -> np.ndarray:
    """Any image source as `(H, W, 3)` RGB in [0, 1] (the project's image policy, `alibi_dinov2.io.images`).

    Raises:
        ImageReadError: unreadable, or smaller than one `patch_size` patch (`ImageTooSmallError`); the message
            starts with the image's name.
    """
    rgb = read_rgb01(source)
    check_image_size(rgb, patch_size, name or describe_source(source))
    return rgb


def preprocess_image(source, image_size: int, patch_size: int = 1) -> torch.Tensor:
    """Decode, resize the shortest side to `image_size`, centre-crop and normalise: `(3, image_size, image_size)`."""
    rgb = read_checked_image(source, patch_size)
    return normalize(resize_and_crop(rgb, image_size, mode="center_crop"))


def content_key(pixel_values: torch.Tensor) -> bytes:
    """Hash of a preprocessed image, the key of its cached teacher target (16 bytes)."""
    data = pixel_values.detach().cpu().contiguous().numpy().tobytes()
    return hashlib.blake2b(data, digest_size=CONTENT_KEY_BYTES).digest()


def encode_message(text: str) -> torch.Tensor:
    """`(ERROR_MESSAGE_BYTES,)` uint8: `text` as UTF-8, cut and zero-padded (a collatable string)."""
    data = text.encode("utf-8")[:ERROR_MESSAGE_BYTES]
    encoded = torch.zeros(ERROR_MESSAGE_BYTES, dtype=torch.uint8)
    if data:
        encoded[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return encoded


def decode_message(encoded: torch.Tensor) -> str:
    return bytes(encoded.cpu().tolist()).rstrip(b"\0").decode("utf-8", errors="replace")


def describe_record(source, index: int | None = None) -> str:
    """A readable name for an image record: its path when known, else its index."""
    if isinstance(source, (str, os.PathLike)) or (isinstance(source, dict) and source.get("path")):
        return describe_source(source)
    return f"item {index}"


# ---------------------------------------------------------------------------------------------------------------------
# Datasets
# ---------------------------------------------------------------------------------------------------------------------


class _TrainingSamples:
    """What both training datasets share: one record -> one sample dict.

    A sample holds `pixel_values` `(3, S, S)` normalised, `valid` (False for an unreadable or too small image,
    whose pixels are zeros and whose loss weight is 0, so that batch shapes and the step count never change),
    `index` (position in the dataset, or a stable id when streaming), `key` `(16,)` uint8 (content hash, zeros
    unless `with_keys`) and `error` (why the image was skipped, see [`encode_message`]; zeros when valid).
    """

    def __init__(self, records, image_column: str, image_size: int, patch_size: int = 1, with_keys=False) -> None:
        self.records = records
        self.image_column = image_column
        self.image_size = image_size
        self.patch_size = patch_size
        self.with_keys = with_keys

    def make_sample(self, source, sample_id: int) -> dict:
        try:
            pixel_values, error = preprocess_image(source, self.image_size, self.patch_size), ""
        except (ImageReadError, FileNotFoundError) as problem:
            pixel_values, error = torch.zeros(3, self.image_size, self.image_size), str(problem)
        valid = not error
        key = torch.zeros(CONTENT_KEY_BYTES, dtype=torch.uint8)
        if self.with_keys and valid:
            key = torch.frombuffer(bytearray(content_key(pixel_values)), dtype=torch.uint8)
        return {
            "pixel_values": pixel_values,
            "valid": torch.tensor(valid),
            "index": torch.tensor(sample_id, dtype=torch.int64),
            "key": key,
            "error": encode_message(error),
        }


class DistillationImages(_TrainingSamples, torch.utils.data.Dataset):
    """Map-style training images (a `datasets.Dataset` of undecoded images); items as in `_TrainingSamples`."""

    def __len__(self) -> int:
        return len(self.records)

    def describe(self, index: int) -> str:
        return describe_record(self.records[int(index)][self.image_column], int(index))

    def __getitem__(self, index: int) -> dict:
        return self.make_sample(self.records[int(index)][self.image_column], int(index))


def _stream_sample_id(source) -> int:
    """A stable 63-bit id for a streamed record (there is no index), from its path or its bytes."""
    if isinstance(source, dict):
        seed = (source.get("path") or "").encode() or (source.get("bytes") or b"")[: 1 << 20]
    elif isinstance(source, (str, os.PathLike)):
        seed = str(source).encode()
    else:
        seed = repr(source)[:4096].encode()
    return int.from_bytes(hashlib.blake2b(seed, digest_size=8).digest(), "little") >> 1


class StreamingDistillationImages(_TrainingSamples, torch.utils.data.IterableDataset):
    """Streamed training images (a `datasets.IterableDataset`); `index` is a stable id derived from the record."""

    def describe(self, index: int) -> str:
        return f"streamed item {int(index)}"

    def set_epoch(self, epoch: int) -> None:
        self.records.set_epoch(epoch)  # reshuffles the shard order and the shuffle buffer per epoch

    def __iter__(self):
        for record in self.records:
            source = record[self.image_column]
            yield self.make_sample(source, _stream_sample_id(source))


def _image_column_of(dataset, requested: str | None) -> str:
    from datasets import Image

    columns = list(dataset.features or {}) if dataset.features is not None else []
    if requested:
        if columns and requested not in columns:
            raise InputError(
                f"--image_column {requested!r} is not a column of the dataset; columns: {', '.join(columns)}."
            )
        return requested
    for name, feature in (dataset.features or {}).items():
        if isinstance(feature, Image):
            return name
    for name in ("image", "img", "pixel_values"):
        if name in columns:
            return name
    raise InputError(f"No image column found among {', '.join(columns) or 'no columns'}; name it with --image_column.")


def load_image_records(args: DistillationArguments):
    """The training records and the image column.

    Returns:
        `(records, image_column)`: a `datasets.Dataset` (or `IterableDataset` with `--streaming`) whose image
        column holds undecoded images (file paths, or `{"bytes", "path"}` records), decoded later by the dataset so
        that one bad file is skipped instead of ending the run.
    """
    import datasets

    if args.train_dir:
        return datasets.Dataset.from_dict({"image": [str(p) for p in list_image_files(args.train_dir)]}), "image"
    records = datasets.load_dataset(
        args.dataset_name, args.dataset_config_name, split=args.train_split, streaming=args.streaming
    )
    image_column = _image_column_of(records, args.image_column)
    records = records.select_columns([image_column])  # annotations and captions are never decoded
    if isinstance(records.features.get(image_column) if records.features else None, datasets.Image):
        records = records.cast_column(image_column, datasets.Image(decode=False))
    return records, image_column


def split_probe_records(records, image_column: str, args: DistillationArguments):
    """Held-out probe images and the remaining training records.

    Returns:
        `(train_records, probe_sources)` where `probe_sources` is a list of `(name, source)`: from `--probe_dir`,
        or `--num_probe_images` training images chosen with the seed and removed from training.
    """
    if args.probe_dir:
        return records, [(str(path), str(path)) for path in list_image_files(args.probe_dir)]
    count = args.num_probe_images
    if count == 0:
        return records, []
    if args.streaming:
        held_out = list(records.take(count))
        sources = [(describe_record(r[image_column], i), r[image_column]) for i, r in enumerate(held_out)]
        return records.skip(count), sources
    if count >= len(records):
        raise InputError(
            f"--num_probe_images {count} would hold out all {len(records)} training images; lower it, or give "
            "--probe_dir."
        )
    order = np.random.default_rng(args.seed).permutation(len(records))
    held_out, kept = sorted(order[:count].tolist()), sorted(order[count:].tolist())
    sources = [(describe_record(records[i][image_column], i), records[i][image_column]) for i in held_out]
    return records.select(kept), sources


@dataclass
class ProbeImages:
    """Held-out images, decoded once.

    Attributes:
        names: one per readable image.
        pixel_values: `(K, 3, image_size, image_size)` normalised, for the patch cosine to the teacher.
        probe_rgb: K arrays `(P, P, 3)` float32 in [0, 1] at `--probe_image_size`, for the positional probes.
        skipped: names of unreadable (or too small) images.
    """

    names: list
    pixel_values: torch.Tensor
    probe_rgb: list
    skipped: list

    def __len__(self) -> int:
        return len(self.names)


def prepare_probe_images(
    sources, image_size: int, probe_image_size: int, patch_size: int = 1, strict: bool = False
) -> ProbeImages:
    """Decode the `(name, source)` probe images; unreadable ones are skipped with a warning (`strict`: raised)."""
    skipped = SkippedInputs(strict=strict, what="probe image")
    names, pixel_values, probe_rgb = [], [], []
    for name, source in sources:
        try:
            rgb = read_checked_image(source, patch_size, name)
        except (ImageReadError, FileNotFoundError) as error:
            skipped.add(name, error)
            continue
        names.append(name)
        pixel_values.append(normalize(resize_and_crop(rgb, image_size, mode="center_crop")))
        probe_rgb.append(resize_and_crop(rgb, probe_image_size, mode="center_crop").permute(1, 2, 0).numpy())
    skipped.summarise(total=len(sources))
    stacked = torch.stack(pixel_values) if pixel_values else torch.zeros(0, 3, image_size, image_size)
    return ProbeImages(names, stacked, probe_rgb, skipped.names)


# ---------------------------------------------------------------------------------------------------------------------
# Teacher targets
# ---------------------------------------------------------------------------------------------------------------------


def patch_tokens(model, pixel_values: torch.Tensor, num_prefix_tokens: int) -> torch.Tensor:
    """Final-normed patch tokens, CLS and registers dropped: `(B, 3, H, W)` -> `(B, h * w, C)`."""
    return model(pixel_values=pixel_values).last_hidden_state[:, num_prefix_tokens:]


@torch.no_grad()
def teacher_patch_targets(teacher, pixel_values: torch.Tensor, autocast=contextlib.nullcontext) -> torch.Tensor:
    """The teacher's final-normed patch tokens, `(B, h * w, C)` float32."""
    with autocast():
        tokens = patch_tokens(teacher, pixel_values, prefix_token_count(teacher))
    return tokens.float()


def blank_target_channels(targets: torch.Tensor, channels) -> torch.Tensor:
    """Set the listed channels of `(..., C)` targets to 0 (a copy; the teacher itself is untouched)."""
    if not len(channels):
        return targets
    targets = targets.clone()
    targets[..., list(channels)] = 0.0
    return targets


def teacher_fingerprint(teacher, image_size: int, mixed_precision: str) -> str:
    """Identifies what the cached targets depend on: every teacher weight, the input size and the precision."""
    digest = hashlib.sha256()
    for name, tensor in sorted(teacher.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    digest.update(json.dumps({"image_size": image_size, "mixed_precision": mixed_precision}).encode())
    return digest.hexdigest()[:20]


class TeacherTargetCache:
    """Teacher targets on disk, float16, one `(h * w, C)` tensor per image keyed by the hex content hash of the
    preprocessed image.

    Layout: `root/<teacher fingerprint>/targets-*.safetensors` shards plus an `info.json`. Every process writes
    its own shards (named with the process index and a random suffix), each written to a temporary name and
    renamed, so that a killed run leaves only complete shards. `refresh()` picks up shards written since (by this
    run's other processes or by other runs).
    """

    def __init__(self, root, fingerprint: str, info: dict | None = None, process_index: int = 0) -> None:
        self.directory = Path(root) / fingerprint
        self.directory.mkdir(parents=True, exist_ok=True)
        self.process_index = process_index
        self._index: dict[str, Path] = {}
        self._handles: dict[Path, object] = {}
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self.hits = 0
        self.computed = 0
        info_path = self.directory / "info.json"
        if info and not info_path.exists():
            write_json_atomic(info_path, info)
        self.refresh()

    def __len__(self) -> int:
        return len(self._index) + len(self._pending)

    def refresh(self) -> None:
        from safetensors import safe_open

        for path in sorted(self.directory.glob("targets-*.safetensors")):
            if path in self._handles:
                continue
            try:
                handle = safe_open(str(path), framework="pt", device="cpu")
            except Exception as error:  # a foreign or damaged file: ignore it rather than stop training
                logger.warning("Ignoring unreadable cache shard %s (%s)", path, error)
                continue
            self._handles[path] = handle
            for key in handle.keys():
                self._index.setdefault(key, path)

    def get(self, key: str) -> torch.Tensor | None:
        if key in self._pending:
            return self._pending[key]
        path = self._index.get(key)
        return None if path is None else self._handles[path].get_tensor(key)

    def put(self, key: str, target: torch.Tensor) -> None:
        if key in self._pending or key in self._index:
            return
        target = target.detach().to("cpu", torch.float16).contiguous().clone()
        self._pending[key] = target
        self._pending_bytes += target.numel() * target.element_size()
        if self._pending_bytes >= CACHE_SHARD_BYTES:
            self.flush()

    def flush(self) -> None:
        """Write the pending targets as one new shard."""
        if not self._pending:
            return
        from safetensors.torch import save_file

        name = f"targets-p{self.process_index}-{time.time_ns()}-{uuid.uuid4().hex[:8]}.safetensors"
        temporary = self.directory / f".{name}.tmp"
        save_file(self._pending, str(temporary))
        os.replace(temporary, self.directory / name)
        self._pending.clear()
        self._pending_bytes = 0
        self.refresh()


def batch_targets(
    teacher,
    pixel_values: torch.Tensor,
    valid: torch.Tensor | None = None,
    keys: torch.Tensor | None = None,
    cache: TeacherTargetCache | None = None,
    blank_channels=(),
    autocast=contextlib.nullcontext,
) -> torch.Tensor:
    """Distillation targets of a batch: the teacher's patch tokens with `blank_channels` zeroed.

    Args:
        pixel_values: `(B, 3, S, S)` normalised images.
        valid: `(B,)` bool; invalid images (unreadable files) get an all-zero target and no teacher pass.
        keys: `(B, 16)` uint8 content hashes, needed with `cache`.
        cache: when given, targets are read from it and only the missing ones are computed (and stored).
            Cached targets are float16: a target is then `teacher(x).half().float()`, whether it was just
            computed or read back, so that every epoch and run sees the same numbers.
    Returns:
        `(B, h * w, C)` float32 on the device of `pixel_values`.
    """
    if cache is None:
        targets = teacher_patch_targets(teacher, pixel_values, autocast)
        return blank_target_channels(targets, blank_channels)
    if keys is None:
        raise ValueError("batch_targets needs the images' content keys to use the cache.")
    batch_size = pixel_values.shape[0]
    valid_list = [True] * batch_size if valid is None else valid.cpu().tolist()
    hex_keys = [bytes(row).hex() for row in keys.cpu().numpy()]
    found = [cache.get(key) if ok else None for key, ok in zip(hex_keys, valid_list)]
    missing = [i for i in range(batch_size) if valid_list[i] and found[i] is None]
    if missing:
        computed = teacher_patch_targets(teacher, pixel_values[missing], autocast).half().cpu()
        for position, i in enumerate(missing):
            found[i] = computed[position]
            cache.put(hex_keys[i], computed[position])
        cache.computed += len(missing)
    cache.hits += sum(valid_list) - len(missing)
    reference = next((t for t in found if t is not None), None)
    if reference is None:  # nothing readable in this batch
        patch_size = patch_size_of(teacher)
        grid = (pixel_values.shape[-2] // patch_size) * (pixel_values.shape[-1] // patch_size)
        reference = torch.zeros(grid, teacher.config.hidden_size, dtype=torch.float16)
    stacked = torch.stack([t if t is not None else torch.zeros_like(reference) for t in found])
    targets = stacked.to(device=pixel_values.device, dtype=torch.float32, non_blocking=True)
    return blank_target_channels(targets, blank_channels)


# ---------------------------------------------------------------------------------------------------------------------
# Augmentation and loss
# ---------------------------------------------------------------------------------------------------------------------


def random_patch_shifts(batch_size: int, grid_size: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """`(B, 2)` int64 shifts `(dy, dx)` in whole patches, uniform over the grid."""
    height, width = grid_size
    dy = torch.randint(0, height, (batch_size,), generator=generator)
    dx = torch.randint(0, width, (batch_size,), generator=generator)
    return torch.stack((dy, dx), dim=1)


def roll_generator(seed: int, epoch: int, batch_index: int, process_index: int) -> torch.Generator:
    """A generator fixed by the position in training, so that a resumed run rolls exactly as an unbroken one."""
    entropy = np.random.SeedSequence([seed, epoch, batch_index, process_index]).generate_state(2)
    return torch.Generator().manual_seed(int(entropy[0]) << 32 | int(entropy[1]))


def roll_by_patches(
    pixel_values: torch.Tensor, targets: torch.Tensor, shifts: torch.Tensor, patch_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Roll each image and its target cyclically by the same whole number of patches.

    Args:
        pixel_values: `(B, 3, h * p, w * p)`.
        targets: `(B, h * w, C)` patch tokens in row-major order.
        shifts: `(B, 2)` `(dy, dx)` in patches.
    Returns:
        The rolled `(pixel_values, targets)`; the patch at grid position (y, x) moves to
        ((y + dy) mod h, (x + dx) mod w) in both.
    """
    batch_size, _, height, width = pixel_values.shape
    grid_height, grid_width = height // patch_size, width // patch_size
    if (grid_height * patch_size, grid_width * patch_size) != (height, width):
        raise ValueError(
            f"Rolling by patches needs image sides that are multiples of {patch_size}; got {height} x {width}."
        )
    grid_targets = targets.reshape(batch_size, grid_height, grid_width, -1)
    rolled_images, rolled_targets = [], []
    for i, (dy, dx) in enumerate(shifts.tolist()):
        rolled_images.append(torch.roll(pixel_values[i], (dy * patch_size, dx * patch_size), dims=(1, 2)))
        rolled_targets.append(torch.roll(grid_targets[i], (dy, dx), dims=(0, 1)))
    return torch.stack(rolled_images), torch.stack(rolled_targets).reshape_as(targets)


def distillation_loss(
    student_tokens: torch.Tensor,
    target_tokens: torch.Tensor,
    sample_mask: torch.Tensor | None = None,
    kind: str = "cosine",
) -> torch.Tensor:
    """Distillation loss between `(B, N, C)` token sets.

    `cosine`: 1 - cosine similarity over channels per token; `mse`: mean squared error over channels per token.
    Averaged over tokens, then over the images with `sample_mask` True (unreadable images weigh 0).
    """
    student_tokens, target_tokens = student_tokens.float(), target_tokens.float()
    if kind == "cosine":
        per_token = 1.0 - F.cosine_similarity(student_tokens, target_tokens, dim=-1, eps=1e-8)
    elif kind == "mse":
        per_token = (student_tokens - target_tokens).pow(2).mean(dim=-1)
    else:
        raise ValueError(f"Unknown loss {kind!r}; choose from {', '.join(LOSSES)}.")
    per_image = per_token.mean(dim=1)
    if sample_mask is None:
        return per_image.mean()
    weights = sample_mask.to(per_image.dtype)
    # With no readable image the loss is 0 but still depends on the parameters, so every process joins the
    # gradient all-reduce of a distributed step.
    return (per_image * weights).sum() / weights.sum().clamp_min(1.0)


# ---------------------------------------------------------------------------------------------------------------------
# Probes
# ---------------------------------------------------------------------------------------------------------------------


def _evaluation_modules():
    try:
        from evaluation import positional_probe
        from alibi_dinov2.features.extraction import extract_patch_features
    except ImportError as error:
        raise ImportError(
            f"The positional probe needs the train extra ({error}): `pip install -e '.[train]'`, or run with "
            "--num_probe_images 0 and an explicit --blank_channels list."
        ) from error
    return extract_patch_features, positional_probe


def rank_positional_channels(teacher, images) -> np.ndarray:
    """How positional each output channel of `teacher` is.

    Args:
        images: `(H, W, 3)` float arrays in [0, 1] (the calibration set).
    Returns:
        `(C,)`: per channel, the best per-channel probe R^2 over the lr, ud and radial ramps, averaged over images.
    """
    extract_patch_features, positional_probe = _evaluation_modules()
    scores = []
    for index, image in enumerate(images):
        features = extract_patch_features(teacher, image)  # (h, w, C)
        per_ramp = [
            positional_probe.per_channel_probe(
                features, ramp, step=PROBE_STEP, sampling="random", alpha=1.0, holdout=False, seed=index
            )
            for ramp in CHANNEL_PROBE_RAMPS
        ]
        scores.append(np.max(per_ramp, axis=0))
    return np.mean(scores, axis=0)


def positional_probe_r2(model, images) -> float:
    """Mean lr+ud positional-probe R^2 of `model`'s patch features over `images` ((H, W, 3) in [0, 1]) and
    `PROBE_REPEATS` fixed samplings each."""
    extract_patch_features, positional_probe = _evaluation_modules()
    scores = []
    for index, image in enumerate(images):
        features = extract_patch_features(model, image)
        for repeat in range(PROBE_REPEATS):
            seed = index * PROBE_REPEATS + repeat
            scores.append(
                positional_probe.linear_probe(
                    features, ramp=PROBE_RAMP, step=PROBE_STEP, sampling="random", alpha=1.0, holdout=False, seed=seed
                )
            )
    return float(np.mean(scores))


@torch.no_grad()
def mean_patch_cosine(model, pixel_values: torch.Tensor, targets: torch.Tensor, batch_size: int = 16) -> float:
    """Mean cosine similarity between `model`'s patch tokens and `(K, N, C)` targets over `(K, 3, S, S)` images."""
    device = next(model.parameters()).device
    prefix = prefix_token_count(model)
    similarities = []
    for start in range(0, pixel_values.shape[0], batch_size):
        tokens = patch_tokens(model, pixel_values[start : start + batch_size].to(device), prefix)
        target = targets[start : start + batch_size].to(device)
        similarities.append(F.cosine_similarity(tokens.float(), target, dim=-1, eps=1e-8).flatten().cpu())
    return float(torch.cat(similarities).mean())


def evaluate_student(student, probe: ProbeImages, probe_targets: torch.Tensor) -> dict:
    """Positional probe R^2 and patch cosine to the (blanked) teacher target on the held-out images."""
    was_training = student.training
    student.eval()
    try:
        results = {
            "probe_r2_lr_ud": positional_probe_r2(student, probe.probe_rgb),
            "patch_cosine_to_teacher": mean_patch_cosine(student, probe.pixel_values, probe_targets),
        }
    finally:
        student.train(was_training)
    return results


# ---------------------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------------------


def load_teacher(source):
    """The teacher, reproducing `source` exactly (its own position scheme), frozen and in eval mode."""

    teacher = convert(source, variant="keep-pe")
    teacher.requires_grad_(False)
    return teacher.eval()


def build_student(teacher_source, variant: str, init_from=None):
    """The student: the teacher's (or `init_from`'s) weights as `variant` ("alibi" or "nope"), of the architecture
    of that checkpoint (an ALiBi-DINOv2 from a DINOv2, an ALiBi-DINOv3 from a DINOv3). Every weight trains except
    the mask token, which only masked pre-training uses (it would get no gradient here)."""

    student = convert(init_from or teacher_source, variant=variant)
    student.requires_grad_(True)
    student.embeddings.mask_token.requires_grad_(False)
    return student.train()


def check_models(teacher, student, args: DistillationArguments, warn: bool = True) -> int:
    """Check that teacher and student fit together and with `--image_size`; returns the patch size. `warn`: log
    advice about weak settings (on one process only)."""
    patch_size, student_patch = patch_size_of(teacher), patch_size_of(student)
    width, student_width = teacher.config.hidden_size, student.config.hidden_size
    if (student_patch, student_width) != (patch_size, width):
        raise InputError(
            f"The student ({args.init_from}) does not match the teacher ({args.teacher}): patch size "
            f"{student_patch} vs {patch_size}, width {student_width} vs {width}."
        )
    for name in ("image_size", "probe_image_size"):
        size = getattr(args, name)
        if size < patch_size:
            raise InputError(
                f"--{name} {size} is smaller than one {patch_size} x {patch_size} patch of the teacher; use at least "
                f"{patch_size} (e.g. {16 * patch_size})."
            )
    probe_grid = args.probe_image_size // patch_size
    sampled = probe_grid * probe_grid // PROBE_STEP**2
    if warn and (args.probe_dir or args.num_probe_images) and sampled < 8:
        logger.warning(
            "--probe_image_size %d gives a %d x %d grid: the probe samples only %d patches (step %d), too few for a "
            "meaningful R^2; use at least %d px.",
            args.probe_image_size, probe_grid, probe_grid, sampled, PROBE_STEP,
            math.ceil(math.sqrt(8) * PROBE_STEP) * patch_size,
        )  # fmt: skip
    if args.random_roll and args.image_size % patch_size:
        raise InputError(
            f"--random_roll rolls by whole patches and needs --image_size to be a multiple of {patch_size}; got "
            f"{args.image_size} (use {args.image_size // patch_size * patch_size} or "
            f"{(args.image_size // patch_size + 1) * patch_size})."
        )
    if isinstance(args.blank_channels, list) and any(c >= width for c in args.blank_channels):
        raise InputError(
            f"--blank_channels {args.blank_channels} lists channels beyond the teacher's {width} "
            f"(valid: 0 to {width - 1})."
        )
    return patch_size


# ---------------------------------------------------------------------------------------------------------------------
# The run: its state, set up once, then passed to every step
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class TrainingProgress(StateDictDataclass):
    """Everything besides the models, optimiser, scheduler, sampler and RNG that a resumed run needs; registered
    for checkpointing, so it is saved with every checkpoint and restored on resume."""

    global_step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0  # batches of `epoch` already trained on (skipped when resuming)
    epoch_losses: list = field(default_factory=list)
    epoch_loss_sum: float = 0.0
    epoch_loss_batches: int = 0
    images_seen: int = 0
    skipped: list = field(default_factory=list)  # [{"name", "reason"}] of unreadable training images
    blank_channels: list | None = None
    teacher_probe_r2: float | None = None
    last_probe: dict = field(default_factory=dict)
    evaluations: list = field(default_factory=list)
    teacher_forward_images: int = 0
    cached_target_hits: int = 0


@dataclass
class RunningTotals:
    """This process's running sums since the run (re)started, kept on the device so that a step never waits for
    them; they are read (a collective over the processes) only when logging, at checkpoints and at epoch ends."""

    epoch_loss_sum: torch.Tensor
    epoch_loss_batches: int
    window_loss: torch.Tensor
    window_batches: int
    images: torch.Tensor  # readable images trained on
    teacher_images: int  # images the teacher ran on without a cache (the cache counts its own)
    images_at_start: int  # progress.images_seen when the run (re)started
    teacher_counts_at_start: tuple[int, int]  # progress.teacher_forward_images, cached_target_hits at (re)start
    window_images_start: int = 0
    window_start: float = field(default_factory=time.perf_counter)

    @classmethod
    def starting_from(cls, progress: TrainingProgress, device) -> "RunningTotals":
        return cls(
            epoch_loss_sum=torch.tensor(progress.epoch_loss_sum, device=device),
            epoch_loss_batches=progress.epoch_loss_batches,
            window_loss=torch.zeros((), device=device),
            window_batches=0,
            images=torch.zeros((), device=device, dtype=torch.int64),
            teacher_images=0,
            images_at_start=progress.images_seen,
            teacher_counts_at_start=(progress.teacher_forward_images, progress.cached_target_hits),
        )


@dataclass
class DistillationRun:
    """Everything the training steps share. `prepare_run` builds it; each step function receives it."""

    args: DistillationArguments
    accelerator: Any
    teacher: torch.nn.Module
    student: torch.nn.Module  # prepared by accelerate (wrapped for distributed runs)
    optimizer: Any
    lr_scheduler: Any
    dataloader: Any
    train_dataset: DistillationImages | StreamingDistillationImages
    probe: ProbeImages
    patch_size: int
    num_prefix_tokens: int
    max_train_steps: int
    num_train_epochs: int | None  # None when streaming: the steps alone end the run
    progress: TrainingProgress
    resumed_from: Path | None
    started: float
    skipped: SkippedInputs  # unreadable training images met so far (every process's, after each sync)
    blank_channels: list = field(default_factory=list)
    cache: TeacherTargetCache | None = None
    probe_targets: torch.Tensor | None = None
    totals: RunningTotals | None = None
    progress_bar: Any = None
    train_started: float = 0.0

    @property
    def grid_size(self) -> tuple[int, int]:
        return (self.args.image_size // self.patch_size, self.args.image_size // self.patch_size)

    @property
    def total_batch_size(self) -> int:
        """Images per optimiser step, over all processes."""
        args = self.args
        return args.per_device_train_batch_size * args.gradient_accumulation_steps * self.accelerator.num_processes

    @property
    def output_dir(self) -> Path:
        return Path(self.args.output_dir)


@dataclass
class TrainingResult:
    """What `train` returns: the trained student (unwrapped), the summary written to `train_summary.json` and
    the output folder."""

    model: torch.nn.Module
    summary: dict
    output_dir: Path


# --- setting up ------------------------------------------------------------------------------------------------------


def setup_accelerator(args: DistillationArguments):
    """The accelerator (a CPU group for multi-process launches without GPU), logging, and a clean output folder."""
    from accelerate.utils import DataLoaderConfiguration

    accelerator = make_accelerator(
        args.output_dir,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        seed=args.seed,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        # Shuffling seeded by (seed + epoch), identical on every process and after a resume.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
    )
    _setup_logging(accelerator)
    if accelerator.is_main_process:
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
        remove_incomplete_checkpoints(args.output_dir)
    accelerator.wait_for_everyone()
    return accelerator


def _setup_logging(accelerator) -> None:
    import datasets
    import transformers

    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%m/%d/%Y %H:%M:%S")
    logger.setLevel(logging.INFO if accelerator.is_local_main_process else logging.WARNING)
    if not accelerator.is_local_main_process:
        datasets.utils.logging.set_verbosity_error()
        transformers.utils.logging.set_verbosity_error()


def load_models(args: DistillationArguments, accelerator):
    """`(teacher on the device, student, patch size)`. The sources are checked first; the first process
    downloads, the others read its cache."""
    teacher_source = check_model_source(args.teacher, "teacher")
    init_from = check_model_source(args.init_from, "student") if args.init_from else None
    with accelerator.main_process_first():
        teacher = load_teacher(teacher_source)
        student = build_student(teacher_source, args.variant, init_from)
    patch_size = check_models(teacher, student, args, warn=accelerator.is_main_process)
    return teacher.to(accelerator.device), student, patch_size


def load_data(args: DistillationArguments, accelerator, patch_size: int):
    """`(train_dataset, probe)`: the held-out probe images first, then the training set without them."""
    with accelerator.main_process_first():
        records, image_column = load_image_records(args)
        records, probe_sources = split_probe_records(records, image_column, args)
    if args.max_train_samples:
        if args.streaming:
            records = records.take(args.max_train_samples)
        else:
            records = records.select(range(min(args.max_train_samples, len(records))))
    probe = prepare_probe_images(probe_sources, args.image_size, args.probe_image_size, patch_size, args.strict)
    if probe_sources and not len(probe):
        raise InputError("None of the probe images could be read; check --probe_dir.")
    with_keys = args.cache_teacher_embeddings is not None
    if args.streaming:
        records = records.shuffle(seed=args.seed, buffer_size=10_000)
        return StreamingDistillationImages(records, image_column, args.image_size, patch_size, with_keys), probe
    train_dataset = DistillationImages(records, image_column, args.image_size, patch_size, with_keys)
    if len(train_dataset) == 0:
        raise InputError("No training images are left after holding out the probe images.")
    return train_dataset, probe


def build_dataloader(args: DistillationArguments, train_dataset, accelerator) -> DataLoader:
    workers = default_num_workers(args.dataloader_num_workers, accelerator.num_processes)
    if args.streaming:
        return DataLoader(train_dataset, batch_size=args.per_device_train_batch_size, num_workers=workers)
    return DataLoader(
        train_dataset,
        batch_size=args.per_device_train_batch_size,
        shuffle=True,
        num_workers=workers,
        pin_memory=accelerator.device.type == "cuda",
        persistent_workers=workers > 0,
    )


def training_length(args: DistillationArguments, dataloader, num_processes: int) -> tuple[int, int | None]:
    """`(max_train_steps, num_train_epochs)`: with a known length, epochs give the steps or --max_train_steps gives
    the epochs (as in transformers' examples); a stream has only steps."""
    if args.streaming:
        return args.max_train_steps, None
    batches_per_process = math.ceil(len(dataloader) / num_processes)
    steps_per_epoch = math.ceil(batches_per_process / args.gradient_accumulation_steps)
    max_train_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch
    return max_train_steps, math.ceil(max_train_steps / steps_per_epoch)


def build_optimizer(args: DistillationArguments, student, max_train_steps: int, num_processes: int):
    """AdamW over the trainable weights and its learning-rate schedule."""
    from transformers import get_scheduler

    optimizer = torch.optim.AdamW(
        [p for p in student.parameters() if p.requires_grad], lr=args.learning_rate, weight_decay=args.weight_decay
    )
    # The accelerate-wrapped scheduler steps once per process on every optimiser step.
    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.num_warmup_steps * num_processes,
        num_training_steps=max_train_steps * num_processes,
    )
    return optimizer, lr_scheduler


def prepare_run(args: DistillationArguments) -> DistillationRun:
    """Accelerator, models, data, optimiser, resumed progress, blanked channels, target cache and the held-out
    reference numbers: everything the training loop needs."""
    started = time.perf_counter()
    accelerator = setup_accelerator(args)
    teacher, student, patch_size = load_models(args, accelerator)
    train_dataset, probe = load_data(args, accelerator, patch_size)
    dataloader = build_dataloader(args, train_dataset, accelerator)
    max_train_steps, num_train_epochs = training_length(args, dataloader, accelerator.num_processes)
    optimizer, lr_scheduler = build_optimizer(args, student, max_train_steps, accelerator.num_processes)
    num_prefix_tokens = prefix_token_count(student)
    student, optimizer, dataloader, lr_scheduler = accelerator.prepare(student, optimizer, dataloader, lr_scheduler)

    progress = TrainingProgress()
    accelerator.register_for_checkpointing(progress)
    resumed_from = resolve_resume_checkpoint(args.resume_from_checkpoint, args.output_dir)
    if resumed_from:
        load_checkpoint(accelerator, resumed_from)
    run = DistillationRun(
        args=args, accelerator=accelerator, teacher=teacher, student=student, optimizer=optimizer,
        lr_scheduler=lr_scheduler, dataloader=dataloader, train_dataset=train_dataset, probe=probe,
        patch_size=patch_size, num_prefix_tokens=num_prefix_tokens, max_train_steps=max_train_steps,
        num_train_epochs=num_train_epochs, progress=progress, resumed_from=resumed_from, started=started,
        skipped=SkippedInputs(strict=args.strict),
    )  # fmt: skip
    run.skipped.items = [(item["name"], item["reason"]) for item in progress.skipped]  # met before a resume
    run.blank_channels = progress.blank_channels = choose_blank_channels(run)
    run.cache = open_target_cache(run)
    run.totals = RunningTotals.starting_from(progress, accelerator.device)
    start_tracking(run)
    compute_probe_references(run)
    return run


def choose_blank_channels(run: DistillationRun) -> list[int]:
    """The target channels to blank: the listed ones; for `auto`, the teacher's most positional channels on the
    probe images (ranked on the main process, broadcast; a resumed run keeps its earlier choice)."""
    from accelerate.utils import broadcast_object_list

    if run.args.blank_channels != "auto":
        return list(run.args.blank_channels)
    if run.progress.blank_channels is not None:
        return list(run.progress.blank_channels)
    chosen = [None]
    if run.accelerator.is_main_process:
        from evaluation.positional_probe import most_positional_channels

        scores = rank_positional_channels(run.teacher, run.probe.probe_rgb)
        channels = sorted(int(c) for c in most_positional_channels(scores, AUTO_BLANK_CHANNEL_COUNT))  # index order
        logger.info(
            "Most positional teacher channels (blanked in the target): %s, R^2 %s",
            channels,
            [round(float(scores[c]), 3) for c in channels],
        )
        chosen = [channels]
    return broadcast_object_list(chosen)[0]


def open_target_cache(run: DistillationRun) -> TeacherTargetCache | None:
    """With `--cache_teacher_embeddings`, the on-disk targets of this teacher, size and precision."""
    args, accelerator = run.args, run.accelerator
    if not args.cache_teacher_embeddings:
        return None
    fingerprint = teacher_fingerprint(run.teacher, args.image_size, accelerator.mixed_precision)
    info = {
        "teacher": str(args.teacher),
        "image_size": args.image_size,
        "grid": list(run.grid_size),
        "hidden_size": run.teacher.config.hidden_size,
        "mixed_precision": accelerator.mixed_precision,
        "dtype": "float16",
    }
    if accelerator.is_main_process:
        TeacherTargetCache(args.cache_teacher_embeddings, fingerprint, info)  # writes info.json once
    accelerator.wait_for_everyone()
    cache = TeacherTargetCache(args.cache_teacher_embeddings, fingerprint, info, accelerator.process_index)
    logger.info("Teacher target cache %s: %d targets stored", cache.directory, len(cache))
    return cache


def start_tracking(run: DistillationRun) -> None:
    """Trackers, the run's description in the log, and the progress bar."""
    from tqdm.auto import tqdm

    args, accelerator = run.args, run.accelerator
    if args.report_to != "none":
        accelerator.init_trackers(TRACKER_PROJECT, config=_tracker_config(args))
    logger.info("***** Distillation *****")
    start_from = f" from {args.init_from}" if args.init_from else ""
    logger.info("  Teacher = %s, student = %s%s", args.teacher, args.variant, start_from)
    train_count = "streamed" if args.streaming else len(run.train_dataset)
    logger.info("  Training images = %s, probe images = %d", train_count, len(run.probe))
    logger.info(
        "  Epochs = %s, total batch size = %d, steps = %d",
        run.num_train_epochs, run.total_batch_size, run.max_train_steps,
    )  # fmt: skip
    logger.info("  Blanked target channels = %s", run.blank_channels or "none")
    if run.resumed_from:
        logger.info("  Resumed from %s (step %d)", run.resumed_from, run.progress.global_step)
    run.progress_bar = tqdm(
        total=run.max_train_steps,
        initial=run.progress.global_step,
        disable=not accelerator.is_local_main_process,
        desc="distilling",
    )


def compute_probe_references(run: DistillationRun) -> None:
    """The held-out reference numbers, on the main process: the teacher's targets for the patch cosine and its
    probe score (kept from the checkpoint when resuming)."""
    if not len(run.probe) or not run.accelerator.is_main_process:
        return
    pixel_values = run.probe.pixel_values.to(run.accelerator.device)
    run.probe_targets = batch_targets(run.teacher, pixel_values, blank_channels=run.blank_channels).cpu()
    if run.progress.teacher_probe_r2 is None:
        run.progress.teacher_probe_r2 = positional_probe_r2(run.teacher, run.probe.probe_rgb)


def _tracker_config(args: DistillationArguments) -> dict:
    """Options as the scalar types trackers accept."""
    config = {}
    for key, value in sorted(dataclasses.asdict(args).items()):
        if isinstance(value, (bool, int, float, str)):
            config[key] = value
        elif value is not None:
            config[key] = str(value)
    return config


# --- training --------------------------------------------------------------------------------------------------------


def training_finished(run: DistillationRun) -> bool:
    epochs_done = run.num_train_epochs is not None and run.progress.epoch >= run.num_train_epochs
    return run.progress.global_step >= run.max_train_steps or epochs_done


def train_one_epoch(run: DistillationRun) -> None:
    """The batches of the current epoch still to run (all of them, unless resuming in its middle), then the
    epoch's bookkeeping."""
    progress = run.progress
    resumed_batches = progress.batches_in_epoch
    if run.cache is not None:
        run.cache.refresh()
    batch_index, batches_run = resumed_batches, 0
    for batch in epoch_batches(run.accelerator, run.dataloader, progress.epoch, resumed_batches):
        batch_index += 1
        batches_run += 1
        note_unreadable_images(run, batch)
        loss = training_step(run, batch, batch_index)
        add_to_totals(run, batch, loss)
        if run.accelerator.sync_gradients:
            after_optimizer_step(run, batch_index)
            if progress.global_step >= run.max_train_steps:
                break
    if run.args.streaming and batches_run == 0 and resumed_batches == 0:
        raise InputError(
            f"The dataset yielded no batch in epoch {progress.epoch}; check --dataset_name and --train_split."
        )
    finish_epoch(run, batch_index)


def note_unreadable_images(run: DistillationRun, batch: dict) -> None:
    """Skip the batch's unreadable images with a warning naming each (once per run), or, with `--strict`, fail."""
    invalid = (~batch["valid"]).nonzero().flatten().tolist()
    for i in invalid:
        name = run.train_dataset.describe(int(batch["index"][i]))
        if name not in run.skipped.names:
            run.skipped.add(name, ImageReadError(decode_message(batch["error"][i])))


def training_step(run: DistillationRun, batch: dict, batch_index: int) -> torch.Tensor:
    """Targets, optional roll, student forward, loss, backward and (every `gradient_accumulation_steps` batches)
    the optimiser step. Returns the detached loss."""
    args, accelerator = run.args, run.accelerator
    pixel_values, valid = batch["pixel_values"], batch["valid"]
    with accelerator.accumulate(run.student):
        targets = batch_targets(
            run.teacher, pixel_values, valid, batch["key"], run.cache, run.blank_channels, accelerator.autocast
        )
        if args.random_roll:
            generator = roll_generator(args.seed, run.progress.epoch, batch_index, accelerator.process_index)
            shifts = random_patch_shifts(pixel_values.shape[0], run.grid_size, generator)
            pixel_values, targets = roll_by_patches(pixel_values, targets, shifts, run.patch_size)
        with accelerator.autocast():
            student_tokens = patch_tokens(run.student, pixel_values, run.num_prefix_tokens)
        loss = distillation_loss(student_tokens, targets, valid, args.loss)
        accelerator.backward(loss)
        run.optimizer.step()
        run.lr_scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def add_to_totals(run: DistillationRun, batch: dict, loss: torch.Tensor) -> None:
    totals = run.totals
    totals.epoch_loss_sum += loss
    totals.epoch_loss_batches += 1
    totals.window_loss += loss
    totals.window_batches += 1
    totals.images += batch["valid"].sum()
    if run.cache is None:
        totals.teacher_images += int(batch["pixel_values"].shape[0])


def after_optimizer_step(run: DistillationRun, batch_index: int) -> None:
    """Count the step, then log, probe and checkpoint when they are due."""
    args, progress = run.args, run.progress
    progress.global_step += 1
    progress.batches_in_epoch = batch_index
    run.progress_bar.update(1)
    step = progress.global_step
    if step % args.logging_steps == 0 or step == run.max_train_steps:
        log_training_window(run)
    if step % args.probe_every_n_steps == 0 and step != run.max_train_steps:
        run_probe(run)
    if isinstance(args.checkpointing_steps, int) and step % args.checkpointing_steps == 0:
        save_training_checkpoint(run)


def log_training_window(run: DistillationRun) -> None:
    """Mean loss, learning rate, throughput and skipped images since the last log (every process joins)."""
    accelerator, totals = run.accelerator, run.totals
    mean_loss = float(accelerator.reduce(totals.window_loss / max(totals.window_batches, 1), "mean"))
    images_now = int(accelerator.reduce(totals.images.clone(), "sum"))
    seconds = time.perf_counter() - totals.window_start
    skipped_count = len(gather_skipped(run))
    epoch = run.progress.epoch
    if not run.args.streaming:
        epoch += run.progress.batches_in_epoch / max(len(run.dataloader), 1)
    accelerator.log(
        {
            "train/loss": mean_loss,
            "train/learning_rate": run.lr_scheduler.get_last_lr()[0],
            "train/images_per_second": (images_now - totals.window_images_start) / max(seconds, 1e-9),
            "train/skipped_images": skipped_count,
            "train/epoch": epoch,
        },
        step=run.progress.global_step,
    )
    run.progress_bar.set_postfix(loss=f"{mean_loss:.4f}", skipped=skipped_count)
    totals.window_loss.zero_()
    totals.window_batches = 0
    totals.window_images_start, totals.window_start = images_now, time.perf_counter()


def run_probe(run: DistillationRun) -> None:
    """Probe the student on the held-out images (main process), log and record the scores; every process waits."""
    progress, step = run.progress, run.progress.global_step
    if len(run.probe) and run.accelerator.is_main_process:
        results = evaluate_student(run.accelerator.unwrap_model(run.student), run.probe, run.probe_targets)
        progress.last_probe = {"step": step, **results}
        progress.evaluations.append(progress.last_probe)
        run.accelerator.log(
            {
                "probe/r2_lr_ud": results["probe_r2_lr_ud"],
                "probe/patch_cosine": results["patch_cosine_to_teacher"],
                "probe/teacher_r2_lr_ud": progress.teacher_probe_r2,
            },
            step=step,
        )
        logger.info(
            "step %d: probe R^2 (lr+ud) %.3f (teacher %.3f), patch cosine to teacher %.4f",
            step, results["probe_r2_lr_ud"], progress.teacher_probe_r2, results["patch_cosine_to_teacher"],
        )  # fmt: skip
    run.accelerator.wait_for_everyone()


def finish_epoch(run: DistillationRun, batch_index: int) -> None:
    """Record the epoch's mean loss (a partial last epoch included); a finished epoch moves the progress to the
    next one, from its first batch, and is checkpointed with `--checkpointing_steps epoch`."""
    accelerator, progress, totals = run.accelerator, run.progress, run.totals
    epoch_mean = float(accelerator.reduce(totals.epoch_loss_sum / max(totals.epoch_loss_batches, 1), "mean"))
    if totals.epoch_loss_batches:
        progress.epoch_losses.append(epoch_mean)
        accelerator.log({"train/epoch_loss": epoch_mean}, step=progress.global_step)
    totals.epoch_loss_sum.zero_()
    totals.epoch_loss_batches = 0
    if run.cache is not None:
        run.cache.flush()
        accelerator.wait_for_everyone()
    reached_the_end = not run.args.streaming and batch_index >= len(run.dataloader)
    if progress.global_step < run.max_train_steps or reached_the_end:
        progress.epoch, progress.batches_in_epoch = progress.epoch + 1, 0
        if run.args.checkpointing_steps == "epoch":
            save_training_checkpoint(run)


# --- progress across processes, checkpoints --------------------------------------------------------------------------


def gather_skipped(run: DistillationRun) -> list[str]:
    """Merge every process's skipped images into each process's list (a collective); returns their names."""
    if run.accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        merged = dict(gather_object(list(run.skipped.items)))
        run.skipped.items = sorted(merged.items())
    return run.skipped.names


def sync_progress(run: DistillationRun) -> None:
    """Fold the running totals of every process into `run.progress` (a collective: every process calls it)."""
    accelerator, progress, totals = run.accelerator, run.progress, run.totals
    if run.cache is not None:
        run.cache.flush()
    gather_skipped(run)
    progress.skipped = run.skipped.as_dict()
    progress.epoch_loss_sum = float(accelerator.reduce(totals.epoch_loss_sum.clone(), "mean"))
    progress.epoch_loss_batches = totals.epoch_loss_batches
    progress.images_seen = totals.images_at_start + int(accelerator.reduce(totals.images.clone(), "sum"))
    if run.cache is not None:
        counts = torch.tensor([run.cache.computed, run.cache.hits], device=accelerator.device)
    else:
        counts = torch.tensor([totals.teacher_images, 0], device=accelerator.device)
    computed, hits = accelerator.reduce(counts, "sum").tolist()
    progress.teacher_forward_images = totals.teacher_counts_at_start[0] + int(computed)
    progress.cached_target_hits = totals.teacher_counts_at_start[1] + int(hits)


def save_training_checkpoint(run: DistillationRun) -> Path:
    """Everything a resumed run needs (models, optimiser, scheduler, sampler, RNG, progress), complete or absent,
    as `OUTPUT_DIR/checkpoints/checkpoint_<step>`."""
    sync_progress(run)
    return save_checkpoint(
        run.accelerator, run.args.output_dir, run.progress.global_step, run.args.checkpoints_total_limit
    )


# --- finishing -------------------------------------------------------------------------------------------------------


def finish_run(run: DistillationRun) -> TrainingResult:
    """The last probe, the totals of every process, then (main process) the model folder, the summary and the
    upload."""
    run.progress_bar.close()
    train_seconds = time.perf_counter() - run.train_started
    if run.progress.last_probe.get("step") != run.progress.global_step:
        run_probe(run)
    sync_progress(run)
    images_this_run = run.progress.images_seen - run.totals.images_at_start
    run.accelerator.wait_for_everyone()
    model = run.accelerator.unwrap_model(run.student)
    summary = {}
    if run.accelerator.is_main_process:
        save_model(run, model)
        summary = training_summary(run, train_seconds, images_this_run)
        write_json_atomic(run.output_dir / SUMMARY_FILE, summary)
        _report_skipped(run, summary["skipped_files"])
        logger.info("Saved the distilled model and %s to %s", SUMMARY_FILE, run.output_dir)
        if run.args.push_to_hub:
            from alibi_dinov2.conversion.families import family_of

            title = family_of(model.config).title
            push_to_hub(run.output_dir, run.args.hub_model_id, commit_message=f"Distilled {title}")
    run.accelerator.wait_for_everyone()
    run.accelerator.end_training()
    return TrainingResult(model=model, summary=summary, output_dir=run.output_dir)


def hyperparameters(run: DistillationRun) -> dict:
    """The recipe, as the model card and the summary record it."""
    args = run.args
    return {
        "teacher": args.teacher,
        "variant": args.variant,
        "init_from": args.init_from,
        "data": args.train_dir or args.dataset_name,
        "image_size": args.image_size,
        "total_batch_size": run.total_batch_size,
        "learning_rate": args.learning_rate,
        "weight_decay": args.weight_decay,
        "lr_scheduler": args.lr_scheduler,
        "optimizer": "AdamW",
        "num_train_epochs": run.num_train_epochs,
        "max_train_steps": run.max_train_steps,
        "loss": args.loss,
        "blank_channels": list(run.blank_channels),
        "random_roll": args.random_roll,
        "mixed_precision": args.mixed_precision or "no",
        "seed": args.seed,
    }


def save_model(run: DistillationRun, model) -> None:
    """The remote-code model folder, with a model card holding the recipe and the last held-out scores."""

    args, last_probe = run.args, run.progress.last_probe
    evaluation_results = {}
    if last_probe:
        probe_name = f"positional probe R2 lr+ud, held-out, {args.probe_image_size} px"
        evaluation_results = {
            f"{probe_name} (student)": last_probe["probe_r2_lr_ud"],
            f"{probe_name} (teacher)": run.progress.teacher_probe_r2,
            "patch cosine to teacher, held-out": last_probe["patch_cosine_to_teacher"],
        }
    save_model_folder(
        model,
        run.output_dir,
        base_model=str(args.teacher),
        repo_id=args.hub_model_id if args.push_to_hub else None,
        hyperparameters=hyperparameters(run),
        evaluation_results=evaluation_results,
    )


def training_summary(run: DistillationRun, train_seconds: float, images_this_run: int) -> dict:
    """What `train_summary.json` holds."""
    progress = run.progress
    skipped_files = sorted(run.skipped.names) + [f"{name} (probe)" for name in run.probe.skipped]
    return {
        "global_step": progress.global_step,
        "max_train_steps": run.max_train_steps,
        "num_train_epochs": run.num_train_epochs,
        "epochs_completed": progress.epoch,
        "epoch_losses": progress.epoch_losses,
        "final_epoch_loss": progress.epoch_losses[-1] if progress.epoch_losses else None,
        "images_seen": progress.images_seen,
        "images_per_second": images_this_run / max(train_seconds, 1e-9),
        "train_runtime_s": train_seconds,
        "total_runtime_s": time.perf_counter() - run.started,
        "num_processes": run.accelerator.num_processes,
        "total_batch_size": run.total_batch_size,
        "skipped_images": len(skipped_files),
        "skipped_files": skipped_files,
        "blank_channels": list(run.blank_channels),
        "probe": {
            "images": len(run.probe),
            "image_size": run.args.probe_image_size,
            "teacher_probe_r2_lr_ud": progress.teacher_probe_r2,
            **progress.last_probe,
        },
        "evaluations": progress.evaluations,
        "teacher_forward_images": progress.teacher_forward_images,
        "cached_target_hits": progress.cached_target_hits,
        "cache_dir": str(run.cache.directory) if run.cache is not None else None,
        "resumed_from": str(run.resumed_from) if run.resumed_from else None,
        "hyperparameters": hyperparameters(run),
        "args": _tracker_config(run.args),
    }


def _report_skipped(run: DistillationRun, skipped_files: list) -> None:
    """The final count of skipped training images (each was named in a warning when met)."""
    if not skipped_files:
        logger.info("Skipped 0 images: every image was readable.")
        return
    if isinstance(run.train_dataset, DistillationImages):
        total = len(run.train_dataset)
    else:
        total = run.progress.images_seen + len(run.skipped)
    run.skipped.summarise(total=total)


# --- entry points ----------------------------------------------------------------------------------------------------


def train(args: DistillationArguments) -> TrainingResult:
    """Run the distillation described by `args`. accelerate's settings are released afterwards (even after an
    error), so that the same process can run another stage."""
    run = None
    try:
        run = prepare_run(args)
        if run.progress.global_step == 0:
            run_probe(run)
        run.train_started = time.perf_counter()
        run.student.train()
        while not training_finished(run):
            train_one_epoch(run)
        return finish_run(run)
    finally:
        if run is not None:
            run.progress_bar.close()  # after an error too, so that its message starts on a line of its own
        release_accelerator()


def main(argv=None) -> TrainingResult:
    """Run the distillation described by the command-line tokens `argv` (`None`: `sys.argv[1:]`)."""
    return train(parse_args(argv))


if __name__ == "__main__":
    run_command(main)
