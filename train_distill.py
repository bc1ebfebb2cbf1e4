# Copyright 2026 The alibi-dinov2 authors. Licensed under the Apache License, Version 2.0.
"""Retrofit DINOv2 into ALiBi-DINOv2 by distillation from the stock checkpoint.

The teacher is the stock model (learned absolute position embedding, frozen). The student starts from the same
weights with the position embedding removed and the 2D ALiBi bias added (`--variant alibi`) or with no position
information at all (`--variant nope`), and learns to reproduce the teacher's final-normed patch tokens:

    loss = mean over images and patch tokens of (1 - cos(student_token, teacher_token))

The teacher's most positional output channels can be blanked (set to 0) in the target only (`--blank_channels`),
so that the student is not asked to re-create the positional ramps it is meant to lose.

    # Stage 1 (224 px) then stage 2 (518 px) of the reference recipe, ViT-S/14 with registers on COCO
    accelerate launch train_distill.py configs/distill_stage1_224.json
    accelerate launch train_distill.py configs/distill_stage2_518.json

    # Any flag on the command line overrides the config file
    python train_distill.py configs/distill_stage1_224.json --train_dir /data/coco/train2017 --dataset_name ""

    # A folder of micrographs, targets cached on disk, resumable
    python train_distill.py --train_dir images/ --output_dir outputs/alibi-micro --image_size 224 \\
        --cache_teacher_embeddings outputs/teacher-cache --checkpointing_steps 500 --resume_from_checkpoint latest

The final model is written to `--output_dir` as a remote-code folder (`AutoModel.from_pretrained(folder,
trust_remote_code=True)`) with a model card that records the hyperparameters and the last positional-probe scores,
next to `train_summary.json`. Checkpoints (`checkpoint-STEP`) and tracker logs live in the same folder.
"""

import argparse
import contextlib
import dataclasses
import difflib
import hashlib
import inspect
import io
import json
import logging
import math
import os
import re
import shutil
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader


logger = logging.getLogger(__name__)

DEFAULT_TEACHER = "facebook/dinov2-with-registers-small"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
TIFF_EXTENSIONS = (".tif", ".tiff")
VARIANTS = ("alibi", "nope")
LOSSES = ("cosine", "mse")
LR_SCHEDULERS = ("constant", "constant_with_warmup", "cosine", "linear")
MIXED_PRECISION = ("no", "fp16", "bf16")
CONFIG_SUFFIXES = (".json", ".yaml", ".yml")

# `--blank_channels auto`: this many channels, ranked by their best per-channel R^2 over these ramps.
AUTO_BLANK_CHANNEL_COUNT = 4
CHANNEL_PROBE_RAMPS = ("lr", "ud", "radial")
# Positional probe protocol (paper Tables 1-2): step 6, random sampling, Ridge alpha 1, R^2 over all patches;
# 6 samplings per image, with fixed seeds so that successive evaluations differ only through the model.
PROBE_RAMP = "lr+ud"
PROBE_STEP = 6
PROBE_REPEATS = 6

TRACKER_PROJECT = "train_distill"
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
TRAINING_STATE_FILE = "training_state.json"
SUMMARY_FILE = "train_summary.json"
# New teacher targets are written to disk once this many bytes are pending (one shard file per flush).
CACHE_SHARD_BYTES = 256 * 2**20
CONTENT_KEY_BYTES = 16


# ---------------------------------------------------------------------------------------------------------------------
# Command line and config files
# ---------------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The argument parser; every flag is documented in `--help`."""
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument(
        "config_file",
        nargs="?",
        help="optional JSON or YAML file of flags (keys are flag names without the dashes, e.g. "
        '{"learning_rate": 1e-4}; keys starting with "_" are comments); flags given on the command line override it',
    )
    parser.add_argument("--config", metavar="FILE", help="same as the positional CONFIG_FILE")

    model = parser.add_argument_group("models")
    model.add_argument(
        "--teacher",
        default=DEFAULT_TEACHER,
        help="teacher: a Hub id, a transformers DINOv2 folder, a Meta .pth or a timm .pth, read with "
        "convert_checkpoint.py and reproduced exactly (default: %(default)s)",
    )
    model.add_argument(
        "--variant",
        choices=VARIANTS,
        default="alibi",
        help="student position scheme: 2D ALiBi bias, or no position information (NoPE baseline)",
    )
    model.add_argument(
        "--init_from",
        metavar="SOURCE",
        help="start the student from this model (e.g. the stage-1 output folder) instead of the teacher's weights",
    )

    data = parser.add_argument_group("data")
    data.add_argument(
        "--train_dir", help="folder of training images, searched recursively (" + ", ".join(IMAGE_EXTENSIONS) + ")"
    )
    data.add_argument("--dataset_name", help="Hub dataset of training images (instead of --train_dir)")
    data.add_argument("--dataset_config_name", help="configuration (subset) of --dataset_name")
    data.add_argument("--train_split", default="train", help="split of --dataset_name (default: %(default)s)")
    data.add_argument("--image_column", help="column of --dataset_name holding the images (default: the first one)")
    data.add_argument(
        "--streaming",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="stream --dataset_name instead of downloading it first (needs --max_train_steps)",
    )
    data.add_argument("--max_train_samples", type=int, help="train on at most this many images (for quick runs)")
    data.add_argument(
        "--image_size",
        type=int,
        default=224,
        help="shortest side resized to this, then centre-cropped to a square of this size (default: %(default)s)",
    )
    data.add_argument(
        "--dataloader_num_workers", type=int, default=4, help="decoding processes per device (default: %(default)s)"
    )

    target = parser.add_argument_group("distillation target")
    target.add_argument(
        "--blank_channels",
        nargs="+",
        metavar="CHANNEL",
        help="teacher output channels set to 0 in the target only: a list of channel indices, `auto` (the "
        f"{AUTO_BLANK_CHANNEL_COUNT} most positional channels found with the per-channel probe on the held-out "
        "images) or `none` (default)",
    )
    target.add_argument("--loss", choices=LOSSES, default="cosine", help="1 - cosine per patch token, or squared error")
    target.add_argument(
        "--random_roll",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="roll each image and its target by the same random whole number of patches (image_size must be a "
        "multiple of the patch size)",
    )
    target.add_argument(
        "--cache_teacher_embeddings",
        metavar="DIR",
        help="compute the teacher targets once and keep them in DIR (float16, keyed by a hash of the preprocessed "
        "image and the teacher), reused across epochs and runs",
    )

    training = parser.add_argument_group("optimisation")
    training.add_argument(
        "--per_device_train_batch_size", type=int, default=32, help="images per device and batch (default: %(default)s)"
    )
    training.add_argument(
        "--gradient_accumulation_steps", type=int, default=1, help="batches per optimiser step (default: %(default)s)"
    )
    training.add_argument("--num_train_epochs", type=int, default=15, help="epochs (default: %(default)s)")
    training.add_argument("--max_train_steps", type=int, help="total optimiser steps; overrides --num_train_epochs")
    training.add_argument("--learning_rate", type=float, default=1e-4, help="AdamW lr (default: %(default)s)")
    training.add_argument("--weight_decay", type=float, default=0.01, help="AdamW weight decay (default: %(default)s)")
    training.add_argument(
        "--lr_scheduler",
        choices=LR_SCHEDULERS,
        default="constant",
        help="learning-rate schedule (default: %(default)s, as the paper)",
    )
    training.add_argument("--num_warmup_steps", type=int, default=0, help="warm-up steps (default: %(default)s)")
    training.add_argument(
        "--mixed_precision",
        choices=MIXED_PRECISION,
        help="passed to accelerate's Accelerator (default: the `accelerate launch` / accelerate config setting)",
    )
    training.add_argument("--seed", type=int, default=42, help="seed of shuffling and rolls (default: %(default)s)")

    output = parser.add_argument_group("output and checkpoints")
    output.add_argument("--output_dir", help="folder of the final model, train_summary.json, checkpoints and logs")
    output.add_argument(
        "--checkpointing_steps",
        help="save the training state every N optimiser steps, or at the end of every `epoch`, into "
        "OUTPUT_DIR/checkpoint-STEP",
    )
    output.add_argument("--checkpoints_total_limit", type=int, help="keep only the newest N checkpoints")
    output.add_argument(
        "--resume_from_checkpoint",
        metavar="PATH",
        help="continue from a checkpoint folder, or `latest` for the newest one in --output_dir (a fresh start "
        "when there is none)",
    )
    output.add_argument(
        "--report_to",
        default="tensorboard",
        help="accelerate tracker(s): tensorboard (default), wandb, all, or none",
    )
    output.add_argument(
        "--logging_steps", type=int, default=10, help="log loss, lr and throughput every N steps (default: %(default)s)"
    )
    output.add_argument(
        "--push_to_hub",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="upload the final model folder to the Hub",
    )
    output.add_argument("--hub_model_id", help="Hub repository of --push_to_hub (default: the name of --output_dir)")

    probe = parser.add_argument_group("positional probe")
    probe.add_argument("--probe_dir", help="held-out images for the probe metric and `--blank_channels auto`")
    probe.add_argument(
        "--num_probe_images",
        type=int,
        default=8,
        help="without --probe_dir: hold out this many training images for the probe (0: no probe; default: "
        "%(default)s)",
    )
    probe.add_argument(
        "--probe_every_n_steps", type=int, default=500, help="probe the student every N steps (default: %(default)s)"
    )
    probe.add_argument(
        "--probe_image_size",
        type=int,
        default=448,
        help="probe images are resized and centre-cropped to this size, so the grid holds enough patches for "
        "the sparse probe (default: %(default)s)",
    )
    return parser


