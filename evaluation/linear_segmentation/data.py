"""Data of the linear probes: the frozen backbone's patch features, the image splits (with the skip policy for
unreadable images), the float16 feature cache, the data order and the input transforms of the robustness mode."""

from __future__ import annotations

import json
import os
from contextlib import nullcontext
from pathlib import Path
from typing import Union

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from alibi_dinov2.cli import did_you_mean
from alibi_dinov2.features.extraction import extract_patch_features_batch, patch_size_of
from alibi_dinov2.features.preprocessing import image_statistics
from alibi_dinov2.io.files import save_array_atomic, write_json_atomic
from alibi_dinov2.io.images import ImageReadError, SkippedInputs, check_image_size, describe_source
from evaluation.linear_segmentation.config import TRANSFORMS, LinearSegmentationConfig
from evaluation.linear_segmentation.datasets import SegmentationDataset, load_segmentation_split


PathLike = Union[str, os.PathLike]

_CACHE_FORMAT_VERSION = 2


# --------------------------------------------------------------------------------------------------
# Backbone features
# --------------------------------------------------------------------------------------------------
def load_backbone(name: str) -> tuple[nn.Module, tuple[float, ...], tuple[float, ...]]:
    """``AutoModel.from_pretrained(name, trust_remote_code=True)`` in eval mode, and its image mean and std.

    The statistics come from the model's image processor when one is stored with it, else ImageNet's.
    """
    from alibi_dinov2.hub.models import load_model

    model, statistics = load_model(name)
    mean, std = image_statistics(statistics)
    return model, tuple(float(value) for value in mean), tuple(float(value) for value in std)


def patch_feature_maps(model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """Batched patch features of a frozen backbone, without gradients.

    Args:
        model: a transformers image model giving patch tokens (see ``alibi_dinov2.features.extraction``).
        pixel_values: (B, 3, H, W) normalised images, H and W multiples of the patch size p.

    Returns:
        (B, C, H // p, W // p): ``last_hidden_state`` with the CLS / register tokens dropped.
    """
    patch_size = patch_size_of(model)
    height, width = pixel_values.shape[-2:]
    if height % patch_size or width % patch_size:
        raise ValueError(
            f"Image size {height}x{width} is not a multiple of the patch size {patch_size}; set --image_size to a "
            f"multiple of {patch_size}."
        )
    grids = extract_patch_features_batch(model, pixel_values)  # (B, h, w, C), inference mode
    return grids.permute(0, 3, 1, 2).clone()  # a normal tensor: the head trains on it


def features_and_labels(batch: dict, backbone: nn.Module | None, device) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch's (B, C, h, w) features (cached, or computed by `backbone`) and (B, S, S) labels on `device`."""
    labels = batch["labels"].to(device)
    if "features" in batch:
        return batch["features"].to(device), labels
    return patch_feature_maps(backbone, batch["pixel_values"].to(device)), labels


# --------------------------------------------------------------------------------------------------
# Input transforms of the robustness mode
# --------------------------------------------------------------------------------------------------
def _unknown_transform(name: str) -> ValueError:
    return ValueError(f"Unknown transform {name!r}; choose from {TRANSFORMS}{did_you_mean(name, TRANSFORMS)}.")


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
    raise _unknown_transform(name)


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
    raise _unknown_transform(name)


# --------------------------------------------------------------------------------------------------
# Image splits and the skip policy
# --------------------------------------------------------------------------------------------------
class _ImageCheck(torch.utils.data.Dataset):
    """(index, name, problem or None) of each sample: its image decodes and is at least one patch large."""

    def __init__(self, dataset: SegmentationDataset, indices: list[int], patch_size: int):
        self.dataset, self.indices, self.patch_size = dataset, indices, patch_size

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int):
        index = self.indices[position]
        row = self.dataset.dataset[index]
        name = self.dataset.sample_name(index, row)
        try:
            image = self.dataset.read_image(index, row)
            check_image_size(image, self.patch_size, describe_source(row[self.dataset.image_column]))
        except (ImageReadError, FileNotFoundError) as error:
            return index, name, str(error)
        return index, name, None


def _find_problems(dataset: SegmentationDataset, patch_size: int, accelerator, num_workers: int) -> list[tuple]:
    """`(index, name, problem)` of every unusable sample, sorted; every image decoded once, shared by the processes."""
    rank, world = (0, 1) if accelerator is None else (accelerator.process_index, accelerator.num_processes)
    mine = list(range(rank, len(dataset), world))
    loader = torch.utils.data.DataLoader(
        _ImageCheck(dataset, mine, patch_size), batch_size=16, num_workers=num_workers, collate_fn=list
    )
    problems = [item for batch in loader for item in batch if item[2] is not None]
    if world > 1:
        from accelerate.utils import gather_object

        problems = gather_object(problems)
    return sorted(problems)


def _recorded_problems(record: Path | None, identity: dict) -> list[tuple] | None:
    """The problems kept in `record` by an earlier check of the same split (same `identity`), else None."""
    if record is None or not record.is_file():
        return None
    try:
        stored = json.loads(record.read_text())
    except (OSError, ValueError):
        return None
    if stored.get("identity") != identity:
        return None
    return [tuple(problem) for problem in stored["problems"]]


