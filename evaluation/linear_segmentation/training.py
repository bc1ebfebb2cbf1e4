"""Training and evaluation of the probe head under Accelerate, and a full run (the command line's work).

The run layer (:mod:`alibi_dinov2.training.runs`) gives the accelerator, the checkpoints
(``OUTPUT_DIR/checkpoints/checkpoint_<step:08d>``, complete or absent), the resume, the teardown after a run and
the Hub push; this module only says what to train and score. A run is :func:`run_linear_segmentation`:
:func:`prepare_run` (accelerator, output folder), :func:`load_frozen_backbone`, :func:`load_image_splits`,
:func:`training_and_validation_data` (the feature caches), :func:`train_head`, :func:`score_probe` and
:func:`write_outputs`, each given what it needs.
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
from alibi_dinov2.io.images import SkippedInputs
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
from evaluation.linear_segmentation.estimator import LinearSegmentationProbe
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
@dataclasses.dataclass
class HeadTraining:
    """The prepared objects of one training of the head, handed to its step functions."""

    head: nn.Module
    optimizer: torch.optim.Optimizer
    loader: torch.utils.data.DataLoader
    progress: TrainingProgress
    config: LinearSegmentationConfig
    accelerator: object
    backbone: nn.Module | None = None
    show: bool = False


def train_head(
    head: LinearSegmentationHead,
    train_dataset: torch.utils.data.Dataset,
    config: LinearSegmentationConfig,
    accelerator,
    backbone: nn.Module | None = None,
    num_workers: int = 0,
) -> tuple[LinearSegmentationHead, TrainingProgress]:
    """Train the head for ``config.num_train_epochs`` (or until ``config.max_train_steps``), checkpointing as
    ``config.checkpointing_steps`` says, after resuming from ``config.resume_from_checkpoint``.

    `train_dataset` yields ``features`` (cached) or ``pixel_values`` (then `backbone` computes the features) and
    ``labels``. Returns the unwrapped head (eval mode) and the training progress.
    """
    sampler = EpochShuffleSampler(len(train_dataset), config.seed)
    loader = torch.utils.data.DataLoader(
        train_dataset, batch_size=config.per_device_train_batch_size, sampler=sampler, num_workers=num_workers
    )
    if accelerator.num_processes > 1 and accelerator.device.type == "cuda":
        # Statistics over the global batch, as on one device (SyncBatchNorm needs GPUs; CPU groups keep local ones).
        head = nn.SyncBatchNorm.convert_sync_batchnorm(head)
    optimizer = torch.optim.AdamW(head.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    head, optimizer, loader = accelerator.prepare(head, optimizer, loader)
    progress = TrainingProgress(steps_per_epoch=len(loader))
    accelerator.register_for_checkpointing(progress)
    resume_training(accelerator, config)

    show = not config.no_progress and accelerator.is_local_main_process
    training = HeadTraining(head, optimizer, loader, progress, config, accelerator, backbone, show)
    while progress.epoch < config.num_train_epochs and steps_left(config, progress):
        train_one_epoch(training)
    return accelerator.unwrap_model(head).eval(), progress


def resume_training(accelerator, config: LinearSegmentationConfig) -> None:
    """Load ``--resume_from_checkpoint`` into the prepared and registered objects (`latest` with none: nothing)."""
    checkpoint = runs.resolve_resume_checkpoint(config.resume_from_checkpoint, config.output_dir)
    if checkpoint is not None:
        accelerator.print(f"Resuming from {checkpoint}")
        runs.load_checkpoint(accelerator, checkpoint)
    elif config.resume_from_checkpoint == "latest":
        accelerator.print(f"No checkpoint in {runs.checkpoints_root(config.output_dir)} yet: training from the start.")


def steps_left(config: LinearSegmentationConfig, progress: TrainingProgress) -> bool:
    """Whether ``--max_train_steps`` (if set) allows another optimiser step."""
    return config.max_train_steps is None or progress.global_step < config.max_train_steps


def checkpoint_due(config: LinearSegmentationConfig, global_step: int, stopping: bool) -> bool:
    """A checkpoint after this step, apart from the end of an epoch: every N steps (``--checkpointing_steps N``)
    and, with any ``--checkpointing_steps``, where ``--max_train_steps`` stops the training."""
    every = config.checkpointing_steps
    if every is None:
        return False
    return stopping or (isinstance(every, int) and global_step % every == 0)


def train_one_epoch(training: HeadTraining) -> None:
    """The rest of the current epoch (from the step a resumed run stopped at), or up to ``--max_train_steps``."""
    config, progress = training.config, training.progress
    batches = runs.epoch_batches(training.accelerator, training.loader, progress.epoch, progress.step_in_epoch)
    training.head.train()
    bar = tqdm(
        batches,
        total=progress.steps_per_epoch,
        initial=progress.step_in_epoch,
        desc=f"epoch {progress.epoch + 1}/{config.num_train_epochs}",
        disable=not training.show,
    )
    for batch in bar:
        loss = training_step(training, batch)
        bar.set_postfix(loss=f"{loss:.4f}")
        stopping = not steps_left(config, progress)
        mid_epoch = progress.step_in_epoch < progress.steps_per_epoch  # the end of an epoch is handled below
        if mid_epoch and checkpoint_due(config, progress.global_step, stopping):
            save_training_checkpoint(training)
        if stopping:
            break
    bar.close()
    if progress.step_in_epoch >= progress.steps_per_epoch:
        finish_epoch(training)


def training_step(training: HeadTraining, batch: dict) -> float:
    """One optimiser step on a batch; counts it and logs the loss every ``--logging_steps`` to the trackers."""
    accelerator, progress, config = training.accelerator, training.progress, training.config
    with accelerator.autocast():
        features, labels = features_and_labels(batch, training.backbone, accelerator.device)
        logits = training.head(features, output_size=labels.shape[-2:])
        loss = segmentation_loss(logits, labels, config.ignore_index)
    training.optimizer.zero_grad(set_to_none=True)
    accelerator.backward(loss)
    training.optimizer.step()
    value = float(loss.detach())
    progress.step_in_epoch += 1
    progress.global_step += 1
    progress.epoch_loss_sum += value
    progress.epoch_loss_count += 1
    if config.trackers and progress.global_step % config.logging_steps == 0:
        learning_rate = training.optimizer.param_groups[0]["lr"]
        accelerator.log({"train/loss": value, "train/learning_rate": learning_rate}, step=progress.global_step)
    return value


def finish_epoch(training: HeadTraining) -> None:
    """Record the epoch's mean loss over every process, move on to the next epoch and checkpoint it when due
    (``--checkpointing_steps epoch``, a multiple of N steps, or the stop at ``--max_train_steps``)."""
    accelerator, progress, config = training.accelerator, training.progress, training.config
    totals = accelerator.reduce(
        torch.tensor([progress.epoch_loss_sum, progress.epoch_loss_count], device=accelerator.device), "sum"
    )
    epoch_loss = float(totals[0] / max(float(totals[1]), 1.0))
    progress.loss_per_epoch.append(epoch_loss)
    progress.epoch += 1
    progress.step_in_epoch, progress.epoch_loss_sum, progress.epoch_loss_count = 0, 0.0, 0
    if config.trackers:
        accelerator.log({"train/epoch_loss": epoch_loss}, step=progress.global_step)
    stopping = not steps_left(config, progress)
    if config.checkpointing_steps == "epoch" or checkpoint_due(config, progress.global_step, stopping):
        save_training_checkpoint(training)


def save_training_checkpoint(training: HeadTraining) -> Path:
    """``OUTPUT_DIR/checkpoints/checkpoint_<global step>`` (every process calls it)."""
    config = training.config
    return runs.save_checkpoint(
        training.accelerator, config.output_dir, training.progress.global_step, config.checkpoints_total_limit
    )


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
@dataclasses.dataclass
class ProbeRun:
    """What every step of a run shares: the settings, the accelerator and the output folder."""

    config: LinearSegmentationConfig
    accelerator: object
    output_dir: Path
    num_workers: int
    show: bool  # progress bars on this process
    started: float


@dataclasses.dataclass
class FrozenBackbone:
    """The backbone on the run's device, without gradients, and what the run reads from it."""

    module: nn.Module
    image_mean: tuple[float, ...]
    image_std: tuple[float, ...]
    patch_size: int
    hidden_size: int