def load_config_file(path) -> dict:
    """Flags from a JSON or YAML file: `{"flag_name": value}`, dashes or underscores."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Config file {path} does not exist.")
    if path.suffix not in CONFIG_SUFFIXES:
        raise ValueError(f"Config file {path} must end in {', '.join(CONFIG_SUFFIXES)}.")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        values = json.loads(text)
    else:
        try:
            import yaml
        except ImportError as error:
            raise ImportError(f"Reading {path} needs PyYAML (`pip install pyyaml`); or write it as JSON.") from error
        values = yaml.safe_load(text) or {}
    if not isinstance(values, dict):
        raise ValueError(f"Config file {path} must hold a mapping of flag names to values.")
    return {str(key).replace("-", "_"): value for key, value in values.items()}


def _option_actions(parser: argparse.ArgumentParser) -> dict:
    return {action.dest: action for action in parser._actions if action.option_strings and action.dest != "help"}


def config_to_argv(values: dict, parser: argparse.ArgumentParser, source) -> list[str]:
    """Turn config-file values into command-line tokens, so that argparse checks them exactly like typed flags
    and flags typed later on the command line win."""
    actions = _option_actions(parser)
    actions.pop("config", None)
    values = {key: value for key, value in values.items() if not key.startswith("_")}  # "_comment" keys
    unknown = [key for key in values if key not in actions]
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, actions, n=1)
            hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        parser.error(f"unknown key(s) in {source}: {', '.join(hints)}. Keys are the flag names without dashes.")
    tokens = []
    for key, value in values.items():
        action = actions[key]
        flag = f"--{key}"
        if value is None:
            continue
        if isinstance(action, argparse.BooleanOptionalAction):
            if not isinstance(value, bool):
                parser.error(f"{source}: {key!r} must be true or false; got {value!r}.")
            tokens.append(flag if value else f"--no-{key}")
        elif isinstance(value, (list, tuple)):
            if action.nargs not in ("+", "*"):
                parser.error(f"{source}: {key!r} takes a single value; got the list {value!r}.")
            if value:
                tokens += [flag, *map(str, value)]
        elif isinstance(value, dict):
            parser.error(f"{source}: {key!r} takes a value, not a mapping.")
        else:
            tokens += [flag, str(value)]
    return tokens


def parse_args(argv=None) -> argparse.Namespace:
    """Parse the command line (and the config file it names), check the values and fill derived defaults.

    `argv` is a list of tokens as on the command line; `None` reads `sys.argv`.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    first = parser.parse_args(argv)
    if first.config_file and first.config:
        parser.error("give the config file either as the positional CONFIG_FILE or with --config, not both")
    config_path = first.config_file or first.config
    if config_path:
        try:
            values = load_config_file(config_path)
        except (OSError, ValueError, ImportError) as error:
            parser.error(str(error))
        command_line = list(argv)
        if first.config_file:
            command_line.remove(first.config_file)
        args = parser.parse_args(config_to_argv(values, parser, config_path) + command_line)
    else:
        args = first
    args.config = config_path
    args.config_file = None
    check_args(args, parser)
    return args


def _blank_channel_list(values, parser) -> list[int] | str:
    if not values:
        return []
    words = [str(value).strip().lower() for value in values]
    if words == ["none"]:
        return []
    if words == ["auto"]:
        return "auto"
    try:
        channels = [int(word) for word in words]
    except ValueError:
        parser.error(f"--blank_channels takes channel indices, `auto` or `none`; got {' '.join(map(str, values))!r}")
    if any(channel < 0 for channel in channels) or len(set(channels)) != len(channels):
        parser.error(f"--blank_channels must be distinct non-negative channel indices; got {channels}")
    return sorted(channels)


def check_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Cross-flag checks; each failure names the problem and the fix."""
    if not args.output_dir:
        parser.error("--output_dir is required: the folder for the final model, checkpoints and logs")
    if args.dataset_name == "":
        args.dataset_name = None  # lets `--dataset_name ""` undo a config file's dataset
    if args.train_dir == "":
        args.train_dir = None
    if bool(args.train_dir) == bool(args.dataset_name):
        parser.error(
            "give the training images with exactly one of --train_dir FOLDER or --dataset_name HUB_DATASET"
            + (" (both were given)" if args.train_dir else " (neither was given)")
        )
    if args.train_dir and not Path(args.train_dir).is_dir():
        parser.error(f"--train_dir {args.train_dir} is not a folder")
    if args.probe_dir and not Path(args.probe_dir).is_dir():
        parser.error(f"--probe_dir {args.probe_dir} is not a folder")
    if args.streaming and not args.dataset_name:
        parser.error("--streaming applies to --dataset_name only")
    if args.streaming and not args.max_train_steps:
        parser.error("--streaming needs --max_train_steps: a streamed dataset has no known length")
    positive = (
        "image_size",
        "per_device_train_batch_size",
        "gradient_accumulation_steps",
        "num_train_epochs",
        "logging_steps",
        "probe_every_n_steps",
        "probe_image_size",
    )
    for name in positive:
        if getattr(args, name) <= 0:
            parser.error(f"--{name} must be a positive integer; got {getattr(args, name)}")
    for name in ("max_train_steps", "max_train_samples", "checkpoints_total_limit"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            parser.error(f"--{name} must be a positive integer; got {getattr(args, name)}")
    for name in ("dataloader_num_workers", "num_probe_images", "num_warmup_steps"):
        if getattr(args, name) < 0:
            parser.error(f"--{name} must be >= 0; got {getattr(args, name)}")
    if not args.learning_rate > 0:
        parser.error(f"--learning_rate must be > 0; got {args.learning_rate}")
    if args.weight_decay < 0:
        parser.error(f"--weight_decay must be >= 0; got {args.weight_decay}")
    if args.checkpointing_steps is not None:
        text = str(args.checkpointing_steps)
        if text == "epoch":
            args.checkpointing_steps = "epoch"
        elif text.isdigit() and int(text) > 0:
            args.checkpointing_steps = int(text)
        else:
            parser.error(f"--checkpointing_steps must be a positive integer or `epoch`; got {text!r}")
    args.blank_channels = _blank_channel_list(args.blank_channels, parser)
    if args.blank_channels == "auto" and not args.probe_dir and args.num_probe_images == 0:
        parser.error(
            "--blank_channels auto ranks channels on held-out images: give --probe_dir or --num_probe_images > 0"
        )
    if args.resume_from_checkpoint and args.resume_from_checkpoint != "latest":
        if not Path(args.resume_from_checkpoint).is_dir():
            parser.error(f"--resume_from_checkpoint {args.resume_from_checkpoint} is not a folder (or use `latest`)")
    if args.push_to_hub and not args.hub_model_id:
        args.hub_model_id = Path(args.output_dir).resolve().name
    args.report_to = (args.report_to or "none").strip()


# ---------------------------------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------------------------------


class UnreadableImageError(ValueError):
    """An image that cannot be decoded (corrupt, truncated, empty, or of an unsupported layout)."""


def list_image_files(folder) -> list[str]:
    """Image files under `folder`, recursively, sorted; hidden files and folders are left out."""
    folder = Path(folder)
    files = []
    for path in folder.rglob("*"):
        relative = path.relative_to(folder)
        if path.suffix.lower() in IMAGE_EXTENSIONS and not any(part.startswith(".") for part in relative.parts):
            if path.is_file():
                files.append(str(path))
    if not files:
        raise ValueError(f"No image files ({', '.join(IMAGE_EXTENSIONS)}) under {folder}.")
    return sorted(files)


def _composite_alpha(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Blend transparent pixels onto the ImageNet mean colour, which normalises to 0: they carry no signal."""
    background = np.asarray(IMAGENET_MEAN, dtype=np.float32)
    return rgb * alpha[..., None] + background * (1.0 - alpha[..., None])


