"""Every setting of a linear-probe run: the keys of the JSON / YAML configs and the command-line options.

:class:`LinearSegmentationConfig` is the project's shared :class:`~alibi_dinov2.training.arguments.RunArguments`
(``--output_dir``, ``--seed``, ``--per_device_train_batch_size``, ``--num_train_epochs``, ``--max_train_steps``,
``--learning_rate``, ``--mixed_precision``, ``--checkpointing_steps``, ``--push_to_hub``, ...) with the probe's own
defaults (50 epochs at lr 1e-3, 16 images per device, a checkpoint at the end of every epoch) and its own settings
(the backbone, the data source, the classes, the feature cache, the robustness mode).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from alibi_dinov2.cli import VOCABULARY, did_you_mean, option_hint
from alibi_dinov2.errors import InputError
from alibi_dinov2.training.arguments import RunArguments
from evaluation.linear_segmentation.datasets import RESIZE_MODES


TRANSFORMS: tuple[str, ...] = ("none", "flip_ud", "roll", "rot90")
# This command's earlier names of the shared run options (RunArguments); refused, naming the new one, like the other
# spellings of the project's vocabulary (completed below, once the settings are known).
RENAMED_SETTINGS: dict[str, str] = {"num_workers": "dataloader_num_workers"}


def _setting(default: Any, help: str):
    """A field with its --help text in the metadata (where HfArgumentParser reads it)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class LinearSegmentationConfig(RunArguments):
    """Every setting of a linear-probe run; the keys of the JSON configs and the command-line options."""

    # Shared run options with the probe's defaults (the other shared ones keep RunArguments' defaults).
    output_dir: str = _setting(
        "outputs/linseg",
        "folder of results.json, examples.png, probe/ and the feature cache (checkpoints and logs: OUTPUT_DIR-run)",
    )
    seed: int = _setting(0, "seed of the head initialisation and of the data order")
    per_device_train_batch_size: int = _setting(16, "training images per device and optimiser step")
    num_train_epochs: int = _setting(50, "training epochs")
    learning_rate: float = _setting(1e-3, "AdamW learning rate")
    checkpointing_steps: str | None = _setting(
        "epoch",
        "save the training state at the end of every `epoch`, or every N optimiser steps, into "
        "OUTPUT_DIR-run/checkpoints/checkpoint_<step> (either way also where --max_train_steps stops; null: never)",
    )
    report_to: str = _setting(
        "none",
        "accelerate tracker(s) of the training loss (logs in OUTPUT_DIR-run/logs): tensorboard, wandb, all, or none",
    )
    # The backbone and the data
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
    # Evaluation and the feature cache
    per_device_eval_batch_size: int = _setting(16, "images per device in evaluation and feature caching")
    cache_features: bool = _setting(
        True, "compute backbone features once (float16 on disk) and reuse them every epoch"
    )
    feature_cache_dir: str | None = _setting(None, "folder of the feature cache (default OUTPUT_DIR/feature_cache)")
    max_eval_samples: int | None = _setting(None, "use only the first N validation samples (quick runs)")
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
    no_progress: bool = _setting(False, "no progress bar")
    description: str | None = _setting(None, "free text kept with the results")

    def __post_init__(self) -> None:
        """The shared checks (RunArguments), then the probe's own values; see :func:`validate_config` for the
        settings a run needs (backbone, data source, classes)."""
        super().__post_init__()
        if self.gradient_accumulation_steps != 1:
            raise InputError(
                "--gradient_accumulation_steps: the linear probe takes one optimiser step per batch; raise "
                f"--per_device_train_batch_size instead (got {self.gradient_accumulation_steps})."
            )
        for name in ("image_size", "per_device_eval_batch_size"):
            if int(getattr(self, name)) < 1:
                raise InputError(f"--{name} must be >= 1; got {getattr(self, name)}.")
        if self.max_eval_samples is not None and int(self.max_eval_samples) < 1:
            raise InputError(f"--max_eval_samples must be >= 1 when set; got {self.max_eval_samples}.")
        if self.num_example_images < 0:
            raise InputError(f"--num_example_images must be >= 0; got {self.num_example_images}.")
        if self.resize_mode not in RESIZE_MODES:
            raise InputError(f"--resize_mode must be one of {RESIZE_MODES}; got {self.resize_mode!r}.")
        for name in self.robustness_transforms:
            if name not in TRANSFORMS[1:]:
                raise InputError(
                    f"Unknown robustness transform {name!r}; choose from {TRANSFORMS[1:]}"
                    f"{did_you_mean(name, TRANSFORMS)}."
                )


FIELD_HELP: dict[str, str] = {
    item.name: item.metadata["help"] for item in dataclasses.fields(LinearSegmentationConfig)
}
RENAMED_SETTINGS.update({old: new for old, new in VOCABULARY.items() if new in FIELD_HELP and old not in FIELD_HELP})


def validate_config(config: LinearSegmentationConfig, require_model: bool = True) -> LinearSegmentationConfig:
    """Check that a configuration describes a run (a backbone, one data source, the classes); raises InputError
    (a ValueError) naming the problem and the fix. Single values are checked when the config is made."""
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
            f"{len(config.class_names)} class_names given for num_classes={config.num_classes}; give one name per "
            "class."
        )
    if 0 <= config.ignore_index < config.num_classes:
        raise InputError(
            f"ignore_index {config.ignore_index} is a class index (num_classes={config.num_classes}); use a value "
            "outside 0 .. num_classes - 1, e.g. 255."
        )
    return config


def make_config(*sources: dict) -> LinearSegmentationConfig:
    """Defaults, updated by each mapping in turn (config file, then command line), validated.

    Raises:
        InputError: a key that is no setting (named, with the closest setting), or a bad value.
    """
    values: dict[str, Any] = {}
    for source in sources:
        values.update(source)
    for key in values:
        if key not in FIELD_HELP:
            hint = option_hint(key, FIELD_HELP, RENAMED_SETTINGS)
            raise InputError(f"Unknown key {key!r}{hint}; `--help` lists the settings.")
    return validate_config(LinearSegmentationConfig(**values))
