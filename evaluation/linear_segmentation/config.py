"""Every setting of a linear-probe run: the keys of the JSON / YAML configs and the command-line options."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from alibi_dinov2.cli import did_you_mean
from alibi_dinov2.cli import load_config_file as read_config_file
from alibi_dinov2.errors import InputError
from evaluation.linear_segmentation.datasets import RESIZE_MODES


TRANSFORMS: tuple[str, ...] = ("none", "flip_ud", "roll", "rot90")
MIXED_PRECISION_CHOICES = ("no", "fp16", "bf16")


def _setting(default: Any, help: str):
    """A field with its --help text in the metadata (where HfArgumentParser reads it)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class LinearSegmentationConfig:
    """Every setting of a linear-probe run; the keys of the JSON configs and the command-line options."""

    model: str | None = _setting(
        None, "Hub id or local folder of the frozen backbone (AutoModel, trust_remote_code=True)"
    )
    dataset_name: str | None = _setting(
        None, "Hub dataset name (datasets.load_dataset) or a save_to_disk folder; exclusive with --data_dir"
    )
    dataset_config_name: str | None = _setting(None, "configuration name of the Hub dataset, if it has several")
    dataset_revision: str | None = _setting(
        None, "branch, tag or commit of the Hub dataset (refs/convert/parquet for script-only datasets)"
    )
    data_dir: str | None = _setting(
        None,
        "local folder: ROOT/<split>/images/x.jpg + ROOT/<split>/masks/x.png, a VOCdevkit/VOC20xx folder or "
        "ADEChallengeData2016",
    )
    train_split: str = _setting("train", "split to train on")
    val_split: str = _setting("validation", "split to score (mIoU)")
    image_column: str = _setting("image", "image column of a Hub / saved dataset")
    mask_column: str = _setting("label", "mask column of a Hub / saved dataset (class indices per pixel)")
    num_classes: int | None = _setting(None, "number of classes (labels 0 .. num_classes - 1); required")
    class_names: list[str] | None = _setting(None, "names of the classes, for results.json")
    ignore_index: int = _setting(255, "label value of unlabelled pixels, left out of the loss and the scores")
    reduce_labels: bool = _setting(False, "masks whose 0 means unlabelled (ADE20K): 0 -> ignore index, v -> v - 1")
    image_size: int = _setting(
        518, "side of the square network input in pixels; a multiple of the patch size (518 = 37 x 14)"
    )
    resize_mode: Literal["resize", "center_crop"] = _setting(
        "resize", "'resize' squashes to the square, 'center_crop' resizes the shorter side and crops the centre"
    )
    epochs: int = _setting(50, "training epochs")
    batch_size: int = _setting(16, "training images per device and step")
    eval_batch_size: int = _setting(16, "images per device in evaluation and feature caching")
    learning_rate: float = _setting(1e-3, "AdamW learning rate")
    weight_decay: float = _setting(0.01, "AdamW weight decay")
    seed: int = _setting(0, "seed of the head initialisation and of the data order")
    cache_features: bool = _setting(
        True, "compute backbone features once (float16 on disk) and reuse them every epoch"
    )
    feature_cache_dir: str | None = _setting(None, "folder of the feature cache (default OUTPUT_DIR/feature_cache)")
    mixed_precision: Literal["no", "fp16", "bf16"] = _setting("no", "Accelerate mixed precision: no, fp16 or bf16")
    cpu: bool = _setting(False, "run on the CPU even when a GPU is available")
    num_workers: int | None = _setting(
        None, "DataLoader worker processes per process (default 4, capped by the CPUs available to each process)"
    )
    checkpoint_every_steps: int | None = _setting(
        None, "also checkpoint every this many optimiser steps (a checkpoint ends every epoch)"
    )
    checkpoints_total_limit: int = _setting(2, "keep this many checkpoints (0 keeps all)")
    max_steps: int | None = _setting(
        None, "stop training after this many optimiser steps in total (resume later to continue)"
    )
    max_train_samples: int | None = _setting(None, "use only the first N training samples (quick runs)")
    max_eval_samples: int | None = _setting(None, "use only the first N validation samples (quick runs)")
    strict: bool = _setting(False, "fail on the first unreadable or too-small image instead of skipping it")
    robustness: bool = _setting(
        False, "also score the probe on transformed inputs (flip_ud, roll, rot90) with the transform undone"
    )
    robustness_transforms: list[str] = _setting(
        list(TRANSFORMS[1:]), f"transforms of the robustness mode, from {', '.join(TRANSFORMS[1:])}"
    )
    roll_shift_patches: int | None = _setting(
        None, "roll distance in whole patches along both axes (default: half the patch grid)"
    )
    num_example_images: int = _setting(4, "validation images in examples.png (0 for no figure)")
    output_dir: str = _setting(
        "outputs/linseg", "folder of results.json, examples.png, probe/, checkpoints/ and the feature cache"
    )
    resume_from_checkpoint: str | None = _setting(
        None, "'latest' (newest checkpoint in OUTPUT_DIR/checkpoints, if any) or a checkpoint folder"
    )
    push_to_hub: bool = _setting(
        False, "upload OUTPUT_DIR (without checkpoints/, logs/ and the feature cache) to the Hub"
    )
    hub_model_id: str | None = _setting(None, "Hub repository of --push_to_hub (default: the name of OUTPUT_DIR)")
    hub_private_repo: bool = _setting(False, "create the --push_to_hub repository as private")
    disable_progress_bars: bool = _setting(False, "no tqdm progress bars")
    description: str | None = _setting(None, "free text kept with the results")