def _scale_to_unit(array: np.ndarray) -> np.ndarray:
    """float32 in [0, 1]: unsigned integers divided by their dtype's maximum (uint16 / 65535, never clipped),
    floats in [0, 1] kept, other floats and signed integers min-max scaled."""
    if array.dtype == bool:
        return array.astype(np.float32)
    if np.issubdtype(array.dtype, np.unsignedinteger):
        return (array.astype(np.float64) / np.iinfo(array.dtype).max).astype(np.float32)
    values = array.astype(np.float32)
    if not np.all(np.isfinite(values)):
        raise UnreadableImageError("the image holds NaN or infinite values")
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if np.issubdtype(array.dtype, np.floating) and low >= 0.0 and high <= 1.0:
        return values
    return (values - low) / (high - low) if high > low else np.zeros_like(values)


def array_to_rgb01(array: np.ndarray) -> np.ndarray:
    """Any image array -> `(H, W, 3)` float32 RGB in [0, 1].

    Accepts `(H, W)` gray, `(H, W, 1)`, `(H, W, 2)` gray + alpha, `(H, W, 3)` RGB and `(H, W, 4)` RGBA (also
    channels-first), of any dtype; alpha is composited onto the ImageNet mean colour.
    """
    array = np.asarray(array)
    if array.ndim == 3 and array.shape[0] in (1, 2, 3, 4) and array.shape[-1] not in (1, 2, 3, 4):
        array = np.moveaxis(array, 0, -1)  # channels-first (e.g. planar TIFF)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 2:
        gray = _scale_to_unit(array)
        return np.repeat(gray[..., None], 3, axis=-1)
    if array.ndim != 3 or array.shape[-1] not in (2, 3, 4):
        raise UnreadableImageError(f"unsupported image layout {array.shape}; expected gray, RGB or RGBA")
    unit = _scale_to_unit(array)
    if array.shape[-1] == 2:
        return _composite_alpha(np.repeat(unit[..., :1], 3, axis=-1), unit[..., 1])
    if array.shape[-1] == 4:
        return _composite_alpha(unit[..., :3], unit[..., 3])
    return unit


def _pil_to_array(image) -> np.ndarray:
    """A PIL image as a numpy array in its own dtype, so that the bit depth decides the scaling."""
    mode = image.mode
    if mode.startswith("I;16"):
        return np.asarray(image).astype(np.uint16)
    if mode == "I":
        array = np.asarray(image)
        # Pillow opens some 16-bit files as 32-bit "I": their values fit in 16 bits.
        if array.size and array.min() >= 0 and array.max() <= np.iinfo(np.uint16).max:
            return array.astype(np.uint16)
        return array
    if mode in ("1", "L", "LA", "RGB", "RGBA", "F"):
        return np.asarray(image)
    if mode in ("P", "PA"):
        has_alpha = mode == "PA" or "transparency" in image.info
        return np.asarray(image.convert("RGBA" if has_alpha else "RGB"))
    if mode in ("La", "RGBa"):
        return np.asarray(image.convert("RGBA"))
    return np.asarray(image.convert("RGB"))  # CMYK, YCbCr, LAB, HSV, ...


def _decode_with_pil(data_or_path) -> np.ndarray:
    from PIL import Image

    with Image.open(data_or_path) as image:
        image.load()  # decode now: truncated or corrupt data fails here, not later
        return _pil_to_array(image)


def _decode_tiff(data_or_path) -> np.ndarray:
    """TIFF through tifffile when installed (any bit depth, 16-bit RGB included), else Pillow."""
    try:
        import tifffile
    except ImportError:
        return _decode_with_pil(data_or_path)
    try:
        with tifffile.TiffFile(data_or_path) as tif:
            return tif.pages[0].asarray()
    except Exception:
        if isinstance(data_or_path, io.BytesIO):
            data_or_path.seek(0)
        return _decode_with_pil(data_or_path)


def _looks_like_tiff(name: str | None, data: bytes | None) -> bool:
    if name and Path(name).suffix.lower() in TIFF_EXTENSIONS:
        return True
    return bool(data) and data[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def decode_image(source) -> torch.Tensor:
    """Decode one image into RGB in [0, 1].

    Args:
        source: a file path, raw file bytes, a `{"bytes": ..., "path": ...}` record (datasets' undecoded
            `Image` feature), a PIL image or a numpy array.
    Returns:
        `(3, H, W)` float32 tensor in [0, 1]. Grayscale is repeated to 3 channels, 16-bit data is divided by
        65535, alpha is composited onto the ImageNet mean colour.
    Raises:
        UnreadableImageError: the image cannot be decoded; the message names it.
    """
    name = None
    try:
        if isinstance(source, dict):
            data, name = source.get("bytes"), source.get("path")
            if data:
                source = data
            elif name:
                source = name
            else:
                raise UnreadableImageError("empty image record (no bytes and no path)")
        if isinstance(source, (str, os.PathLike)):
            name = str(source)
            array = _decode_tiff(name) if _looks_like_tiff(name, None) else _decode_with_pil(name)
        elif isinstance(source, (bytes, bytearray)):
            stream = io.BytesIO(source)
            array = _decode_tiff(stream) if _looks_like_tiff(name, bytes(source[:4])) else _decode_with_pil(stream)
        elif isinstance(source, np.ndarray):
            array = source
        elif hasattr(source, "mode") and hasattr(source, "size"):  # a PIL image
            array = _pil_to_array(source)
        else:
            raise UnreadableImageError(f"unsupported image source of type {type(source).__name__}")
        rgb = array_to_rgb01(array)
        if rgb.shape[0] == 0 or rgb.shape[1] == 0:
            raise UnreadableImageError(f"empty image of shape {rgb.shape}")
    except UnreadableImageError as error:
        raise UnreadableImageError(f"{name or 'image'}: {error}") from error
    except Exception as error:  # Pillow and tifffile raise many types for damaged data
        raise UnreadableImageError(f"{name or 'image'}: {type(error).__name__}: {error}") from error
    return torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1), dtype=np.float32))


def resize_and_center_crop(image: torch.Tensor, size: int) -> torch.Tensor:
    """Resize `(3, H, W)` so that its shortest side is `size` (bicubic, antialiased, in float so that 16-bit
    precision survives), then crop the central `size x size` square. Returns `(3, size, size)` in [0, 1]."""
    height, width = image.shape[-2:]
    if (height, width) != (size, size):
        scale = size / min(height, width)
        new_height = size if height <= width else max(size, round(height * scale))
        new_width = size if width < height else max(size, round(width * scale))
        if (new_height, new_width) != (height, width):
            image = F.interpolate(
                image[None], size=(new_height, new_width), mode="bicubic", align_corners=False, antialias=True
            )[0].clamp_(0.0, 1.0)
        top = int(round((new_height - size) / 2.0))
        left = int(round((new_width - size) / 2.0))
        image = image[:, top : top + size, left : left + size]
    return image.contiguous()