@dataclasses.dataclass
class ImageSplits:
    """The usable images of both splits and the skipped ones, by split name."""

    train: SegmentationDataset
    val: SegmentationDataset
    skipped: dict[str, SkippedInputs]


def run_linear_segmentation(config: LinearSegmentationConfig, model: nn.Module | None = None) -> dict:
    """Train and score a linear probe as `config` says; writes results.json, examples.png and probe/.

    Args:
        model: an already loaded backbone to use instead of loading ``config.model`` (whose name is then only
            recorded); its image statistics are ImageNet's.

    Returns:
        the results dict also written to ``OUTPUT_DIR/results.json`` (identical on every process).
    """
    try:
        run = prepare_run(config, require_model=model is None)
        backbone = load_frozen_backbone(run, model)
        images = load_image_splits(run, backbone)
        train_data, val_data = training_and_validation_data(run, backbone, images)
        head = make_segmentation_head(backbone.hidden_size, config.num_classes, config.seed)
        head, progress = train_head(
            head, train_data, config, run.accelerator, backbone=backbone.module, num_workers=run.num_workers
        )
        validation, robustness = score_probe(run, backbone, head, val_data, images.val)
        results = collect_results(run, backbone, images, progress, validation, robustness)
        write_outputs(run, backbone, head, progress, images.val, results)
        return results
    finally:
        runs.release_accelerator()