FIELD_HELP: dict[str, str] = {
    item.name: item.metadata["help"] for item in dataclasses.fields(LinearSegmentationConfig)
}


def validate_config(config: LinearSegmentationConfig, require_model: bool = True) -> LinearSegmentationConfig:
    """Check a configuration; raises InputError (a ValueError) naming the problem and the fix."""
    if require_model and not config.model:
        raise InputError("No backbone: set --model to a Hub id or a local model folder.")
    if config.dataset_name is None and config.data_dir is None:
        raise InputError(
            "No data source: set --dataset_name (a Hub dataset or a save_to_disk folder) "
            "or --data_dir (a local folder "
            "with <split>/images and <split>/masks, or a VOCdevkit/VOC20xx folder)."
        )
    if config.dataset_name is not None and config.data_dir is not None:
        raise InputError("Both --dataset_name and --data_dir are set; keep one of them (set the other to null).")
    if config.num_classes is None or int(config.num_classes) < 2:
        raise InputError(f"--num_classes must be an integer >= 2; got {config.num_classes!r}.")
    if config.class_names is not None and len(config.class_names) != config.num_classes:
        raise InputError(
            f"{len(config.class_names)} class_names given for num_classes={config.num_classes}; "
            "give one name per class."
        )
    if 0 <= config.ignore_index < config.num_classes:
        raise InputError(
            f"ignore_index {config.ignore_index} is a class index (num_classes={config.num_classes}); use a value "
            "outside 0 .. num_classes - 1, e.g. 255."
        )
    for name in ("image_size", "epochs", "batch_size", "eval_batch_size"):
        if int(getattr(config, name)) < 1:
            raise InputError(f"--{name} must be >= 1; got {getattr(config, name)}.")
    for name in ("max_steps", "checkpoint_every_steps", "max_train_samples", "max_eval_samples"):
        value = getattr(config, name)
        if value is not None and int(value) < 1:
            raise InputError(f"--{name} must be >= 1 when set; got {value}.")
    if config.learning_rate <= 0 or config.weight_decay < 0:
        raise InputError("--learning_rate must be > 0 and --weight_decay >= 0.")
    if config.resize_mode not in RESIZE_MODES:
        raise InputError(f"--resize_mode must be one of {RESIZE_MODES}; got {config.resize_mode!r}.")
    if config.mixed_precision not in MIXED_PRECISION_CHOICES:
        raise InputError(
            f"--mixed_precision must be one of {MIXED_PRECISION_CHOICES}; got {config.mixed_precision!r}."
        )
    for name in config.robustness_transforms:
        if name not in TRANSFORMS[1:]:
            raise InputError(
                f"Unknown robustness transform {name!r}; choose from {TRANSFORMS[1:]}{did_you_mean(name, TRANSFORMS)}."
            )
    if (config.num_workers or 0) < 0 or config.num_example_images < 0 or config.checkpoints_total_limit < 0:
        raise InputError("--num_workers, --num_example_images and --checkpoints_total_limit must be >= 0.")
    return config


def load_config_file(path) -> dict:
    """Settings from a JSON or YAML config file; raises InputError for unknown keys (with the closest known key)."""
    values = read_config_file(path)
    known = FIELD_HELP.keys()
    for key in values:
        if key not in known:
            raise InputError(
                f"Unknown key {key!r} in {path}{did_you_mean(key, known)}. Known keys: {', '.join(known)}."
            )
    return values


def make_config(*sources: dict) -> LinearSegmentationConfig:
    """Defaults, updated by each mapping in turn (config file, then command line), validated."""
    values: dict[str, Any] = {}
    for source in sources:
        values.update(source)
    unknown = [key for key in values if key not in FIELD_HELP]
    if unknown:
        raise InputError(f"Unknown settings {unknown}{did_you_mean(unknown[0], FIELD_HELP)}.")
    return validate_config(LinearSegmentationConfig(**values))