def normalize(image: torch.Tensor) -> torch.Tensor:
    """ImageNet normalisation of `(3, H, W)` RGB in [0, 1]."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=image.dtype)[:, None, None]
    std = torch.tensor(IMAGENET_STD, dtype=image.dtype)[:, None, None]
    return (image - mean) / std


def preprocess_image(source, image_size: int) -> torch.Tensor:
    """Decode, resize the shortest side to `image_size`, centre-crop and normalise: `(3, image_size, image_size)`."""
    return normalize(resize_and_center_crop(decode_image(source), image_size))


def content_key(pixel_values: torch.Tensor) -> bytes:
    """Hash of a preprocessed image, the key of its cached teacher target (16 bytes)."""
    data = pixel_values.detach().cpu().contiguous().numpy().tobytes()
    return hashlib.blake2b(data, digest_size=CONTENT_KEY_BYTES).digest()


# ---------------------------------------------------------------------------------------------------------------------
# Datasets
# ---------------------------------------------------------------------------------------------------------------------


def _sample(pixel_values, valid: bool, sample_id: int, with_keys: bool) -> dict:
    key = torch.frombuffer(bytearray(content_key(pixel_values)), dtype=torch.uint8) if (with_keys and valid) else None
    return {
        "pixel_values": pixel_values,
        "valid": torch.tensor(valid),
        "index": torch.tensor(sample_id, dtype=torch.int64),
        "key": key if key is not None else torch.zeros(CONTENT_KEY_BYTES, dtype=torch.uint8),
    }


def _prepare_or_placeholder(source, image_size: int, description: str) -> tuple[torch.Tensor, bool]:
    try:
        return preprocess_image(source, image_size), True
    except UnreadableImageError as error:
        logger.warning("Skipping unreadable image %s (%s)", description, error)
        return torch.zeros(3, image_size, image_size), False


class DistillationImages(torch.utils.data.Dataset):
    """Map-style training images: each item is a dict of
    `pixel_values` `(3, S, S)` normalised, `valid` (False for an unreadable image, whose pixels are zeros and
    whose loss weight is 0, so that batch shapes and the step count never change), `index` (position in the
    dataset) and `key` `(16,)` uint8 (content hash, zeros unless `with_keys`)."""

    def __init__(self, records, image_column: str, image_size: int, with_keys: bool = False) -> None:
        self.records = records
        self.image_column = image_column
        self.image_size = image_size
        self.with_keys = with_keys

    def __len__(self) -> int:
        return len(self.records)

    def describe(self, index: int) -> str:
        return describe_record(self.records[int(index)][self.image_column], int(index))

    def __getitem__(self, index: int) -> dict:
        source = self.records[int(index)][self.image_column]
        pixel_values, valid = _prepare_or_placeholder(source, self.image_size, describe_record(source, index))
        return _sample(pixel_values, valid, int(index), self.with_keys)


def _stream_sample_id(source) -> int:
    """A stable 63-bit id for a streamed record (there is no index), from its path or its bytes."""
    if isinstance(source, dict):
        seed = (source.get("path") or "").encode() or (source.get("bytes") or b"")[: 1 << 20]
    elif isinstance(source, (str, os.PathLike)):
        seed = str(source).encode()
    else:
        seed = repr(source)[:4096].encode()
    return int.from_bytes(hashlib.blake2b(seed, digest_size=8).digest(), "little") >> 1


class StreamingDistillationImages(torch.utils.data.IterableDataset):
    """Streamed training images (a `datasets.IterableDataset`), items as in [`DistillationImages`]; `index` is
    a stable id derived from the record."""

    def __init__(self, records, image_column: str, image_size: int, with_keys: bool = False) -> None:
        self.records = records
        self.image_column = image_column
        self.image_size = image_size
        self.with_keys = with_keys

    def set_epoch(self, epoch: int) -> None:
        self.records.set_epoch(epoch)  # reshuffles the shard order and the shuffle buffer per epoch

    def __iter__(self):
        for record in self.records:
            source = record[self.image_column]
            sample_id = _stream_sample_id(source)
            pixel_values, valid = _prepare_or_placeholder(source, self.image_size, describe_record(source, sample_id))
            yield _sample(pixel_values, valid, sample_id, self.with_keys)


def describe_record(source, index: int | None = None) -> str:
    """A readable name for an image record: its path when known, else its index."""
    if isinstance(source, dict) and source.get("path"):
        return str(source["path"])
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    return f"item {index}"


def _image_column_of(dataset, requested: str | None) -> str:
    from datasets import Image

    columns = list(dataset.features or {}) if dataset.features is not None else []
    if requested:
        if columns and requested not in columns:
            raise ValueError(
                f"--image_column {requested!r} is not a column of the dataset; columns: {', '.join(columns)}."
            )
        return requested
    for name, feature in (dataset.features or {}).items():
        if isinstance(feature, Image):
            return name
    for name in ("image", "img", "pixel_values"):
        if name in columns:
            return name
    raise ValueError(f"No image column found among {', '.join(columns) or 'no columns'}; name it with --image_column.")


def load_image_records(args: argparse.Namespace):
    """The training records and the image column.

    Returns:
        `(records, image_column)`: a `datasets.Dataset` (or `IterableDataset` with `--streaming`) whose image
        column holds undecoded images (file paths, or `{"bytes", "path"}` records), decoded later by
        [`decode_image`] so that one bad file is skipped instead of ending the run.
    """
    import datasets

    if args.train_dir:
        return datasets.Dataset.from_dict({"image": list_image_files(args.train_dir)}), "image"
    records = datasets.load_dataset(
        args.dataset_name, args.dataset_config_name, split=args.train_split, streaming=args.streaming
    )
    image_column = _image_column_of(records, args.image_column)
    records = records.select_columns([image_column])  # annotations and captions are never decoded
    if isinstance(records.features.get(image_column) if records.features else None, datasets.Image):
        records = records.cast_column(image_column, datasets.Image(decode=False))
    return records, image_column


def split_probe_records(records, image_column: str, args: argparse.Namespace):
    """Held-out probe images and the remaining training records.

    Returns:
        `(train_records, probe_sources)` where `probe_sources` is a list of `(name, source)`: from `--probe_dir`,
        or `--num_probe_images` training images chosen with the seed and removed from training.
    """
    if args.probe_dir:
        return records, [(path, path) for path in list_image_files(args.probe_dir)]
    count = args.num_probe_images
    if count == 0:
        return records, []
    if args.streaming:
        held_out = list(records.take(count))
        sources = [(describe_record(r[image_column], i), r[image_column]) for i, r in enumerate(held_out)]
        return records.skip(count), sources
    if count >= len(records):
        raise ValueError(
            f"--num_probe_images {count} would hold out all {len(records)} training images; lower it, or give "
            "--probe_dir."
        )
    order = np.random.default_rng(args.seed).permutation(len(records))
    held_out, kept = sorted(order[:count].tolist()), sorted(order[count:].tolist())
    sources = [(describe_record(records[i][image_column], i), records[i][image_column]) for i in held_out]
    return records.select(kept), sources


@dataclasses.dataclass
class ProbeImages:
    """Held-out images, decoded once.

    Attributes:
        names: one per readable image.
        pixel_values: `(K, 3, image_size, image_size)` normalised, for the patch cosine to the teacher.
        probe_rgb: K arrays `(P, P, 3)` float32 in [0, 1] at `--probe_image_size`, for the positional probes.
        skipped: names of unreadable images.
    """

    names: list
    pixel_values: torch.Tensor
    probe_rgb: list
    skipped: list

    def __len__(self) -> int:
        return len(self.names)


def prepare_probe_images(sources, image_size: int, probe_image_size: int) -> ProbeImages:
    names, pixel_values, probe_rgb, skipped = [], [], [], []
    for name, source in sources:
        try:
            image = decode_image(source)
        except UnreadableImageError as error:
            logger.warning("Skipping unreadable probe image %s (%s)", name, error)
            skipped.append(name)
            continue
        names.append(name)
        pixel_values.append(normalize(resize_and_center_crop(image, image_size)))
        probe_rgb.append(resize_and_center_crop(image, probe_image_size).permute(1, 2, 0).numpy())
    stacked = torch.stack(pixel_values) if pixel_values else torch.zeros(0, 3, image_size, image_size)
    return ProbeImages(names, stacked, probe_rgb, skipped)


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
        tokens = patch_tokens(teacher, pixel_values, teacher.embeddings.num_prefix_tokens)
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
            temporary = info_path.with_name(f".info-{uuid.uuid4().hex}.tmp")
            temporary.write_text(json.dumps(info, indent=2))
            os.replace(temporary, info_path)
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
    reference = next(t for t in found if t is not None) if any(t is not None for t in found) else None
    if reference is None:  # nothing readable in this batch
        grid = (pixel_values.shape[-2] // _patch_size(teacher)) * (pixel_values.shape[-1] // _patch_size(teacher))
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
        from evaluation.feature_extraction import extract_patch_features
        from evaluation import positional_probe
    except ImportError as error:
        raise ImportError(
            f"The positional probe needs the evaluation extra ({error}): `pip install -e '.[eval]'`, or run with "
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


def most_positional_channels(scores: np.ndarray, count: int = AUTO_BLANK_CHANNEL_COUNT) -> list[int]:
    """The `count` highest-scoring channels, in increasing index order."""
    return sorted(int(c) for c in np.argsort(-np.asarray(scores), kind="stable")[:count])


def positional_probe_r2(model, images) -> float:
    """Mean lr+ud positional-probe R^2 of `model`'s patch features over `images` ((H, W, 3) in [0, 1]) and
    `PROBE_REPEATS` fixed samplings each."""
    extract_patch_features, positional_probe = _evaluation_modules()
    scores = []
    for index, image in enumerate(images):
        features = extract_patch_features(model, image)
        for repeat in range(PROBE_REPEATS):
            scores.append(
                positional_probe.linear_probe(
                    features,
                    ramp=PROBE_RAMP,
                    step=PROBE_STEP,
                    sampling="random",
                    alpha=1.0,
                    holdout=False,
                    seed=index * PROBE_REPEATS + repeat,
                )
            )
    return float(np.mean(scores))


@torch.no_grad()
def mean_patch_cosine(model, pixel_values: torch.Tensor, targets: torch.Tensor, batch_size: int = 16) -> float:
    """Mean cosine similarity between `model`'s patch tokens and `(K, N, C)` targets over `(K, 3, S, S)` images."""
    device = next(model.parameters()).device
    similarities = []
    for start in range(0, pixel_values.shape[0], batch_size):
        batch = pixel_values[start : start + batch_size].to(device)
        tokens = patch_tokens(model, batch, model.embeddings.num_prefix_tokens)
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
# Checkpoints
# ---------------------------------------------------------------------------------------------------------------------


