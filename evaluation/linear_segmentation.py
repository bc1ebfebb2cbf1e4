"""Semantic-segmentation linear probes on frozen ViT patch features (paper Table 3, S7), with a command line.

A frozen backbone (DINOv2 with or without registers, ALiBi-DINOv2, or another transformers ViT giving patch
tokens, loaded with ``AutoModel.from_pretrained(name, trust_remote_code=True)``) turns each image into a
``(C, h, w)`` map of patch features. A BatchNorm + 1x1 linear classifier maps them to class logits, which are
bilinearly upsampled to the label resolution and trained with cross-entropy (ignore index 255 by default) and
AdamW (lr 1e-3, weight decay 0.01). The score is the mIoU on the validation split.

Bilinear upsampling and the 1x1 classifier are both linear (the upsampling weights sum to one), so upsampling
the logits equals upsampling the features and then classifying: the head does the former, which needs
``num_classes`` instead of ``C`` channels at full resolution. BatchNorm statistics are taken over patch tokens.

Command line::

    python -m evaluation.linear_segmentation --model NAME --config configs/linear_seg_voc2012.json \\
        --output_dir outputs/linseg [--robustness] [--resume_from_checkpoint latest]

Every configuration key is also an option (``--help`` lists them); options given on the command line override
the JSON file. Training runs under Accelerate (``accelerate launch -m evaluation.linear_segmentation ...`` for
several GPUs; ``--mixed_precision bf16``). Outputs in ``--output_dir``:

* ``results.json``: validation mIoU (classes present in the ground truth or the prediction), per-class IoU,
  pixel accuracy, training losses and, with ``--robustness``, the mIoU per input transform;
* ``examples.png``: validation images | ground truth | prediction;
* ``probe/``: the trained head (``head.safetensors`` + ``probe_config.json``), see :class:`LinearSegmentationProbe`;
* ``checkpoints/checkpoint_<step>``: ``accelerator.save_state`` folders, written atomically (a temporary folder
  renamed when complete), the last ``checkpoints_total_limit`` kept;
* ``feature_cache/<split>``: backbone features in float16, computed once and reused across epochs and runs.

Data sources (see :mod:`evaluation.segmentation_data`): a Hub dataset name or ``save_to_disk`` folder
(``--dataset_name``, with ``--image_column`` / ``--mask_column``), or a local folder (``--data_dir``) laid out as
``ROOT/<split>/images/x.jpg`` + ``ROOT/<split>/masks/x.png``, or a ``VOCdevkit/VOC20xx`` folder.

Robustness mode (``--robustness``): each validation image is transformed (``flip_ud``, ``roll`` by whole
patches, ``rot90``), its features are extracted, the transform is undone on the feature map and the trained probe
is applied; the mIoU per transform is reported next to the untransformed baseline (``none``). ALiBi-DINOv2 with
wrap-around distances is exactly equivariant to rolls by whole patches, so its ``roll`` score equals the baseline.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import inspect
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from evaluation.feature_extraction import patch_size_of, prefix_token_count, resolve_backbone
from evaluation.segmentation_data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    RESIZE_MODES,
    SegmentationDataset,
    denormalise_image,
    load_segmentation_split,
)

PathLike = Union[str, os.PathLike]

TRANSFORMS: tuple[str, ...] = ("none", "flip_ud", "roll", "rot90")
MIXED_PRECISION_CHOICES = ("no", "fp16", "bf16")
CHECKPOINT_PREFIX = "checkpoint_"
_CACHE_FORMAT_VERSION = 1


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------
@dataclass
class LinearSegmentationConfig:
    """Every setting of a linear-probe run; the keys of the JSON configs and the command-line options."""

    model: str | None = None
    dataset_name: str | None = None
    dataset_config_name: str | None = None
    dataset_revision: str | None = None
    data_dir: str | None = None
    train_split: str = "train"
    val_split: str = "validation"
    image_column: str = "image"
    mask_column: str = "label"
    num_classes: int | None = None
    class_names: list[str] | None = None
    ignore_index: int = 255
    reduce_labels: bool = False
    image_size: int = 518
    resize_mode: str = "resize"
    epochs: int = 50
    batch_size: int = 16
    eval_batch_size: int = 16
    learning_rate: float = 1e-3
    weight_decay: float = 0.01
    seed: int = 0
    cache_features: bool = True
    feature_cache_dir: str | None = None
    mixed_precision: str = "no"
    cpu: bool = False
    num_workers: int = 2
    checkpoint_every_steps: int | None = None
    checkpoints_total_limit: int = 2
    max_steps: int | None = None
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    robustness: bool = False
    robustness_transforms: list[str] = field(default_factory=lambda: ["flip_ud", "roll", "rot90"])
    roll_shift_patches: int | None = None
    num_example_images: int = 4
    output_dir: str = "outputs/linseg"
    resume_from_checkpoint: str | None = None
    disable_progress_bars: bool = False
    description: str | None = None


FIELD_HELP: dict[str, str] = {
    "model": "Hub id or local folder of the frozen backbone (AutoModel, trust_remote_code=True)",
    "dataset_name": "Hub dataset name (datasets.load_dataset) or a save_to_disk folder; exclusive with --data_dir",
    "dataset_config_name": "configuration name of the Hub dataset, if it has several",
    "dataset_revision": "branch, tag or commit of the Hub dataset (refs/convert/parquet for script-only datasets)",
    "data_dir": "local folder: ROOT/<split>/images/x.jpg + ROOT/<split>/masks/x.png, a VOCdevkit/VOC20xx folder "
    "or ADEChallengeData2016",
    "train_split": "split to train on",
    "val_split": "split to score (mIoU)",
    "image_column": "image column of a Hub / saved dataset",
    "mask_column": "mask column of a Hub / saved dataset (class indices per pixel)",
    "num_classes": "number of classes (labels 0 .. num_classes - 1); required",
    "class_names": "names of the classes, for results.json",
    "ignore_index": "label value of unlabelled pixels, left out of the loss and the scores",
    "reduce_labels": "masks whose 0 means unlabelled (ADE20K): 0 -> ignore index, v -> v - 1",
    "image_size": "side of the square network input in pixels; a multiple of the patch size (518 = 37 x 14)",
    "resize_mode": "'resize' squashes to the square, 'center_crop' resizes the shorter side and crops the centre",
    "epochs": "training epochs",
    "batch_size": "training images per device and step",
    "eval_batch_size": "images per device in evaluation and feature caching",
    "learning_rate": "AdamW learning rate",
    "weight_decay": "AdamW weight decay",
    "seed": "seed of the head initialisation and of the data order",
    "cache_features": "compute backbone features once (float16 on disk) and reuse them every epoch",
    "feature_cache_dir": "folder of the feature cache (default OUTPUT_DIR/feature_cache)",
    "mixed_precision": "Accelerate mixed precision: no, fp16 or bf16",
    "cpu": "run on the CPU even when a GPU is available",
    "num_workers": "DataLoader worker processes",
    "checkpoint_every_steps": "also checkpoint every this many optimiser steps (a checkpoint ends every epoch)",
    "checkpoints_total_limit": "keep this many checkpoints (0 keeps all)",
    "max_steps": "stop training after this many optimiser steps in total (resume later to continue)",
    "max_train_samples": "use only the first N training samples (quick runs)",
    "max_eval_samples": "use only the first N validation samples (quick runs)",
    "robustness": "also score the probe on transformed inputs (flip_ud, roll, rot90) with the transform undone",
    "robustness_transforms": f"transforms of the robustness mode, from {', '.join(TRANSFORMS[1:])}",
    "roll_shift_patches": "roll distance in whole patches along both axes (default: half the patch grid)",
    "num_example_images": "validation images in examples.png (0 for no figure)",
    "output_dir": "folder of results.json, examples.png, probe/, checkpoints/ and the feature cache",
    "resume_from_checkpoint": "'latest' (newest checkpoint in OUTPUT_DIR/checkpoints, if any) or a checkpoint folder",
    "disable_progress_bars": "no tqdm progress bars",
    "description": "free text kept with the results",
}


def _field_types() -> dict[str, str]:
    return {item.name: str(item.type) for item in dataclasses.fields(LinearSegmentationConfig)}


def _suggest(name: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f" Did you mean {close[0]!r}?" if close else ""


def validate_config(config: LinearSegmentationConfig, require_model: bool = True) -> LinearSegmentationConfig:
    """Check a configuration; raises ValueError naming the problem and the fix."""
    if require_model and not config.model:
        raise ValueError("No backbone: set --model to a Hub id or a local model folder.")
    if config.dataset_name is None and config.data_dir is None:
        raise ValueError(
            "No data source: set --dataset_name (a Hub dataset or a save_to_disk folder) or --data_dir (a local folder "
            "with <split>/images and <split>/masks, or a VOCdevkit/VOC20xx folder)."
        )
    if config.dataset_name is not None and config.data_dir is not None:
        raise ValueError("Both --dataset_name and --data_dir are set; keep one of them (set the other to null).")
    if config.num_classes is None or int(config.num_classes) < 2:
        raise ValueError(f"--num_classes must be an integer >= 2; got {config.num_classes!r}.")
    if config.class_names is not None and len(config.class_names) != config.num_classes:
        raise ValueError(
            f"{len(config.class_names)} class_names given for num_classes={config.num_classes}; "
            "give one name per class."
        )
    if 0 <= config.ignore_index < config.num_classes:
        raise ValueError(
            f"ignore_index {config.ignore_index} is a class index (num_classes={config.num_classes}); use a value "
            "outside 0 .. num_classes - 1, e.g. 255."
        )
    positive = ("image_size", "epochs", "batch_size", "eval_batch_size")
    for name in positive:
        if int(getattr(config, name)) < 1:
            raise ValueError(f"--{name} must be >= 1; got {getattr(config, name)}.")
    for name in ("max_steps", "checkpoint_every_steps", "max_train_samples", "max_eval_samples"):
        value = getattr(config, name)
        if value is not None and int(value) < 1:
            raise ValueError(f"--{name} must be >= 1 when set; got {value}.")
    if config.learning_rate <= 0 or config.weight_decay < 0:
        raise ValueError("--learning_rate must be > 0 and --weight_decay >= 0.")
    if config.resize_mode not in RESIZE_MODES:
        raise ValueError(f"--resize_mode must be one of {RESIZE_MODES}; got {config.resize_mode!r}.")
    if config.mixed_precision not in MIXED_PRECISION_CHOICES:
        raise ValueError(f"--mixed_precision must be one of {MIXED_PRECISION_CHOICES}; got {config.mixed_precision!r}.")
    for name in config.robustness_transforms:
        if name not in TRANSFORMS[1:]:
            raise ValueError(
                f"Unknown robustness transform {name!r}; choose from {TRANSFORMS[1:]}.{_suggest(name, TRANSFORMS)}"
            )
    if config.num_workers < 0 or config.num_example_images < 0 or config.checkpoints_total_limit < 0:
        raise ValueError("--num_workers, --num_example_images and --checkpoints_total_limit must be >= 0.")
    return config


def load_config_file(path: PathLike) -> dict:
    """Read a JSON config; raises ValueError for unknown keys (with the closest known key)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Config file {path} not found.")
    try:
        values = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"Config file {path} is not valid JSON: {error}") from error
    if not isinstance(values, dict):
        raise ValueError(f"Config file {path} must hold a JSON object of settings.")
    known = _field_types()
    for key in values:
        if key not in known:
            raise ValueError(f"Unknown key {key!r} in {path}.{_suggest(key, known)} Known keys: {', '.join(known)}.")
    return values