def prepare_run(config: LinearSegmentationConfig, require_model: bool = True) -> ProbeRun:
    """Check the settings and the model source, make the accelerator (trackers started) and clean the folder."""
    validate_config(config, require_model=require_model)
    if require_model:
        check_model_source(config.model)
    output_dir = Path(config.output_dir)
    accelerator = runs.make_accelerator(
        output_dir, mixed_precision=config.mixed_precision, log_with=config.trackers, cpu=config.cpu
    )
    if accelerator.is_main_process:
        runs.remove_incomplete_checkpoints(output_dir)
    if config.trackers:
        scalars = {key: value for key, value in dataclasses.asdict(config).items()
                   if isinstance(value, (bool, int, float, str))}
        accelerator.init_trackers("linear_segmentation", config=scalars)
    return ProbeRun(
        config=config,
        accelerator=accelerator,
        output_dir=output_dir,
        num_workers=default_num_workers(config.dataloader_num_workers, accelerator.num_processes),
        show=not config.no_progress and accelerator.is_local_main_process,
        started=time.time(),
    )


def load_frozen_backbone(run: ProbeRun, model: nn.Module | None = None) -> FrozenBackbone:
    """``config.model`` (or `model`) frozen on the run's device; checks ``--image_size`` against its patch."""
    config, accelerator = run.config, run.accelerator
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
    return FrozenBackbone(backbone, mean, std, patch_size, int(backbone.config.hidden_size))


def feature_cache_root(run: ProbeRun) -> Path:
    """``--feature_cache_dir``, or OUTPUT_DIR/feature_cache."""
    directory = run.config.feature_cache_dir
    return Path(directory) if directory else run.output_dir / "feature_cache"


def load_image_splits(run: ProbeRun, backbone: FrozenBackbone) -> ImageSplits:
    """The training and validation images without the unreadable or too-small ones (recorded with the cache)."""
    config = run.config
    usable, skipped = {}, {}
    limits = ((config.train_split, config.max_train_samples), (config.val_split, config.max_eval_samples))
    for split, max_samples in limits:
        images = build_split(config, split, max_samples, backbone.image_mean, backbone.image_std)
        record = feature_cache_root(run) / split / "image_check.json" if config.cache_features else None
        usable[split], skipped[split] = drop_unusable_images(
            images,
            backbone.patch_size,
            config.strict,
            run.accelerator,
            run.num_workers,
            record=record,
            identity=image_check_key(config, split, max_samples),
        )
    return ImageSplits(usable[config.train_split], usable[config.val_split], skipped)