def list_checkpoints(output_dir) -> list[tuple[int, Path]]:
    """Complete checkpoints in `output_dir`, oldest first. A checkpoint is complete once renamed from its
    temporary name; the state file written last is checked too."""
    output_dir = Path(output_dir)
    found = []
    if output_dir.is_dir():
        for path in output_dir.iterdir():
            match = CHECKPOINT_PATTERN.match(path.name)
            if match and path.is_dir() and (path / TRAINING_STATE_FILE).is_file():
                found.append((int(match.group(1)), path))
    return sorted(found)


def find_latest_checkpoint(output_dir) -> Path | None:
    checkpoints = list_checkpoints(output_dir)
    return checkpoints[-1][1] if checkpoints else None


def save_checkpoint(
    accelerator, output_dir, global_step: int, training_state: dict, total_limit: int | None = None
) -> Path:
    """Save the accelerate state (model, optimizer, scheduler, sampler, RNG of every process) and the training
    progress into `output_dir/checkpoint-STEP`, atomically: everything goes to a temporary folder, renamed at the
    end, so that a run killed while saving never leaves a half-written checkpoint that `latest` would pick."""
    output_dir = Path(output_dir)
    final = output_dir / f"checkpoint-{global_step}"
    temporary = output_dir / f".checkpoint-{global_step}.tmp"
    if accelerator.is_main_process and temporary.exists():
        shutil.rmtree(temporary)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(temporary))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        state_path = temporary / TRAINING_STATE_FILE
        state_path.write_text(json.dumps(training_state, indent=2))
        if final.exists():  # the same step saved by an earlier run into this folder
            stale = output_dir / f".checkpoint-{global_step}.old"
            shutil.rmtree(stale, ignore_errors=True)
            os.replace(final, stale)
            os.replace(temporary, final)
            shutil.rmtree(stale, ignore_errors=True)
        else:
            os.replace(temporary, final)
        if total_limit:
            for _, old in list_checkpoints(output_dir)[:-total_limit]:
                shutil.rmtree(old, ignore_errors=True)
        logger.info("Saved checkpoint %s", final)
    accelerator.wait_for_everyone()
    return final


def remove_incomplete_checkpoints(output_dir) -> None:
    """Delete the temporary folders a killed run may have left behind."""
    for path in Path(output_dir).glob(".checkpoint-*"):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)


def resolve_resume_checkpoint(args: argparse.Namespace) -> Path | None:
    if not args.resume_from_checkpoint:
        return None
    if args.resume_from_checkpoint == "latest":
        checkpoint = find_latest_checkpoint(args.output_dir)
        if checkpoint is None:
            logger.info("No checkpoint in %s: starting from scratch.", args.output_dir)
        return checkpoint
    checkpoint = Path(args.resume_from_checkpoint)
    if not (checkpoint / TRAINING_STATE_FILE).is_file():
        raise ValueError(
            f"{checkpoint} is not a complete checkpoint of this script (no {TRAINING_STATE_FILE}); pass a "
            "checkpoint-STEP folder or `latest`."
        )
    return checkpoint


@dataclasses.dataclass
class TrainingProgress:
    """Everything besides the accelerate state that a resumed run needs, saved as JSON in each checkpoint."""

    global_step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    epoch_losses: list = dataclasses.field(default_factory=list)
    epoch_loss_sum: float = 0.0
    epoch_loss_batches: int = 0
    images_seen: int = 0
    skipped_ids: list = dataclasses.field(default_factory=list)
    blank_channels: list | None = None
    teacher_probe_r2: float | None = None
    last_probe: dict = dataclasses.field(default_factory=dict)
    evaluations: list = dataclasses.field(default_factory=list)
    teacher_forward_images: int = 0
    cached_target_hits: int = 0

    @classmethod
    def load(cls, checkpoint) -> "TrainingProgress":
        values = json.loads((Path(checkpoint) / TRAINING_STATE_FILE).read_text())
        known = {field.name for field in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in values.items() if key in known})


# ---------------------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------------------


def _patch_size(model) -> int:
    patch_size = model.config.patch_size
    if isinstance(patch_size, (list, tuple)):
        if len(set(patch_size)) != 1:
            raise ValueError(f"Only square patches are supported; got patch_size={tuple(patch_size)}.")
        patch_size = patch_size[0]
    return int(patch_size)


def load_teacher(source):
    """The teacher, reproducing `source` exactly (its own position scheme), frozen and in eval mode."""
    import convert_checkpoint

    teacher = convert_checkpoint.convert(source, variant="keep-pe")
    teacher.requires_grad_(False)
    return teacher.eval()


def build_student(teacher_source, variant: str, init_from=None):
    """The student: the teacher's (or `init_from`'s) weights as `variant` ("alibi" or "nope"). Every weight
    trains except the mask token, which only masked pre-training uses (it would get no gradient here)."""
    import convert_checkpoint

    student = convert_checkpoint.convert(init_from or teacher_source, variant=variant)
    student.requires_grad_(True)
    student.embeddings.mask_token.requires_grad_(False)
    return student.train()