def make_config(*sources: dict) -> LinearSegmentationConfig:
    """Defaults, updated by each mapping in turn (config file, then command line), validated."""
    values: dict[str, Any] = {}
    for source in sources:
        values.update(source)
    known = _field_types()
    unknown = [key for key in values if key not in known]
    if unknown:
        raise ValueError(f"Unknown settings {unknown}.{_suggest(unknown[0], known)}")
    return validate_config(LinearSegmentationConfig(**values))


# --------------------------------------------------------------------------------------------------
# Backbone features
# --------------------------------------------------------------------------------------------------
def load_backbone(name: str) -> tuple[nn.Module, tuple[float, ...], tuple[float, ...]]:
    """``AutoModel.from_pretrained(name, trust_remote_code=True)`` in eval mode, and its image mean and std.

    The statistics come from the model's image processor when one is stored with it, else ImageNet's.
    """
    from evaluation.probe_runner import load_model

    model, statistics = load_model(name)
    if statistics is None:  # no preprocessor_config.json (a converted or test folder)
        return model, IMAGENET_MEAN, IMAGENET_STD
    return model, tuple(statistics["image_mean"]), tuple(statistics["image_std"])


def patch_feature_maps(model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """Batched patch features of a frozen backbone, without gradients.

    Args:
        model: a transformers image model giving patch tokens (see ``evaluation.feature_extraction``).
        pixel_values: (B, 3, H, W) normalised images, H and W multiples of the patch size p.

    Returns:
        (B, C, H // p, W // p): ``last_hidden_state`` with the CLS / register tokens dropped.
    """
    backbone = resolve_backbone(model)
    patch_size, prefix = patch_size_of(backbone), prefix_token_count(backbone)
    if pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
        raise ValueError(f"pixel_values must have shape (B, 3, H, W); got {tuple(pixel_values.shape)}.")
    height, width = pixel_values.shape[-2:]
    if height % patch_size or width % patch_size:
        raise ValueError(
            f"Image size {height}x{width} is not a multiple of the patch size {patch_size}; set --image_size to a "
            f"multiple of {patch_size}."
        )
    grid_h, grid_w = height // patch_size, width // patch_size
    kwargs = {}
    if "interpolate_pos_encoding" in inspect.signature(backbone.forward).parameters:
        kwargs["interpolate_pos_encoding"] = True  # plain ViTs: resize the learned embedding to the input grid
    with torch.no_grad():
        tokens = backbone(pixel_values=pixel_values, **kwargs).last_hidden_state
    if tokens.shape[1] != prefix + grid_h * grid_w:
        raise ValueError(
            f"{type(backbone).__name__} returned {tokens.shape[1]} tokens; expected {prefix} prefix + "
            f"{grid_h}x{grid_w} patch tokens."
        )
    patches = tokens[:, prefix:]
    return patches.reshape(patches.shape[0], grid_h, grid_w, patches.shape[-1]).permute(0, 3, 1, 2).contiguous()


# --------------------------------------------------------------------------------------------------
# Input transforms of the robustness mode
# --------------------------------------------------------------------------------------------------
def transform_images(pixel_values: torch.Tensor, name: str, patch_size: int, shift_patches: int = 0) -> torch.Tensor:
    """Apply a transform to (B, 3, H, W) images: none, flip_ud, roll (by `shift_patches` whole patches along
    both axes, cyclic) or rot90 (counter-clockwise)."""
    if name == "none":
        return pixel_values
    if name == "flip_ud":
        return torch.flip(pixel_values, dims=(-2,))
    if name == "roll":
        shift = shift_patches * patch_size
        return torch.roll(pixel_values, shifts=(shift, shift), dims=(-2, -1))
    if name == "rot90":
        return torch.rot90(pixel_values, k=1, dims=(-2, -1))
    raise ValueError(f"Unknown transform {name!r}; choose from {TRANSFORMS}.{_suggest(name, TRANSFORMS)}")


def undo_transform_on_features(features: torch.Tensor, name: str, shift_patches: int = 0) -> torch.Tensor:
    """Map (B, C, h, w) features of transformed images back onto the grid of the untransformed image."""
    if name == "none":
        return features
    if name == "flip_ud":
        return torch.flip(features, dims=(-2,))
    if name == "roll":
        return torch.roll(features, shifts=(-shift_patches, -shift_patches), dims=(-2, -1))
    if name == "rot90":
        return torch.rot90(features, k=-1, dims=(-2, -1))
    raise ValueError(f"Unknown transform {name!r}; choose from {TRANSFORMS}.{_suggest(name, TRANSFORMS)}")


# --------------------------------------------------------------------------------------------------
# Head, loss and scores
# --------------------------------------------------------------------------------------------------
class LinearSegmentationHead(nn.Module):
    """BatchNorm + 1x1 linear classifier on patch features; logits upsampled bilinearly to the label size."""

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        self.norm = nn.BatchNorm2d(in_channels)
        self.classifier = nn.Conv2d(in_channels, num_classes, kernel_size=1)

    def forward(self, features: torch.Tensor, output_size: tuple[int, int] | None = None) -> torch.Tensor:
        """(B, C, h, w) features -> (B, K, h, w) logits, or (B, K, *output_size) when given."""
        logits = self.classifier(self.norm(features.to(self.classifier.weight.dtype)))
        if output_size is not None and tuple(logits.shape[-2:]) != tuple(output_size):
            logits = F.interpolate(logits, size=tuple(output_size), mode="bilinear", align_corners=False)
        return logits


def make_segmentation_head(in_channels: int, num_classes: int, seed: int = 0) -> LinearSegmentationHead:
    """A head with small normal weights (std 0.01) and zero bias, drawn from its own seeded generator."""
    head = LinearSegmentationHead(in_channels, num_classes)
    generator = torch.Generator().manual_seed(int(seed))
    with torch.no_grad():
        head.classifier.weight.copy_(torch.randn(head.classifier.weight.shape, generator=generator) * 0.01)
        head.classifier.bias.zero_()
    return head


def segmentation_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    """Cross-entropy over labelled pixels; 0 (with gradient) for a batch without any."""
    labels = labels.long()
    if not bool((labels != ignore_index).any()):
        return logits.sum() * 0.0  # cross_entropy would return NaN for an empty mean
    return F.cross_entropy(logits.float(), labels, ignore_index=ignore_index)


def _confusion_torch(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int, ignore_index: int):
    valid = labels != ignore_index
    codes = labels[valid].long() * num_classes + predictions[valid].long()
    return torch.bincount(codes, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def confusion_matrix(
    predictions: np.ndarray, labels: np.ndarray, num_classes: int, ignore_index: int = 255
) -> np.ndarray:
    """(K, K) int64 counts, rows = ground truth, columns = prediction; pixels labelled `ignore_index` are skipped.

    Args:
        predictions, labels: integer arrays of the same shape, e.g. (N, H, W).
    Raises:
        ValueError: shapes differ, or a label / prediction outside 0 .. K - 1 (labels may also be the ignore index).
    """
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    if predictions.shape != labels.shape:
        raise ValueError(f"predictions {predictions.shape} and labels {labels.shape} must have the same shape.")
    valid = labels != ignore_index
    for what, values in (("labels", labels[valid]), ("predictions", predictions[valid])):
        if values.size and (values.min() < 0 or values.max() >= num_classes):
            raise ValueError(
                f"{what} hold values outside 0 .. {num_classes - 1} (and not the ignore index {ignore_index})."
            )
    confusion = _confusion_torch(torch.from_numpy(predictions), torch.from_numpy(labels), num_classes, ignore_index)
    return confusion.numpy().astype(np.int64)


def scores_from_confusion(confusion: np.ndarray, class_names: Sequence[str] | None = None) -> dict:
    """mIoU, per-class IoU and pixel accuracy of a (K, K) confusion matrix (rows = ground truth).

    IoU_k = TP / (TP + FP + FN). A class absent from both the ground truth and the predictions has no IoU
    (None in ``per_class_iou``) and is left out of the mean.

    Returns:
        dict with ``miou``, ``pixel_accuracy``, ``per_class_iou`` (name -> float or None),
        ``num_present_classes`` and ``num_pixels`` (labelled pixels).
    """
    confusion = np.asarray(confusion, dtype=np.float64)
    true_positive = np.diag(confusion)
    union = confusion.sum(axis=0) + confusion.sum(axis=1) - true_positive
    present = union > 0
    iou = np.divide(true_positive, union, out=np.full_like(true_positive, np.nan), where=present)
    total = confusion.sum()
    names = list(class_names) if class_names is not None else [f"class_{index}" for index in range(len(iou))]
    return {
        "miou": float(np.nanmean(iou)) if present.any() else float("nan"),
        "pixel_accuracy": float(true_positive.sum() / total) if total else float("nan"),
        "per_class_iou": {name: (float(value) if ok else None) for name, value, ok in zip(names, iou, present)},
        "num_present_classes": int(present.sum()),
        "num_pixels": int(total),
    }


def mean_iou(predictions: np.ndarray, labels: np.ndarray, num_classes: int, ignore_index: int = 255) -> dict:
    """:func:`scores_from_confusion` of :func:`confusion_matrix`: mIoU, per-class IoU and pixel accuracy."""
    return scores_from_confusion(confusion_matrix(predictions, labels, num_classes, ignore_index))


# --------------------------------------------------------------------------------------------------
# Data order
# --------------------------------------------------------------------------------------------------
class EpochShuffleSampler(torch.utils.data.Sampler):
    """A fresh permutation every epoch, fixed by (seed, epoch): a resumed run sees the same order."""

    def __init__(self, num_samples: int, seed: int = 0):
        self.num_samples, self.seed, self.epoch = int(num_samples), int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self):
        return iter(np.random.default_rng([self.seed, self.epoch]).permutation(self.num_samples).tolist())

    def __len__(self) -> int:
        return self.num_samples


def _features_and_labels(batch: dict, backbone: nn.Module | None, device) -> tuple[torch.Tensor, torch.Tensor]:
    labels = batch["labels"].to(device)
    if "features" in batch:
        return batch["features"].to(device), labels
    return patch_feature_maps(backbone, batch["pixel_values"].to(device)), labels


# --------------------------------------------------------------------------------------------------
# scikit-learn-like estimator on feature arrays
# --------------------------------------------------------------------------------------------------
class LinearSegmentationProbe:
    """BatchNorm + 1x1 linear probe on patch-feature maps, trained with torch.

    ``fit(features (N, C, h, w), labels (N, H, W))``, ``predict(features, output_size) -> (N, H, W)``,
    ``evaluate(features, labels) -> scores``, ``save(folder)`` / ``LinearSegmentationProbe.load(folder)``.
    The command-line run trains the same head under Accelerate and stores it in this form.

    Attributes (after fit or load):
        head_: the :class:`LinearSegmentationHead`.
        loss_curve_: mean training loss per epoch.
    """

    def __init__(
        self,
        num_classes: int,
        ignore_index: int = 255,
        learning_rate: float = 1e-3,
        weight_decay: float = 0.01,
        epochs: int = 10,
        batch_size: int = 16,
        seed: int = 0,
        device: str | torch.device | None = None,
        class_names: Sequence[str] | None = None,
        verbose: bool = False,
    ):
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.learning_rate, self.weight_decay = float(learning_rate), float(weight_decay)
        self.epochs, self.batch_size, self.seed = int(epochs), int(batch_size), int(seed)
        self.device = device
        self.class_names = list(class_names) if class_names is not None else None
        self.verbose = verbose

    # -- helpers
    def _device(self) -> torch.device:
        if self.device is not None:
            return torch.device(self.device)
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def _check_fitted(self) -> None:
        if not hasattr(self, "head_"):
            raise RuntimeError("This LinearSegmentationProbe is not fitted yet; call fit() or load() first.")

    @staticmethod
    def _as_tensor(array, dtype=None) -> torch.Tensor:
        tensor = array if isinstance(array, torch.Tensor) else torch.from_numpy(np.asarray(array))
        return tensor if dtype is None else tensor.to(dtype)

    # -- estimator API
    def fit(self, features, labels) -> "LinearSegmentationProbe":
        """Train on (N, C, h, w) features and (N, H, W) integer labels (`ignore_index` = unlabelled)."""
        features, labels = self._as_tensor(features), self._as_tensor(labels, torch.int64)
        if features.ndim != 4 or labels.ndim != 3 or features.shape[0] != labels.shape[0]:
            raise ValueError(
                f"fit expects features (N, C, h, w) and labels (N, H, W); got {tuple(features.shape)} and "
                f"{tuple(labels.shape)}."
            )
        bad = (labels != self.ignore_index) & ((labels < 0) | (labels >= self.num_classes))
        if bool(bad.any()):
            raise ValueError(
                f"labels hold values {torch.unique(labels[bad])[:10].tolist()} outside 0 .. {self.num_classes - 1} "
                f"and not the ignore index {self.ignore_index}."
            )
        device = self._device()
        head = make_segmentation_head(features.shape[1], self.num_classes, self.seed).to(device)
        optimizer = torch.optim.AdamW(head.parameters(), lr=self.learning_rate, weight_decay=self.weight_decay)
        sampler = EpochShuffleSampler(len(features), self.seed)
        self.loss_curve_ = []
        head.train()
        for epoch in tqdm(range(self.epochs), desc="epochs", disable=not self.verbose):
            sampler.set_epoch(epoch)
            order = list(sampler)
            losses = []
            for start in range(0, len(order), self.batch_size):
                index = torch.as_tensor(order[start : start + self.batch_size])
                batch_labels = labels[index].to(device)
                logits = head(features[index].to(device), output_size=batch_labels.shape[-2:])
                loss = segmentation_loss(logits, batch_labels, self.ignore_index)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(float(loss.detach()))
            self.loss_curve_.append(float(np.mean(losses)))
        self.head_ = head.eval()
        self.in_channels_ = int(features.shape[1])
        return self

    def _batched_logits(self, features, output_size: tuple[int, int] | None):
        """Logits of `batch_size` samples at a time, so that full-resolution logits never exist for all at once."""
        self._check_fitted()
        features = self._as_tensor(features)
        device = next(self.head_.parameters()).device
        with torch.no_grad():
            for start in range(0, len(features), self.batch_size):
                yield self.head_.eval()(features[start : start + self.batch_size].to(device), output_size)

    def predict_logits(self, features, output_size: tuple[int, int] | None = None) -> np.ndarray:
        """(N, C, h, w) features -> (N, K, H, W) float32 logits (H, W = output_size, else h, w)."""
        return torch.cat([logits.float().cpu() for logits in self._batched_logits(features, output_size)]).numpy()

    def predict(self, features, output_size: tuple[int, int] | None = None) -> np.ndarray:
        """(N, C, h, w) features -> (N, H, W) int64 class indices."""
        batches = self._batched_logits(features, output_size)
        return torch.cat([logits.argmax(dim=1).cpu() for logits in batches]).numpy().astype(np.int64)

    def evaluate(self, features, labels) -> dict:
        """Scores (:func:`scores_from_confusion`) of the predictions at the labels' resolution."""
        labels = np.asarray(labels)
        predictions = self.predict(features, output_size=labels.shape[-2:])
        return scores_from_confusion(
            confusion_matrix(predictions, labels, self.num_classes, self.ignore_index), self.class_names
        )

    # -- persistence
    def _settings(self) -> dict:
        return {
            "num_classes": self.num_classes,
            "ignore_index": self.ignore_index,
            "learning_rate": self.learning_rate,
            "weight_decay": self.weight_decay,
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "class_names": self.class_names,
        }

    def save(self, folder: PathLike) -> Path:
        """Write ``head.safetensors`` and ``probe_config.json`` to `folder` (each file replaced atomically)."""
        from safetensors.torch import save_file

        self._check_fitted()
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {name: tensor.detach().cpu().contiguous() for name, tensor in self.head_.state_dict().items()}
        temporary = folder / ".head.safetensors.tmp"
        save_file(state, str(temporary))
        os.replace(temporary, folder / "head.safetensors")
        settings = dict(self._settings(), in_channels=self.in_channels_, loss_curve=getattr(self, "loss_curve_", None))
        write_json_atomic(folder / "probe_config.json", settings)
        return folder

    @classmethod
    def load(cls, folder: PathLike, device: str | torch.device | None = None) -> "LinearSegmentationProbe":
        """A fitted probe from a folder written by :meth:`save`."""
        from safetensors.torch import load_file

        folder = Path(folder)
        config_path, weights_path = folder / "probe_config.json", folder / "head.safetensors"
        if not config_path.is_file() or not weights_path.is_file():
            raise FileNotFoundError(f"{folder} holds no saved probe (probe_config.json + head.safetensors).")
        settings = json.loads(config_path.read_text())
        in_channels, loss_curve = settings.pop("in_channels"), settings.pop("loss_curve", None)
        probe = cls(**settings, device=device)
        head = LinearSegmentationHead(in_channels, probe.num_classes)
        head.load_state_dict(load_file(str(weights_path)))
        probe._set_head(head.to(probe._device()), loss_curve)
        return probe

    def _set_head(self, head: LinearSegmentationHead, loss_curve: list | None = None) -> "LinearSegmentationProbe":
        self.head_ = head.eval()
        self.in_channels_ = int(head.norm.num_features)
        if loss_curve is not None:
            self.loss_curve_ = list(loss_curve)
        return self


# --------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------
def _json_default(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def write_json_atomic(path: PathLike, data: dict) -> Path:
    """Write JSON through a temporary file and a rename, so readers never see a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(data, indent=2, default=_json_default, allow_nan=True))
    os.replace(temporary, path)
    return path


def _save_array_atomic(path: Path, array: np.ndarray) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "wb") as handle:
        np.save(handle, array)
    os.replace(temporary, path)


# --------------------------------------------------------------------------------------------------
# Feature cache
# --------------------------------------------------------------------------------------------------
def _label_dtype(num_classes: int, ignore_index: int):
    return np.uint8 if max(num_classes - 1, ignore_index) <= 255 and ignore_index >= 0 else np.int32


class CachedFeatureDataset(torch.utils.data.Dataset):
    """Items of a feature cache: ``features`` (C, h, w) float32 (stored float16), ``labels`` (S, S) int64, ``index``."""

    def __init__(self, cache_dir: PathLike):
        self.cache_dir = Path(cache_dir)
        info_path = self.cache_dir / "info.json"
        if not info_path.is_file():
            raise FileNotFoundError(f"{self.cache_dir} is no feature cache (no info.json).")
        self.info = json.loads(info_path.read_text())

    def __len__(self) -> int:
        return int(self.info["num_samples"])

    def __getitem__(self, index: int) -> dict:
        features = np.load(self.cache_dir / "features" / f"{index:07d}.npy")
        labels = np.load(self.cache_dir / "labels" / f"{index:07d}.npy")
        return {
            "features": torch.from_numpy(features.astype(np.float32)),
            "labels": torch.from_numpy(labels.astype(np.int64)),
            "index": int(index),
        }


def _missing_cache_entries(cache_dir: Path, num_samples: int) -> list[int]:
    return [
        index
        for index in range(num_samples)
        if not (cache_dir / "features" / f"{index:07d}.npy").is_file()
        or not (cache_dir / "labels" / f"{index:07d}.npy").is_file()
    ]


def build_feature_cache(
    backbone: nn.Module,
    dataset: SegmentationDataset,
    cache_dir: PathLike,
    key: dict,
    batch_size: int = 16,
    num_workers: int = 0,
    accelerator=None,
    progress: bool = True,
) -> CachedFeatureDataset:
    """Compute the backbone features of every sample once and store them as float16 ``.npy`` files.

    Layout: ``cache_dir/info.json`` (what the cache was built from), ``features/0000000.npy`` (C, h, w) float16,
    ``labels/0000000.npy`` (S, S). Entries already present are kept, so an interrupted build continues; with
    several processes each computes a share. A cache built from other settings raises ValueError.
    """
    cache_dir = Path(cache_dir)
    info_path = cache_dir / "info.json"
    is_main = accelerator is None or accelerator.is_main_process
    key = dict(key, num_samples=len(dataset), format=_CACHE_FORMAT_VERSION)
    if info_path.is_file():
        stored = json.loads(info_path.read_text())
        if stored != key:
            changed = sorted(name for name in set(stored) | set(key) if stored.get(name) != key.get(name))
            raise ValueError(
                f"The feature cache {cache_dir} was built with other settings ({', '.join(changed)} differ). Delete it "
                "or set --feature_cache_dir to another folder."
            )
    # Every process lists the missing entries before any of them writes, so that all split the same list.
    missing = _missing_cache_entries(cache_dir, len(dataset))
    if is_main:
        (cache_dir / "features").mkdir(parents=True, exist_ok=True)
        (cache_dir / "labels").mkdir(parents=True, exist_ok=True)
        write_json_atomic(info_path, key)
    if accelerator is not None:
        accelerator.wait_for_everyone()

    rank, world = (0, 1) if accelerator is None else (accelerator.process_index, accelerator.num_processes)
    mine = missing[rank::world]
    device = next(backbone.parameters()).device
    label_dtype = _label_dtype(dataset.num_classes, dataset.ignore_index)
    if mine:
        loader = torch.utils.data.DataLoader(
            torch.utils.data.Subset(dataset, mine), batch_size=batch_size, num_workers=num_workers
        )
        autocast = accelerator.autocast() if accelerator is not None else _null_context()
        with autocast:
            for batch in tqdm(loader, desc=f"caching features ({cache_dir.name})", disable=not progress):
                features = patch_feature_maps(backbone, batch["pixel_values"].to(device))
                features = features.to(torch.float16).cpu().numpy()
                for index, sample_features, labels in zip(batch["index"].tolist(), features, batch["labels"].numpy()):
                    _save_array_atomic(cache_dir / "labels" / f"{index:07d}.npy", labels.astype(label_dtype))
                    _save_array_atomic(cache_dir / "features" / f"{index:07d}.npy", sample_features)
    if accelerator is not None:
        accelerator.wait_for_everyone()
    return CachedFeatureDataset(cache_dir)


class _null_context:
    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        return False


# --------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------
class TrainingProgress:
    """Where training stands; saved with every checkpoint (``accelerator.register_for_checkpointing``)."""

    def __init__(self, steps_per_epoch: int):
        self.steps_per_epoch = int(steps_per_epoch)
        self.epoch = 0  # current (unfinished) epoch
        self.step_in_epoch = 0  # optimiser steps done in it
        self.global_step = 0
        self.epoch_loss_sum = 0.0
        self.epoch_loss_count = 0
        self.loss_per_epoch: list[float] = []

    def state_dict(self) -> dict:
        return dict(vars(self))

    def load_state_dict(self, state: dict) -> None:
        if int(state["steps_per_epoch"]) != self.steps_per_epoch:
            raise ValueError(
                f"The checkpoint has {state['steps_per_epoch']} steps per epoch, this run {self.steps_per_epoch}: "
                "resume with the same data, batch size and number of processes, or start a new --output_dir."
            )
        for name, value in state.items():
            setattr(self, name, value)


def checkpoint_folders(output_dir: PathLike) -> list[Path]:
    """Complete checkpoints of a run (``OUTPUT_DIR/checkpoints/checkpoint_<step>``), oldest first."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    folders = [path for path in root.iterdir() if path.is_dir() and path.name.startswith(CHECKPOINT_PREFIX)]
    return sorted(folders, key=lambda path: int(path.name[len(CHECKPOINT_PREFIX) :]))


def resolve_resume_checkpoint(resume_from_checkpoint: str | None, output_dir: PathLike) -> Path | None:
    """'latest' -> the newest checkpoint of `output_dir` (None when there is none yet); a path -> that folder."""
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "latest":
        folders = checkpoint_folders(output_dir)
        return folders[-1] if folders else None
    path = Path(resume_from_checkpoint)
    if not path.is_dir():
        raise FileNotFoundError(
            f"Checkpoint folder {path} not found; pass 'latest' or a folder under {Path(output_dir) / 'checkpoints'}."
        )
    return path


def save_checkpoint(accelerator, output_dir: PathLike, global_step: int, total_limit: int = 2) -> Path:
    """``accelerator.save_state`` into a temporary folder, renamed to ``checkpoint_<step>`` once complete;
    then only the newest `total_limit` checkpoints are kept (0 keeps all)."""
    root = Path(output_dir) / "checkpoints"
    final = root / f"{CHECKPOINT_PREFIX}{global_step:08d}"
    temporary = root / f".tmp_{CHECKPOINT_PREFIX}{global_step:08d}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(temporary, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(temporary))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        os.replace(temporary, final)
        if total_limit > 0:
            for old in checkpoint_folders(output_dir)[:-total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


# --------------------------------------------------------------------------------------------------
# Training and evaluation under Accelerate
# --------------------------------------------------------------------------------------------------
def train_head(
    head: LinearSegmentationHead,
    train_dataset: torch.utils.data.Dataset,
    config: LinearSegmentationConfig,
    accelerator,
    backbone: nn.Module | None = None,
) -> tuple[LinearSegmentationHead, TrainingProgress]:
    """Train the head for ``config.epochs`` (or until ``config.max_steps``), checkpointing as it goes.

    `train_dataset` yields ``features`` (cached) or ``pixel_values`` (then `backbone` computes the features) and
    ``labels``. Returns the unwrapped head (eval mode) and the training progress.
    """
    sampler = EpochShuffleSampler(len(train_dataset), config.seed)
    loader = torch.utils.data.DataLoader(
        train_dataset, batch_size=config.batch_size, sampler=sampler, num_workers=config.num_workers
    )
    if accelerator.num_processes > 1 and accelerator.device.type == "cuda":
        # Statistics over the global batch, as on one device (SyncBatchNorm needs GPUs; CPU groups keep local ones).
        head = nn.SyncBatchNorm.convert_sync_batchnorm(head)
    optimizer = torch.optim.AdamW(head.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    head, optimizer, loader = accelerator.prepare(head, optimizer, loader)
    progress = TrainingProgress(len(loader))
    accelerator.register_for_checkpointing(progress)

    checkpoint = resolve_resume_checkpoint(config.resume_from_checkpoint, config.output_dir)
    if checkpoint is not None:
        accelerator.print(f"Resuming from {checkpoint}")
        accelerator.load_state(str(checkpoint))
    elif config.resume_from_checkpoint == "latest":
        accelerator.print(f"No checkpoint in {Path(config.output_dir) / 'checkpoints'} yet: training from the start.")

    def budget_left() -> bool:
        return config.max_steps is None or progress.global_step < config.max_steps

    show = not config.disable_progress_bars and accelerator.is_local_main_process
    while progress.epoch < config.epochs and budget_left():
        # The prepared loader re-seeds the sampler with its own epoch counter on every pass: set it, not the sampler.
        loader.set_epoch(progress.epoch)
        batches = accelerator.skip_first_batches(loader, progress.step_in_epoch) if progress.step_in_epoch else loader
        head.train()
        bar = tqdm(
            batches,
            total=progress.steps_per_epoch,
            initial=progress.step_in_epoch,
            desc=f"epoch {progress.epoch + 1}/{config.epochs}",
            disable=not show,
        )
        for batch in bar:
            with accelerator.autocast():
                features, labels = _features_and_labels(batch, backbone, accelerator.device)
                logits = head(features, output_size=labels.shape[-2:])
                loss = segmentation_loss(logits, labels, config.ignore_index)
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            optimizer.step()
            progress.step_in_epoch += 1
            progress.global_step += 1
            progress.epoch_loss_sum += float(loss.detach())
            progress.epoch_loss_count += 1
            bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
            stop = not budget_left()
            every = config.checkpoint_every_steps
            mid_epoch = progress.step_in_epoch < progress.steps_per_epoch  # the end of an epoch checkpoints below
            if mid_epoch and (stop or (every and progress.global_step % every == 0)):
                save_checkpoint(accelerator, config.output_dir, progress.global_step, config.checkpoints_total_limit)
            if stop:
                break
        bar.close()
        if progress.step_in_epoch >= progress.steps_per_epoch:
            totals = accelerator.reduce(
                torch.tensor([progress.epoch_loss_sum, progress.epoch_loss_count], device=accelerator.device), "sum"
            )
            progress.loss_per_epoch.append(float(totals[0] / max(float(totals[1]), 1.0)))
            progress.epoch += 1
            progress.step_in_epoch, progress.epoch_loss_sum, progress.epoch_loss_count = 0, 0.0, 0
            save_checkpoint(accelerator, config.output_dir, progress.global_step, config.checkpoints_total_limit)
    return accelerator.unwrap_model(head).eval(), progress


def evaluate_head(
    head: LinearSegmentationHead,
    dataset: torch.utils.data.Dataset,
    num_classes: int,
    ignore_index: int = 255,
    backbone: nn.Module | None = None,
    transform: str = "none",
    shift_patches: int = 0,
    batch_size: int = 16,
    num_workers: int = 0,
    accelerator=None,
    progress: bool = True,
) -> np.ndarray:
    """(K, K) confusion matrix of the head's predictions on a dataset, summed over processes.

    Items carry ``features`` (cached, `transform` must be "none") or ``pixel_values``: these are transformed,
    fed to `backbone`, and the transform is undone on the (B, C, h, w) features before the head. Each process
    scores every `num_processes`-th sample, so none is counted twice.
    """
    rank, world = (0, 1) if accelerator is None else (accelerator.process_index, accelerator.num_processes)
    device = accelerator.device if accelerator is not None else next(head.parameters()).device
    indices = list(range(rank, len(dataset), world))
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(dataset, indices), batch_size=batch_size, num_workers=num_workers
    )
    patch_size = patch_size_of(backbone) if backbone is not None else None
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    head = head.to(device).eval()
    autocast = accelerator.autocast() if accelerator is not None else _null_context()
    with torch.no_grad(), autocast:
        for batch in tqdm(loader, desc=f"evaluating ({transform})", disable=not progress):
            labels = batch["labels"].to(device)
            if "features" in batch:
                if transform != "none":
                    raise ValueError("Transformed inputs need live features: pass a dataset of images and a backbone.")
                features = batch["features"].to(device)
            else:
                pixel_values = transform_images(batch["pixel_values"].to(device), transform, patch_size, shift_patches)
                features = patch_feature_maps(backbone, pixel_values)
                features = undo_transform_on_features(features, transform, shift_patches)
            predictions = head(features, output_size=labels.shape[-2:]).argmax(dim=1)
            confusion += _confusion_torch(predictions, labels, num_classes, ignore_index)
    if accelerator is not None:
        confusion = accelerator.reduce(confusion, "sum")
    return confusion.cpu().numpy().astype(np.int64)


# --------------------------------------------------------------------------------------------------
# Figure
# --------------------------------------------------------------------------------------------------
def label_palette(num_classes: int) -> np.ndarray:
    """(num_classes, 3) uint8 colours, Pascal-VOC style (bits of the class index spread over R, G, B)."""
    palette = np.zeros((num_classes, 3), dtype=np.uint8)
    for index in range(num_classes):
        value, red, green, blue = index, 0, 0, 0
        for bit in range(8):
            red |= ((value >> 0) & 1) << (7 - bit)
            green |= ((value >> 1) & 1) << (7 - bit)
            blue |= ((value >> 2) & 1) << (7 - bit)
            value >>= 3
        palette[index] = (red, green, blue)
    return palette


def colourise_labels(labels: np.ndarray, num_classes: int, ignore_index: int = 255) -> np.ndarray:
    """(H, W) class indices -> (H, W, 3) uint8 colours; ignored pixels white."""
    palette = label_palette(num_classes)
    labels = np.asarray(labels)
    valid = (labels >= 0) & (labels < num_classes)
    colours = np.full(labels.shape + (3,), 255, dtype=np.uint8)
    colours[valid] = palette[labels[valid]]
    return colours


def plot_example_predictions(
    images: Sequence[np.ndarray],
    labels: Sequence[np.ndarray],
    predictions: Sequence[np.ndarray],
    num_classes: int,
    path: PathLike,
    ignore_index: int = 255,
    titles: Sequence[str] | None = None,
) -> Path:
    """Save a PNG with one row per example: image | ground truth | prediction.

    Args:
        images: (H, W, 3) uint8 or float in [0, 1]; labels, predictions: (H, W) class indices.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    rows = len(images)
    if rows == 0:
        raise ValueError("No examples to plot.")
    figure, axes = plt.subplots(rows, 3, figsize=(9, 3 * rows), squeeze=False)
    for row, (image, truth, predicted) in enumerate(zip(images, labels, predictions)):
        panels = (image, colourise_labels(truth, num_classes, ignore_index), colourise_labels(predicted, num_classes))
        for column, (panel, name) in enumerate(zip(panels, ("image", "ground truth", "prediction"))):
            axis = axes[row, column]
            axis.imshow(panel, interpolation="nearest")
            axis.set_xticks([])
            axis.set_yticks([])
            if row == 0:
                axis.set_title(name)
        if titles is not None:
            axes[row, 0].set_ylabel(titles[row])
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.stem}.tmp.png")
    figure.savefig(temporary, dpi=100)
    plt.close(figure)
    os.replace(temporary, path)
    return path


# --------------------------------------------------------------------------------------------------
# A full run
# --------------------------------------------------------------------------------------------------
def _build_split(config: LinearSegmentationConfig, split: str, max_samples, mean, std) -> SegmentationDataset:
    dataset, image_column, mask_column = load_segmentation_split(
        split,
        dataset_name=config.dataset_name,
        dataset_config_name=config.dataset_config_name,
        data_dir=config.data_dir,
        image_column=config.image_column,
        mask_column=config.mask_column,
        max_samples=max_samples,
        dataset_revision=config.dataset_revision,
    )
    return SegmentationDataset(
        dataset,
        image_column,
        mask_column,
        num_classes=config.num_classes,
        image_size=config.image_size,
        ignore_index=config.ignore_index,
        reduce_labels=config.reduce_labels,
        resize_mode=config.resize_mode,
        image_mean=mean,
        image_std=std,
    )


def _cache_key(config: LinearSegmentationConfig, model_name: str, split: str, hidden_size: int) -> dict:
    return {
        "model": model_name,
        "hidden_size": hidden_size,
        "data_source": config.dataset_name or config.data_dir,
        "dataset_config_name": config.dataset_config_name,
        "dataset_revision": config.dataset_revision,
        "split": split,
        "image_size": config.image_size,
        "resize_mode": config.resize_mode,
        "num_classes": config.num_classes,
        "ignore_index": config.ignore_index,
        "reduce_labels": config.reduce_labels,
    }


def _example_predictions(head, backbone, dataset: SegmentationDataset, count: int, device):
    images, labels, predictions = [], [], []
    for index in range(min(count, len(dataset))):
        item = dataset[index]
        with torch.no_grad():
            features = patch_feature_maps(backbone, item["pixel_values"][None].to(device))
            logits = head(features, output_size=item["labels"].shape[-2:])
        images.append(denormalise_image(item["pixel_values"].numpy(), dataset.image_mean, dataset.image_std))
        labels.append(item["labels"].numpy())
        predictions.append(logits.argmax(dim=1)[0].cpu().numpy())
    return images, labels, predictions


def _forget_accelerator_settings() -> None:
    """accelerate keeps one process-wide state and refuses a later `Accelerator` with other settings (mixed
    precision, ...); forgetting it after a run lets a program run several probes. The process group is kept."""
    from accelerate.state import AcceleratorState, GradientState

    for state in (AcceleratorState, GradientState):
        if hasattr(state, "_reset_state"):
            state._reset_state()


def run_linear_segmentation(config: LinearSegmentationConfig, model: nn.Module | None = None) -> dict:
    """Train and score a linear probe as `config` says; writes results.json, examples.png and probe/.

    Args:
        model: an already loaded backbone to use instead of loading ``config.model`` (whose name is then only
            recorded); its image statistics are ImageNet's.

    Returns:
        the results dict also written to ``OUTPUT_DIR/results.json`` (identical on every process).
    """
    try:
        return _run_linear_segmentation(config, model)
    finally:
        _forget_accelerator_settings()


def _run_linear_segmentation(config: LinearSegmentationConfig, model: nn.Module | None) -> dict:
    from accelerate import Accelerator

    validate_config(config, require_model=model is None)
    # Processes launched on a machine without GPUs must be told to form a CPU (gloo) group.
    launched_on_cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    accelerator = Accelerator(mixed_precision=config.mixed_precision, cpu=config.cpu or launched_on_cpu)
    output_dir = Path(config.output_dir)
    show = not config.disable_progress_bars and accelerator.is_local_main_process
    started = time.time()

    if model is None:
        backbone, mean, std = load_backbone(config.model)
    else:
        backbone, mean, std = model.eval(), IMAGENET_MEAN, IMAGENET_STD
    backbone = resolve_backbone(backbone)
    backbone.requires_grad_(False)
    backbone = backbone.to(accelerator.device)  # frozen: not wrapped for distributed training
    patch_size = patch_size_of(backbone)
    if config.image_size % patch_size:
        raise ValueError(
            f"--image_size {config.image_size} is not a multiple of the patch size {patch_size}; use e.g. "
            f"{max(1, round(config.image_size / patch_size)) * patch_size}."
        )
    grid = config.image_size // patch_size
    hidden_size = int(backbone.config.hidden_size)

    train_images = _build_split(config, config.train_split, config.max_train_samples, mean, std)
    val_images = _build_split(config, config.val_split, config.max_eval_samples, mean, std)

    if config.cache_features:
        cache_root = Path(config.feature_cache_dir) if config.feature_cache_dir else output_dir / "feature_cache"
        caches = {}
        for split, dataset in ((config.train_split, train_images), (config.val_split, val_images)):
            caches[split] = build_feature_cache(
                backbone,
                dataset,
                cache_root / split,
                _cache_key(config, config.model, split, hidden_size),
                batch_size=config.eval_batch_size,
                num_workers=config.num_workers,
                accelerator=accelerator,
                progress=show,
            )
        train_data, val_data = caches[config.train_split], caches[config.val_split]
    else:
        train_data, val_data = train_images, val_images

    head = make_segmentation_head(hidden_size, config.num_classes, config.seed)
    head, progress = train_head(head, train_data, config, accelerator, backbone=backbone)

    evaluation = dict(
        num_classes=config.num_classes,
        ignore_index=config.ignore_index,
        backbone=backbone,
        batch_size=config.eval_batch_size,
        num_workers=config.num_workers,
        accelerator=accelerator,
        progress=show,
    )
    validation = scores_from_confusion(evaluate_head(head, val_data, **evaluation), config.class_names)

    robustness = None
    shift = config.roll_shift_patches if config.roll_shift_patches is not None else grid // 2
    if config.robustness:
        robustness = {}
        for transform in ("none", *config.robustness_transforms):
            confusion = evaluate_head(head, val_images, transform=transform, shift_patches=shift, **evaluation)
            robustness[transform] = scores_from_confusion(confusion, config.class_names)

    results = {
        "model": config.model,
        "model_type": backbone.config.model_type,
        "hidden_size": hidden_size,
        "patch_size": patch_size,
        "num_train_samples": len(train_images),
        "num_val_samples": len(val_images),
        "training": {
            "global_step": progress.global_step,
            "epochs_completed": progress.epoch,
            "steps_per_epoch": progress.steps_per_epoch,
            "loss_per_epoch": list(progress.loss_per_epoch),
            "stopped_at_max_steps": progress.epoch < config.epochs,
        },
        "validation": validation,
        "robustness": robustness,
        "roll_shift_patches": shift if config.robustness else None,
        "seconds": time.time() - started,
        "config": dataclasses.asdict(config),
    }
    if accelerator.is_main_process:
        probe = LinearSegmentationProbe(
            config.num_classes,
            ignore_index=config.ignore_index,
            learning_rate=config.learning_rate,
            weight_decay=config.weight_decay,
            epochs=config.epochs,
            batch_size=config.batch_size,
            seed=config.seed,
            class_names=config.class_names,
        )
        probe._set_head(head, progress.loss_per_epoch)
        probe.save(output_dir / "probe")
        if config.num_example_images:
            examples = _example_predictions(head, backbone, val_images, config.num_example_images, accelerator.device)
            plot_example_predictions(*examples, config.num_classes, output_dir / "examples.png", config.ignore_index)
        write_json_atomic(output_dir / "results.json", results)
        accelerator.print(format_summary(results))
    accelerator.wait_for_everyone()
    return results


def format_summary(results: dict) -> str:
    """A few lines: validation mIoU and pixel accuracy, and the mIoU per robustness transform."""
    validation = results["validation"]
    lines = [
        f"{results['model']}: validation mIoU {validation['miou']:.4f}, pixel accuracy "
        f"{validation['pixel_accuracy']:.4f} ({validation['num_present_classes']} classes present)"
    ]
    for transform, scores in (results.get("robustness") or {}).items():
        lines.append(f"  {transform:8s} mIoU {scores['miou']:.4f}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------
def _option_type(type_text: str):
    if "bool" in type_text:
        return bool
    if "int" in type_text:
        return int
    if "float" in type_text:
        return float
    return str


def build_parser() -> argparse.ArgumentParser:
    """Options: ``--config FILE`` and one per configuration key; only options given are returned."""
    parser = argparse.ArgumentParser(
        prog="python -m evaluation.linear_segmentation",
        usage="%(prog)s --model NAME --config FILE [--output_dir DIR] [--robustness] [--resume_from_checkpoint latest] "
        "[options]",
        description="Semantic-segmentation linear probe on a frozen ViT backbone (BatchNorm + 1x1 linear head).",
        epilog="Options given here override the --config file; the file overrides the defaults (--data_dir or "
        "--dataset_name on the command line replaces the file's data source). Example: "
        "python -m evaluation.linear_segmentation --model facebook/dinov2-with-registers-small "
        "--config configs/linear_seg_voc2012.json --output_dir outputs/linseg --robustness",
        argument_default=argparse.SUPPRESS,
        allow_abbrev=False,
    )
    parser.add_argument("--config", help="JSON file of settings (keys as the options below, without --)")
    defaults = LinearSegmentationConfig()
    for item in dataclasses.fields(LinearSegmentationConfig):
        type_text = str(item.type)
        default = getattr(defaults, item.name)
        help_text = f"{FIELD_HELP[item.name]} (default: {default})"
        option = f"--{item.name}"
        if item.name == "mixed_precision":
            parser.add_argument(option, choices=MIXED_PRECISION_CHOICES, help=help_text)
        elif item.name == "resize_mode":
            parser.add_argument(option, choices=RESIZE_MODES, help=help_text)
        elif "bool" in type_text:
            parser.add_argument(option, action=argparse.BooleanOptionalAction, help=help_text)
        elif type_text.startswith("list"):
            parser.add_argument(option, nargs="+", metavar="NAME", help=help_text)
        else:
            parser.add_argument(option, type=_option_type(type_text), help=help_text)
    return parser


def parse_args(argv: Sequence[str] | None = None) -> LinearSegmentationConfig:
    """Command line -> validated configuration; exits with a message naming the problem for bad input."""
    parser = build_parser()
    arguments, unknown = parser.parse_known_args(argv)
    if unknown:
        options = [option for action in parser._actions for option in action.option_strings]
        flag = unknown[0].split("=")[0]
        parser.error(f"unknown option {unknown[0]!r}.{_suggest(flag, options)} Run with --help to list the options.")
    given = vars(arguments)
    config_path = given.pop("config", None)
    try:
        file_values = load_config_file(config_path) if config_path else {}
        # A data source named on the command line replaces the file's, whichever kind that is.
        for chosen, other in (("data_dir", "dataset_name"), ("dataset_name", "data_dir")):
            if chosen in given and other not in given:
                file_values.pop(other, None)
        return make_config(file_values, given)
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))


def main(argv: Sequence[str] | None = None) -> dict:
    """Entry point of ``python -m evaluation.linear_segmentation``."""
    return run_linear_segmentation(parse_args(argv))


if __name__ == "__main__":
    main()