def training_and_validation_data(run: ProbeRun, backbone: FrozenBackbone, images: ImageSplits) -> tuple:
    """The cached features of both splits (built when missing), or the images themselves without the cache."""
    config = run.config
    if not config.cache_features:
        return images.train, images.val
    return tuple(
        build_feature_cache(
            backbone.module,
            dataset,
            feature_cache_root(run) / split,
            cache_key(config, split, backbone.hidden_size, images.skipped[split]),
            batch_size=config.per_device_eval_batch_size,
            num_workers=run.num_workers,
            accelerator=run.accelerator,
            progress=run.show,
        )
        for split, dataset in ((config.train_split, images.train), (config.val_split, images.val))
    )


def roll_shift(config: LinearSegmentationConfig, backbone: FrozenBackbone) -> int:
    """``--roll_shift_patches``, or half the patch grid."""
    if config.roll_shift_patches is not None:
        return config.roll_shift_patches
    return config.image_size // backbone.patch_size // 2


def score_probe(run: ProbeRun, backbone: FrozenBackbone, head, val_data, val_images) -> tuple[dict, dict | None]:
    """Validation scores, and with ``--robustness`` the scores per input transform (None without)."""
    config = run.config
    evaluation = dict(
        num_classes=config.num_classes,
        ignore_index=config.ignore_index,
        backbone=backbone.module,
        batch_size=config.per_device_eval_batch_size,
        num_workers=run.num_workers,
        accelerator=run.accelerator,
        progress=run.show,
    )
    validation = scores_from_confusion(evaluate_head(head, val_data, **evaluation), config.class_names)
    if not config.robustness:
        return validation, None
    robustness, shift = {}, roll_shift(config, backbone)
    for transform in ("none", *config.robustness_transforms):
        confusion = evaluate_head(head, val_images, transform=transform, shift_patches=shift, **evaluation)
        robustness[transform] = scores_from_confusion(confusion, config.class_names)
    return validation, robustness


def collect_results(
    run: ProbeRun,
    backbone: FrozenBackbone,
    images: ImageSplits,
    progress: TrainingProgress,
    validation: dict,
    robustness: dict | None,
) -> dict:
    """The contents of results.json."""
    config = run.config
    return {
        "model": config.model,
        "model_type": backbone.module.config.model_type,
        "hidden_size": backbone.hidden_size,
        "patch_size": backbone.patch_size,
        "num_train_samples": len(images.train),
        "num_val_samples": len(images.val),
        "skipped_inputs": {split: items.as_dict() for split, items in images.skipped.items()},
        "training": {
            "global_step": progress.global_step,
            "epochs_completed": progress.epoch,
            "steps_per_epoch": progress.steps_per_epoch,
            "loss_per_epoch": list(progress.loss_per_epoch),
            "stopped_at_max_steps": progress.epoch < config.num_train_epochs,
        },
        "validation": validation,
        "robustness": robustness,
        "roll_shift_patches": roll_shift(config, backbone) if config.robustness else None,
        "seconds": time.time() - run.started,
        "config": dataclasses.asdict(config),
    }


def trained_probe(config: LinearSegmentationConfig, head, progress: TrainingProgress) -> LinearSegmentationProbe:
    """The trained head as a fitted :class:`LinearSegmentationProbe` with the run's settings."""
    return LinearSegmentationProbe.from_head(
        head,
        progress.loss_per_epoch,
        num_classes=config.num_classes,
        ignore_index=config.ignore_index,
        learning_rate=config.learning_rate,
        weight_decay=config.weight_decay,
        epochs=config.num_train_epochs,
        batch_size=config.per_device_train_batch_size,
        seed=config.seed,
        class_names=config.class_names,
    )


def write_outputs(run: ProbeRun, backbone: FrozenBackbone, head, progress, val_images, results: dict) -> None:
    """On the main process: probe/, examples.png, results.json, the summary and the upload; then every process
    waits for them and ends its trackers."""
    config, accelerator, output_dir = run.config, run.accelerator, run.output_dir
    if accelerator.is_main_process:
        trained_probe(config, head, progress).save(output_dir / "probe")
        if config.num_example_images:
            examples = _example_predictions(
                head, backbone.module, val_images, config.num_example_images, accelerator.device
            )
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
    if config.trackers:
        accelerator.end_training()


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