def check_models(teacher, student, args: argparse.Namespace, warn: bool = True) -> int:
    """Check that teacher and student fit together and with `--image_size`; returns the patch size. `warn`: log
    advice about weak settings (on one process only)."""
    patch_size = _patch_size(teacher)
    if _patch_size(student) != patch_size or student.config.hidden_size != teacher.config.hidden_size:
        raise ValueError(
            f"The student ({args.init_from}) does not match the teacher ({args.teacher}): patch size "
            f"{_patch_size(student)} vs {patch_size}, width {student.config.hidden_size} vs "
            f"{teacher.config.hidden_size}."
        )
    for name in ("image_size", "probe_image_size"):
        size = getattr(args, name)
        if size < patch_size:
            raise ValueError(
                f"--{name} {size} is smaller than one {patch_size} x {patch_size} patch of the teacher; use at least "
                f"{patch_size} (e.g. {16 * patch_size})."
            )
    probe_grid = args.probe_image_size // patch_size
    if warn and (args.probe_dir or args.num_probe_images) and probe_grid * probe_grid // PROBE_STEP**2 < 8:
        logger.warning(
            "--probe_image_size %d gives a %d x %d grid: the probe samples only %d patches (step %d), too few for a "
            "meaningful R^2; use at least %d px.",
            args.probe_image_size,
            probe_grid,
            probe_grid,
            probe_grid * probe_grid // PROBE_STEP**2,
            PROBE_STEP,
            math.ceil(math.sqrt(8) * PROBE_STEP) * patch_size,
        )
    if args.random_roll and args.image_size % patch_size:
        raise ValueError(
            f"--random_roll rolls by whole patches and needs --image_size to be a multiple of {patch_size}; got "
            f"{args.image_size} (use {args.image_size // patch_size * patch_size} or "
            f"{(args.image_size // patch_size + 1) * patch_size})."
        )
    if isinstance(args.blank_channels, list) and any(c >= teacher.config.hidden_size for c in args.blank_channels):
        raise ValueError(
            f"--blank_channels {args.blank_channels} lists channels beyond the teacher's {teacher.config.hidden_size} "
            f"(valid: 0 to {teacher.config.hidden_size - 1})."
        )
    return patch_size


# ---------------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class TrainingResult:
    """What `main` returns: the trained student (unwrapped), the summary written to `train_summary.json` and
    the output folder."""

    model: torch.nn.Module
    summary: dict
    output_dir: Path


def _tracker_config(args: argparse.Namespace) -> dict:
    """Hyperparameters as the scalar types trackers accept."""
    config = {}
    for key, value in sorted(vars(args).items()):
        if isinstance(value, (bool, int, float, str)):
            config[key] = value
        elif value is not None:
            config[key] = str(value)
    return config


def _hyperparameters(
    args: argparse.Namespace, total_batch_size: int, num_train_epochs, max_train_steps: int, blank_channels
) -> dict:
    return {
        "teacher": args.teacher,
        "variant": args.variant,
        "init_from": args.init_from,
        "data": args.train_dir or args.dataset_name,
        "image_size": args.image_size,
        "total_batch_size": total_batch_size,
        "learning_rate": args.learning_rate,
        "weight_decay": args.weight_decay,
        "lr_scheduler": args.lr_scheduler,
        "optimizer": "AdamW",
        "num_train_epochs": num_train_epochs,
        "max_train_steps": max_train_steps,
        "loss": args.loss,
        "blank_channels": list(blank_channels),
        "random_roll": args.random_roll,
        "mixed_precision": args.mixed_precision or "no",
        "seed": args.seed,
    }


def _roll_generator(seed: int, epoch: int, batch_index: int, process_index: int) -> torch.Generator:
    """A generator fixed by the position in training, so that a resumed run rolls exactly as an unbroken one."""
    entropy = np.random.SeedSequence([seed, epoch, batch_index, process_index]).generate_state(2)
    return torch.Generator().manual_seed(int(entropy[0]) << 32 | int(entropy[1]))


def _push_to_hub(output_dir: Path, repo_id: str) -> None:
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, exist_ok=True, repo_type="model")
    api.upload_folder(
        folder_path=str(output_dir),
        repo_id=repo_id,
        repo_type="model",
        ignore_patterns=["checkpoint-*", "checkpoint-*/**", ".checkpoint-*", f"{TRACKER_PROJECT}/**", "*.tmp"],
        commit_message="Distilled ALiBi-DINOv2",
    )
    logger.info("Pushed %s to https://huggingface.co/%s", output_dir, repo_id)


def _setup_logging(accelerator) -> None:
    import datasets
    import transformers

    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%m/%d/%Y %H:%M:%S")
    logger.setLevel(logging.INFO if accelerator.is_local_main_process else logging.WARNING)
    if not accelerator.is_local_main_process:
        datasets.utils.logging.set_verbosity_error()
        transformers.utils.logging.set_verbosity_error()