def drop_unusable_images(
    dataset: SegmentationDataset,
    patch_size: int,
    strict: bool = False,
    accelerator=None,
    num_workers: int = 0,
    record: PathLike | None = None,
    identity: dict | None = None,
) -> tuple[SegmentationDataset, SkippedInputs]:
    """`dataset` without the samples whose image cannot be read or is smaller than one patch.

    Each skipped image is named in a warning and counted at the end (:class:`alibi_dinov2.io.images.SkippedInputs`);
    with `strict` the first one raises instead. Every image is decoded once, the processes of a run sharing them.
    With `record` (a JSON file), the problems found are kept there with `identity` (what the split was read from,
    see :func:`image_check_key`), and a later run with the same identity reads them instead of decoding every image
    again (a rerun on a complete feature cache starts at once).
    """
    is_main = accelerator is None or accelerator.is_main_process
    record = None if record is None else Path(record)
    identity = dict(identity or {}, num_samples=len(dataset), patch_size=patch_size)
    problems = _recorded_problems(record, identity)
    if accelerator is not None:
        accelerator.wait_for_everyone()  # every process has looked at the record before the main one writes it
    if problems is None:
        problems = _find_problems(dataset, patch_size, accelerator, num_workers)
        if record is not None and is_main:
            write_json_atomic(record, {"identity": identity, "problems": problems})
    skipped = SkippedInputs(strict=strict)
    for _, name, message in problems:
        if is_main or strict:  # one warning per image; every process fails alike when strict
            skipped.add(name, ImageReadError(message))
    if is_main:
        skipped.summarise(total=len(dataset))
    if not problems:
        return dataset, skipped
    bad = {index for index, _, _ in problems}
    return dataset.select([index for index in range(len(dataset)) if index not in bad]), skipped


def build_split(config: LinearSegmentationConfig, split: str, max_samples, mean, std) -> SegmentationDataset:
    """One split of the configured data source as resized, normalised image/mask pairs."""
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


# --------------------------------------------------------------------------------------------------
# Feature cache
# --------------------------------------------------------------------------------------------------
def _split_source(config: LinearSegmentationConfig, split: str) -> dict:
    """Where a split's images come from, as the cache keys name it."""
    return {
        "data_source": config.dataset_name or config.data_dir,
        "dataset_config_name": config.dataset_config_name,
        "dataset_revision": config.dataset_revision,
        "split": split,
    }


def cache_key(config: LinearSegmentationConfig, split: str, hidden_size: int, skipped: SkippedInputs) -> dict:
    """What a split's feature cache is built from; a cache with another key is refused."""
    return {
        "model": config.model,
        "hidden_size": hidden_size,
        **_split_source(config, split),
        "image_size": config.image_size,
        "resize_mode": config.resize_mode,
        "num_classes": config.num_classes,
        "ignore_index": config.ignore_index,
        "reduce_labels": config.reduce_labels,
        "skipped_inputs": skipped.names,
    }


def image_check_key(config: LinearSegmentationConfig, split: str, max_samples) -> dict:
    """What the unusable images of a split depend on (see :func:`drop_unusable_images`)."""
    return {**_split_source(config, split), "max_samples": max_samples}


def _label_dtype(num_classes: int, ignore_index: int):
    return np.uint8 if max(num_classes - 1, ignore_index) <= 255 and ignore_index >= 0 else np.int32


def _entry(cache_dir: Path, kind: str, index: int) -> Path:
    return cache_dir / kind / f"{index:07d}.npy"


class CachedFeatureDataset(torch.utils.data.Dataset):
    """Items of a feature cache: ``features`` (C, h, w) float32 (stored float16), ``labels`` (S, S) int64,
    ``index``."""

    def __init__(self, cache_dir: PathLike):
        self.cache_dir = Path(cache_dir)
        info_path = self.cache_dir / "info.json"
        if not info_path.is_file():
            raise FileNotFoundError(f"{self.cache_dir} is no feature cache (no info.json).")
        self.info = json.loads(info_path.read_text())

    def __len__(self) -> int:
        return int(self.info["num_samples"])

    def __getitem__(self, index: int) -> dict:
        features = np.load(_entry(self.cache_dir, "features", index))
        labels = np.load(_entry(self.cache_dir, "labels", index))
        return {
            "features": torch.from_numpy(features.astype(np.float32)),
            "labels": torch.from_numpy(labels.astype(np.int64)),
            "index": int(index),
        }


def _missing_cache_entries(cache_dir: Path, num_samples: int) -> list[int]:
    return [
        index
        for index in range(num_samples)
        if not _entry(cache_dir, "features", index).is_file() or not _entry(cache_dir, "labels", index).is_file()
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
    ``labels/0000000.npy`` (S, S), and beside them the split's ``image_check.json`` (see :func:`drop_unusable_images`).
    Entries already present are kept, so an interrupted build continues; with several processes each computes a
    share. A cache built from other settings raises ValueError.
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
                f"The feature cache {cache_dir} was built with other settings ({', '.join(changed)} differ). "
                "Delete it "
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
        with accelerator.autocast() if accelerator is not None else nullcontext():
            for batch in tqdm(loader, desc=f"caching features ({cache_dir.name})", disable=not progress):
                features = patch_feature_maps(backbone, batch["pixel_values"].to(device))
                features = features.to(torch.float16).cpu().numpy()
                for index, sample_features, labels in zip(batch["index"].tolist(), features, batch["labels"].numpy()):
                    save_array_atomic(_entry(cache_dir, "labels", index), labels.astype(label_dtype))
                    save_array_atomic(_entry(cache_dir, "features", index), sample_features)
    if accelerator is not None:
        accelerator.wait_for_everyone()
    return CachedFeatureDataset(cache_dir)
