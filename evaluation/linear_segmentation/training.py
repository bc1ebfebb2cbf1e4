"""Training and evaluation of the probe head under Accelerate, and a full run (the command line's work).

The run layer (:mod:`alibi_dinov2.training.runs`) gives the accelerator, the checkpoints
(``OUTPUT_DIR/checkpoints/checkpoint_<step:08d>``, complete or absent), the resume, the teardown after a run and
the Hub push; this module only says what to train and score.
"""

from __future__ import annotations

import dataclasses
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from alibi_dinov2.cli import default_num_workers
from alibi_dinov2.features.extraction import patch_size_of, resolve_backbone
from alibi_dinov2.features.preprocessing import IMAGENET_MEAN, IMAGENET_STD, denormalize
from alibi_dinov2.hub import push
from alibi_dinov2.hub.sources import check_model_source
from alibi_dinov2.io.files import write_json_atomic
from alibi_dinov2.training import runs
from evaluation.linear_segmentation.config import LinearSegmentationConfig, validate_config
from evaluation.linear_segmentation.data import (
    EpochShuffleSampler,
    build_feature_cache,
    build_split,
    cache_key,
    drop_unusable_images,
    features_and_labels,
    image_check_key,
    load_backbone,
    patch_feature_maps,
    transform_images,
    undo_transform_on_features,
)
from evaluation.linear_segmentation.datasets import SegmentationDataset
from evaluation.linear_segmentation.estimator import SAVED_PARAMS, LinearSegmentationProbe
from evaluation.linear_segmentation.figures import plot_example_predictions
from evaluation.linear_segmentation.head import LinearSegmentationHead, make_segmentation_head, segmentation_loss
from evaluation.metrics import confusion_counts, scores_from_confusion


@dataclasses.dataclass
class TrainingProgress(runs.StateDictDataclass):
    """Where training stands; saved with every checkpoint (``accelerator.register_for_checkpointing``)."""

    steps_per_epoch: int
    epoch: int = 0  # current (unfinished) epoch
    step_in_epoch: int = 0  # optimiser steps done in it
    global_step: int = 0
    epoch_loss_sum: float = 0.0
    epoch_loss_count: int = 0
    loss_per_epoch: list[float] = dataclasses.field(default_factory=list)

    def load_state_dict(self, state: dict) -> None:
        if int(state["steps_per_epoch"]) != self.steps_per_epoch:
            raise ValueError(
                f"The checkpoint has {state['steps_per_epoch']} steps per epoch, this run {self.steps_per_epoch}: "
                "resume with the same data, batch size and number of processes, or start a new --output_dir."
            )
        super().load_state_dict(state)