def _distributed_without_accelerator() -> bool:
    """True for a multi-process launch (`accelerate launch --multi_gpu`, `torchrun`) on a machine with no GPU: the
    processes must then form a CPU (gloo) group, not train as independent copies of the same job."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    xpu = getattr(torch, "xpu", None)
    return not (torch.cuda.is_available() or (xpu is not None and xpu.is_available()))


def _forget_accelerator_settings() -> None:
    """accelerate keeps one process-wide state and refuses a second `Accelerator` with other settings (mixed
    precision, ...). Forgetting it after a run lets a program call `main` again (stage 1 then stage 2); the
    process group itself (`PartialState`) is kept."""
    from accelerate.state import AcceleratorState, GradientState

    for state in (AcceleratorState, GradientState):
        if hasattr(state, "_reset_state"):
            state._reset_state()


def main(argv=None) -> TrainingResult:
    """Run the distillation described by the command-line tokens `argv` (`None`: `sys.argv`)."""
    args = parse_args(argv)
    try:
        return train(args)
    finally:
        _forget_accelerator_settings()


def train(args: argparse.Namespace) -> TrainingResult:
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, broadcast_object_list, gather_object, set_seed
    from tqdm.auto import tqdm
    from transformers import get_scheduler

    output_dir = Path(args.output_dir)
    accelerator = Accelerator(
        cpu=_distributed_without_accelerator(),
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_dir=str(output_dir),
        # Shuffling seeded by (seed + epoch), identical on every process and after a resume.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
    )
    _setup_logging(accelerator)
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        raise RuntimeError(
            f"{launched} processes were launched but accelerate formed a group of {accelerator.num_processes}; each "
            "would train its own copy into the same folder. On CPU-only machines launch with `accelerate launch "
            "--multi_gpu --num_processes N` or `torchrun --nproc_per_node N` (accelerate's `--cpu` runs one process "
            "unless it is given an MPI host file)."
        )
    set_seed(args.seed)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        remove_incomplete_checkpoints(output_dir)
    accelerator.wait_for_everyone()
    started = time.perf_counter()

    # Models: the first process downloads, the others read its cache.
    with accelerator.main_process_first():
        teacher = load_teacher(args.teacher)
        student = build_student(args.teacher, args.variant, args.init_from)
    patch_size = check_models(teacher, student, args, warn=accelerator.is_main_process)
    teacher.to(accelerator.device)
    grid_size = (args.image_size // patch_size, args.image_size // patch_size)

    # Data: held-out probe images first, then the training set without them.
    with accelerator.main_process_first():
        records, image_column = load_image_records(args)
        records, probe_sources = split_probe_records(records, image_column, args)
    if args.max_train_samples:
        if args.streaming:
            records = records.take(args.max_train_samples)
        else:
            records = records.select(range(min(args.max_train_samples, len(records))))
    probe = prepare_probe_images(probe_sources, args.image_size, args.probe_image_size)
    if probe_sources and not len(probe):
        raise ValueError("None of the probe images could be read; check --probe_dir.")

    # Resume: the training progress now, the accelerate state once everything is prepared.
    checkpoint = resolve_resume_checkpoint(args)
    progress = TrainingProgress.load(checkpoint) if checkpoint else TrainingProgress()

    blank_channels = args.blank_channels
    if blank_channels == "auto":
        blank_channels = progress.blank_channels
        if blank_channels is None:
            chosen = [None]
            if accelerator.is_main_process:
                scores = rank_positional_channels(teacher, probe.probe_rgb)
                chosen = [most_positional_channels(scores)]
                logger.info(
                    "Most positional teacher channels (blanked in the target): %s, R^2 %s",
                    chosen[0],
                    [round(float(scores[c]), 3) for c in chosen[0]],
                )
            blank_channels = broadcast_object_list(chosen)[0]
    progress.blank_channels = list(blank_channels)

    with_keys = args.cache_teacher_embeddings is not None
    if args.streaming:
        records = records.shuffle(seed=args.seed, buffer_size=10_000)
        train_dataset = StreamingDistillationImages(records, image_column, args.image_size, with_keys)
        dataloader = DataLoader(
            train_dataset, batch_size=args.per_device_train_batch_size, num_workers=args.dataloader_num_workers
        )
    else:
        train_dataset = DistillationImages(records, image_column, args.image_size, with_keys)
        if len(train_dataset) == 0:
            raise ValueError("No training images are left after holding out the probe images.")
        dataloader = DataLoader(
            train_dataset,
            batch_size=args.per_device_train_batch_size,
            shuffle=True,
            num_workers=args.dataloader_num_workers,
            pin_memory=accelerator.device.type == "cuda",
            persistent_workers=args.dataloader_num_workers > 0,
        )

    # Steps: with a length, epochs give the steps or --max_train_steps gives the epochs (as in transformers' examples).
    if args.streaming:
        max_train_steps, num_train_epochs = args.max_train_steps, None
    else:
        batches_per_process = math.ceil(len(dataloader) / accelerator.num_processes)
        steps_per_epoch = math.ceil(batches_per_process / args.gradient_accumulation_steps)
        max_train_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch
        num_train_epochs = math.ceil(max_train_steps / steps_per_epoch)

    optimizer = torch.optim.AdamW(
        [p for p in student.parameters() if p.requires_grad], lr=args.learning_rate, weight_decay=args.weight_decay
    )
    # The accelerate-wrapped scheduler steps once per process on every optimiser step.
    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.num_warmup_steps * accelerator.num_processes,
        num_training_steps=max_train_steps * accelerator.num_processes,
    )
    student, optimizer, dataloader, lr_scheduler = accelerator.prepare(student, optimizer, dataloader, lr_scheduler)
    if checkpoint:
        logger.info("Resuming from %s (step %d)", checkpoint, progress.global_step)
        accelerator.load_state(str(checkpoint))
    unwrapped_student = accelerator.unwrap_model(student)
    num_prefix_tokens = unwrapped_student.embeddings.num_prefix_tokens

    cache = None
    if args.cache_teacher_embeddings:
        fingerprint = teacher_fingerprint(teacher, args.image_size, accelerator.mixed_precision)
        cache_info = {
            "teacher": str(args.teacher),
            "image_size": args.image_size,
            "grid": list(grid_size),
            "hidden_size": teacher.config.hidden_size,
            "mixed_precision": accelerator.mixed_precision,
            "dtype": "float16",
        }
        if accelerator.is_main_process:
            TeacherTargetCache(args.cache_teacher_embeddings, fingerprint, cache_info)
        accelerator.wait_for_everyone()
        cache = TeacherTargetCache(args.cache_teacher_embeddings, fingerprint, cache_info, accelerator.process_index)
        logger.info("Teacher target cache %s: %d targets stored", cache.directory, len(cache))

    total_batch_size = args.per_device_train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    hyperparameters = _hyperparameters(args, total_batch_size, num_train_epochs, max_train_steps, blank_channels)
    if args.report_to != "none":
        accelerator.init_trackers(TRACKER_PROJECT, config=_tracker_config(args))

    logger.info("***** Distillation *****")
    start_from = f" from {args.init_from}" if args.init_from else ""
    logger.info("  Teacher = %s, student = %s%s", args.teacher, args.variant, start_from)
    train_count = "streamed" if args.streaming else len(train_dataset)
    logger.info("  Training images = %s, probe images = %d", train_count, len(probe))
    logger.info("  Epochs = %s, total batch size = %d, steps = %d", num_train_epochs, total_batch_size, max_train_steps)
    logger.info("  Blanked target channels = %s", list(blank_channels) or "none")

    # Held-out reference numbers: the teacher's probe score and the targets for the patch cosine.
    probe_targets = None
    if len(probe) and accelerator.is_main_process:
        probe_pixel_values = probe.pixel_values.to(accelerator.device)
        probe_targets = batch_targets(teacher, probe_pixel_values, blank_channels=blank_channels).cpu()
        if progress.teacher_probe_r2 is None:
            progress.teacher_probe_r2 = positional_probe_r2(teacher, probe.probe_rgb)

    def run_probe(step: int) -> None:
        if len(probe) and accelerator.is_main_process:
            results = evaluate_student(accelerator.unwrap_model(student), probe, probe_targets)
            progress.last_probe = {"step": step, **results}
            progress.evaluations.append(progress.last_probe)
            accelerator.log(
                {
                    "probe/r2_lr_ud": results["probe_r2_lr_ud"],
                    "probe/patch_cosine": results["patch_cosine_to_teacher"],
                    "probe/teacher_r2_lr_ud": progress.teacher_probe_r2,
                },
                step=step,
            )
            logger.info(
                "step %d: probe R^2 (lr+ud) %.3f (teacher %.3f), patch cosine to teacher %.4f",
                step,
                results["probe_r2_lr_ud"],
                progress.teacher_probe_r2,
                results["patch_cosine_to_teacher"],
            )
        accelerator.wait_for_everyone()

    skipped_ids = set(progress.skipped_ids)

    def gather_skipped() -> set:
        gathered = gather_object(sorted(skipped_ids)) if accelerator.num_processes > 1 else sorted(skipped_ids)
        return set(int(i) for i in gathered)

    def checkpoint_now() -> None:
        nonlocal skipped_ids
        if cache is not None:
            cache.flush()
        skipped_ids = gather_skipped()
        progress.skipped_ids = sorted(skipped_ids)
        progress.epoch_loss_sum = float(accelerator.reduce(epoch_loss_sum.clone(), "mean"))
        progress.epoch_loss_batches = epoch_loss_batches
        progress.images_seen = images_seen_before + int(accelerator.reduce(local_images.clone(), "sum"))
        record_cache_counts()
        state = dataclasses.asdict(progress)
        save_checkpoint(accelerator, output_dir, progress.global_step, state, args.checkpoints_total_limit)

    cache_counts_at_start = (progress.teacher_forward_images, progress.cached_target_hits)
    local_teacher_images = 0

    def record_cache_counts() -> None:
        if cache is not None:
            counts = torch.tensor([cache.computed, cache.hits], device=accelerator.device)
        else:
            counts = torch.tensor([local_teacher_images, 0], device=accelerator.device)
        computed, hits = accelerator.reduce(counts, "sum").tolist()
        progress.teacher_forward_images = cache_counts_at_start[0] + int(computed)
        progress.cached_target_hits = cache_counts_at_start[1] + int(hits)

    progress_bar = tqdm(
        total=max_train_steps,
        initial=progress.global_step,
        disable=not accelerator.is_local_main_process,
        desc="distilling",
    )
    if progress.global_step == 0:
        run_probe(0)

    # Running sums stay on the device; they are read only when logging, at checkpoints and at epoch ends.
    epoch_loss_sum = torch.tensor(progress.epoch_loss_sum, device=accelerator.device)
    epoch_loss_batches = progress.epoch_loss_batches
    window_loss = torch.zeros((), device=accelerator.device)
    window_batches = 0
    local_images = torch.zeros((), device=accelerator.device, dtype=torch.int64)
    images_seen_before = progress.images_seen
    window_images_start, window_start = 0, time.perf_counter()
    train_started = time.perf_counter()
    resume_epoch, resume_batches = progress.epoch, progress.batches_in_epoch
    student.train()

    epoch = progress.epoch
    while progress.global_step < max_train_steps and (num_train_epochs is None or epoch < num_train_epochs):
        dataloader.set_epoch(epoch)
        if cache is not None:
            cache.refresh()
        batches = dataloader
        batch_index = 0
        if epoch == resume_epoch and resume_batches:
            # Same shuffling as the interrupted run (seed + epoch); the batches it already trained on are skipped.
            batches = accelerator.skip_first_batches(dataloader, resume_batches)
            batch_index = resume_batches
        batches_this_epoch = 0
        for batch in batches:
            batch_index += 1
            batches_this_epoch += 1
            valid = batch["valid"]
            with accelerator.accumulate(student):
                targets = batch_targets(
                    teacher,
                    batch["pixel_values"],
                    valid,
                    batch["key"],
                    cache,
                    blank_channels,
                    autocast=accelerator.autocast,
                )
                if cache is None:
                    local_teacher_images += int(batch["pixel_values"].shape[0])
                pixel_values = batch["pixel_values"]
                if args.random_roll:
                    generator = _roll_generator(args.seed, epoch, batch_index, accelerator.process_index)
                    shifts = random_patch_shifts(pixel_values.shape[0], grid_size, generator)
                    pixel_values, targets = roll_by_patches(pixel_values, targets, shifts, patch_size)
                with accelerator.autocast():
                    student_tokens = patch_tokens(student, pixel_values, num_prefix_tokens)
                loss = distillation_loss(student_tokens, targets, valid, args.loss)
                accelerator.backward(loss)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)

            detached = loss.detach()
            epoch_loss_sum += detached
            epoch_loss_batches += 1
            window_loss += detached
            window_batches += 1
            local_images += valid.sum()
            if not bool(valid.all()):
                skipped_ids.update(batch["index"][~valid].tolist())

            if not accelerator.sync_gradients:
                continue
            progress.global_step += 1
            progress.epoch, progress.batches_in_epoch = epoch, batch_index
            progress_bar.update(1)
            step = progress.global_step

            if step % args.logging_steps == 0 or step == max_train_steps:
                mean_loss = float(accelerator.reduce(window_loss / max(window_batches, 1), "mean"))
                images_now = int(accelerator.reduce(local_images.clone(), "sum"))
                seconds = time.perf_counter() - window_start
                skipped_count = len(gather_skipped())
                accelerator.log(
                    {
                        "train/loss": mean_loss,
                        "train/learning_rate": lr_scheduler.get_last_lr()[0],
                        "train/images_per_second": (images_now - window_images_start) / max(seconds, 1e-9),
                        "train/skipped_images": skipped_count,
                        "train/epoch": epoch + batch_index / max(len(dataloader), 1) if not args.streaming else epoch,
                    },
                    step=step,
                )
                progress_bar.set_postfix(loss=f"{mean_loss:.4f}", skipped=skipped_count)
                window_loss.zero_()
                window_batches = 0
                window_images_start, window_start = images_now, time.perf_counter()
            if step % args.probe_every_n_steps == 0 and step != max_train_steps:
                run_probe(step)
            if isinstance(args.checkpointing_steps, int) and step % args.checkpointing_steps == 0:
                checkpoint_now()
            if step >= max_train_steps:
                break

        if args.streaming and batches_this_epoch == 0 and not (epoch == resume_epoch and resume_batches):
            raise ValueError(f"The dataset yielded no batch in epoch {epoch}; check --dataset_name and --train_split.")
        # Epoch bookkeeping (a partial last epoch included), then the next epoch starts from its first batch.
        epoch_mean = float(accelerator.reduce(epoch_loss_sum / max(epoch_loss_batches, 1), "mean"))
        epoch_finished = progress.global_step < max_train_steps or (
            not args.streaming and batch_index >= len(dataloader)
        )
        if epoch_loss_batches:
            progress.epoch_losses.append(epoch_mean)
            accelerator.log({"train/epoch_loss": epoch_mean}, step=progress.global_step)
        epoch_loss_sum.zero_()
        epoch_loss_batches = 0
        if cache is not None:
            cache.flush()
            accelerator.wait_for_everyone()
        if epoch_finished:
            epoch += 1
            progress.epoch, progress.batches_in_epoch = epoch, 0
        if args.checkpointing_steps == "epoch" and epoch_finished:
            checkpoint_now()
    progress_bar.close()
    train_seconds = time.perf_counter() - train_started

    # Final numbers, model folder and summary.
    if cache is not None:
        cache.flush()
    if not progress.last_probe or progress.last_probe.get("step") != progress.global_step:
        run_probe(progress.global_step)
    skipped_ids = gather_skipped()
    progress.skipped_ids = sorted(skipped_ids)
    total_images = int(accelerator.reduce(local_images.clone(), "sum"))
    progress.images_seen = images_seen_before + total_images
    record_cache_counts()
    accelerator.wait_for_everyone()

    model = accelerator.unwrap_model(student)
    summary = {}
    if accelerator.is_main_process:
        import convert_checkpoint

        if isinstance(train_dataset, DistillationImages):
            skipped_files = sorted({train_dataset.describe(i) for i in skipped_ids})
        else:
            skipped_files = [f"streamed item {i}" for i in sorted(skipped_ids)]
        skipped_files += [f"{name} (probe)" for name in probe.skipped]
        evaluation_results = {}
        if progress.last_probe:
            probe_name = f"positional probe R2 lr+ud, held-out, {args.probe_image_size} px"
            evaluation_results = {
                f"{probe_name} (student)": progress.last_probe["probe_r2_lr_ud"],
                f"{probe_name} (teacher)": progress.teacher_probe_r2,
                "patch cosine to teacher, held-out": progress.last_probe["patch_cosine_to_teacher"],
            }
        save_options = dict(
            base_model=str(args.teacher), hyperparameters=hyperparameters, evaluation_results=evaluation_results
        )
        if args.push_to_hub and "repo_id" in inspect.signature(convert_checkpoint.save_model_folder).parameters:
            save_options["repo_id"] = args.hub_model_id
        convert_checkpoint.save_model_folder(model, output_dir, **save_options)
        summary = {
            "global_step": progress.global_step,
            "max_train_steps": max_train_steps,
            "num_train_epochs": num_train_epochs,
            "epochs_completed": progress.epoch,
            "epoch_losses": progress.epoch_losses,
            "final_epoch_loss": progress.epoch_losses[-1] if progress.epoch_losses else None,
            "images_seen": progress.images_seen,
            "images_per_second": total_images / max(train_seconds, 1e-9),
            "train_runtime_s": train_seconds,
            "total_runtime_s": time.perf_counter() - started,
            "num_processes": accelerator.num_processes,
            "total_batch_size": total_batch_size,
            "skipped_images": len(skipped_files),
            "skipped_files": skipped_files,
            "blank_channels": list(blank_channels),
            "probe": {
                "images": len(probe),
                "image_size": args.probe_image_size,
                "teacher_probe_r2_lr_ud": progress.teacher_probe_r2,
                **progress.last_probe,
            },
            "evaluations": progress.evaluations,
            "teacher_forward_images": progress.teacher_forward_images,
            "cached_target_hits": progress.cached_target_hits,
            "cache_dir": str(cache.directory) if cache is not None else None,
            "resumed_from": str(checkpoint) if checkpoint else None,
            "hyperparameters": hyperparameters,
            "args": _tracker_config(args),
        }
        (output_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
        if skipped_files:
            logger.warning("Skipped %d unreadable image(s): %s", len(skipped_files), ", ".join(skipped_files[:20]))
        else:
            logger.info("Skipped 0 images: every image was readable.")
        logger.info("Saved the distilled model and %s to %s", SUMMARY_FILE, output_dir)
        if args.push_to_hub:
            _push_to_hub(output_dir, args.hub_model_id)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return TrainingResult(model=model, summary=summary, output_dir=output_dir)


if __name__ == "__main__":
    main()