# --------------------------------------------------------------------------------------------------
# Training and evaluation under Accelerate
# --------------------------------------------------------------------------------------------------
def train_head(
    head: LinearSegmentationHead,
    train_dataset: torch.utils.data.Dataset,
    config: LinearSegmentationConfig,
    accelerator,
    backbone: nn.Module | None = None,
    num_workers: int = 0,
) -> tuple[LinearSegmentationHead, TrainingProgress]:
    """Train the head for ``config.epochs`` (or until ``config.max_steps``), checkpointing as it goes.

    `train_dataset` yields ``features`` (cached) or ``pixel_values`` (then `backbone` computes the features) and
    ``labels``. Returns the unwrapped head (eval mode) and the training progress.
    """
    sampler = EpochShuffleSampler(len(train_dataset), config.seed)
    loader = torch.utils.data.DataLoader(
        train_dataset, batch_size=config.batch_size, sampler=sampler, num_workers=num_workers
    )
    if accelerator.num_processes > 1 and accelerator.device.type == "cuda":
        # Statistics over the global batch, as on one device (SyncBatchNorm needs GPUs; CPU groups keep local ones).
        head = nn.SyncBatchNorm.convert_sync_batchnorm(head)
    optimizer = torch.optim.AdamW(head.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    head, optimizer, loader = accelerator.prepare(head, optimizer, loader)
    progress = TrainingProgress(steps_per_epoch=len(loader))
    accelerator.register_for_checkpointing(progress)

    checkpoint = runs.resolve_resume_checkpoint(config.resume_from_checkpoint, config.output_dir)
    if checkpoint is not None:
        accelerator.print(f"Resuming from {checkpoint}")
        runs.load_checkpoint(accelerator, checkpoint)
    elif config.resume_from_checkpoint == "latest":
        accelerator.print(f"No checkpoint in {runs.checkpoints_root(config.output_dir)} yet: training from the start.")

    def budget_left() -> bool:
        return config.max_steps is None or progress.global_step < config.max_steps

    def checkpoint_now() -> None:
        runs.save_checkpoint(accelerator, config.output_dir, progress.global_step, config.checkpoints_total_limit)

    show = not config.disable_progress_bars and accelerator.is_local_main_process
    while progress.epoch < config.epochs and budget_left():
        batches = runs.epoch_batches(accelerator, loader, progress.epoch, progress.step_in_epoch)
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
                features, labels = features_and_labels(batch, backbone, accelerator.device)
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
                checkpoint_now()
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
            checkpoint_now()
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
    with torch.no_grad(), accelerator.autocast() if accelerator is not None else nullcontext():
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
            confusion += confusion_counts(predictions, labels, num_classes, ignore_index)
    if accelerator is not None:
        confusion = accelerator.reduce(confusion, "sum")
    return confusion.cpu().numpy().astype(np.int64)


def _example_predictions(head, backbone, dataset: SegmentationDataset, count: int, device):
    images, labels, predictions = [], [], []
    for index in range(min(count, len(dataset))):
        item = dataset[index]
        with torch.no_grad():
            features = patch_feature_maps(backbone, item["pixel_values"][None].to(device))
            logits = head(features, output_size=item["labels"].shape[-2:])
        images.append(denormalize(item["pixel_values"].numpy(), dataset.image_mean, dataset.image_std))
        labels.append(item["labels"].numpy())
        predictions.append(logits.argmax(dim=1)[0].cpu().numpy())
    return images, labels, predictions


# --------------------------------------------------------------------------------------------------
# A full run
# --------------------------------------------------------------------------------------------------
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
        runs.release_accelerator()


def _run_linear_segmentation(config: LinearSegmentationConfig, model: nn.Module | None) -> dict:
    validate_config(config, require_model=model is None)
    if model is None:
        check_model_source(config.model)
    output_dir = Path(config.output_dir)
    accelerator = runs.make_accelerator(output_dir, mixed_precision=config.mixed_precision, cpu=config.cpu)
    if accelerator.is_main_process:
        runs.remove_incomplete_checkpoints(output_dir)
    show = not config.disable_progress_bars and accelerator.is_local_main_process
    num_workers = default_num_workers(config.num_workers, accelerator.num_processes)
    started = time.time()

    if model is None:
        with accelerator.main_process_first():  # the first process downloads, the others read its cache
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

    cache_root = Path(config.feature_cache_dir) if config.feature_cache_dir else output_dir / "feature_cache"
    splits, skipped = {}, {}
    for split, max_samples in (
        (config.train_split, config.max_train_samples),
        (config.val_split, config.max_eval_samples),
    ):
        images = build_split(config, split, max_samples, mean, std)
        record = cache_root / split / "image_check.json" if config.cache_features else None
        splits[split], skipped[split] = drop_unusable_images(
            images, patch_size, config.strict, accelerator, num_workers,
            record=record, identity=image_check_key(config, split, max_samples),
        )
    train_images, val_images = splits[config.train_split], splits[config.val_split]

    if config.cache_features:
        caches = {
            split: build_feature_cache(
                backbone,
                dataset,
                cache_root / split,
                cache_key(config, split, hidden_size, skipped[split]),
                batch_size=config.eval_batch_size,
                num_workers=num_workers,
                accelerator=accelerator,
                progress=show,
            )
            for split, dataset in splits.items()
        }
        train_data, val_data = caches[config.train_split], caches[config.val_split]
    else:
        train_data, val_data = train_images, val_images

    head = make_segmentation_head(hidden_size, config.num_classes, config.seed)
    head, progress = train_head(head, train_data, config, accelerator, backbone=backbone, num_workers=num_workers)

    evaluation = dict(
        num_classes=config.num_classes,
        ignore_index=config.ignore_index,
        backbone=backbone,
        batch_size=config.eval_batch_size,
        num_workers=num_workers,
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
        "skipped_inputs": {split: items.as_dict() for split, items in skipped.items()},
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
        probe = LinearSegmentationProbe(**{name: getattr(config, name) for name in SAVED_PARAMS})
        probe._set_head(head, progress.loss_per_epoch)
        probe.save(output_dir / "probe")
        if config.num_example_images:
            examples = _example_predictions(head, backbone, val_images, config.num_example_images, accelerator.device)
            plot_example_predictions(*examples, config.num_classes, output_dir / "examples.png", config.ignore_index)
        write_json_atomic(output_dir / "results.json", results)
        accelerator.print(format_summary(results))
        if config.push_to_hub:
            repo_id = config.hub_model_id or output_dir.resolve().name
            url = push.push_to_hub(
                output_dir,
                repo_id,
                private=config.hub_private_repo,
                commit_message=f"Linear segmentation probe on {config.model}",
                ignore_patterns=["feature_cache/"],
            )
            accelerator.print(f"Pushed {output_dir} to {url}")
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
    for split, items in (results.get("skipped_inputs") or {}).items():
        if items:
            lines.append(f"  skipped {len(items)} unreadable or too-small {split} image(s)")
    return "\n".join(lines)
