"""A distillation run: the student learns the teacher's final-normed patch tokens on the training images, with
the positional probe of a :class:`PositionalMonitor` on held-out images, checkpoints that resume exactly, tracker
logs, and the final remote-code model folder with its model card and `train_summary.json`.

`prepare_run` builds a :class:`DistillationRun` that every training step receives; `train` loops over the epochs.
The options are `train_distill.py`'s (a :class:`~alibi_dinov2.training.arguments.RunArguments` with the
distillation's own fields).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from alibi_dinov2.cli import default_num_workers
from alibi_dinov2.conversion.convert import save_model_folder
from alibi_dinov2.errors import InputError
from alibi_dinov2.features.extraction import prefix_token_count
from alibi_dinov2.hub.push import push_to_hub
from alibi_dinov2.hub.sources import check_model_source
from alibi_dinov2.io.files import write_json_atomic
from alibi_dinov2.io.images import (
    ImageReadError,
    SkippedInputs,
)
from alibi_dinov2.training.arguments import RunArguments
from alibi_dinov2.training.data import (
    DistillationImages,
    ProbeImages,
    StreamingDistillationImages,
    decode_message,
    load_image_records,
    prepare_probe_images,
    split_probe_records,
)
from alibi_dinov2.training.objective import distillation_loss, random_patch_shifts, roll_by_patches, roll_generator
from alibi_dinov2.training.runs import (
    StateDictDataclass,
    epoch_batches,
    load_checkpoint,
    make_accelerator,
    release_accelerator,
    remove_incomplete_checkpoints,
    resolve_resume_checkpoint,
    save_checkpoint,
)
from alibi_dinov2.training.students import build_student, check_models, load_teacher
from alibi_dinov2.training.targets import TeacherTargetCache, batch_targets, patch_tokens, teacher_fingerprint


logger = logging.getLogger(__name__)


# `--blank_channels auto`: this many channels, the teacher's most positional ones.
AUTO_BLANK_CHANNEL_COUNT = 4


TRACKER_PROJECT = "train_distill"


SUMMARY_FILE = "train_summary.json"


class PositionalMonitor(Protocol):
    """How positional a model's patch features are on the held-out `(H, W, 3)` images in [0, 1]; the run logs its
    scores and blanks the channels it ranks highest (`evaluation.distillation_probe.DistillationProbe` is one)."""

    def check_grid(self, image_size: int, patch_size: int) -> None:
        """Warn when images of `image_size` px are too small for the probe."""

    def channel_scores(self, model, images: Sequence) -> Any:
        """`(C,)` per-channel positional scores of `model`."""

    def most_positional_channels(self, scores, count: int) -> list[int]:
        """The `count` highest-scoring channels, in index order."""

    def r2(self, model, images: Sequence) -> float:
        """The positional-probe R^2 of `model`."""


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


def evaluate_student(student, probe: ProbeImages, probe_targets: torch.Tensor, monitor: PositionalMonitor) -> dict:
    """Positional probe R^2 and patch cosine to the (blanked) teacher target on the held-out images."""
    was_training = student.training
    student.eval()
    try:
        results = {
            "probe_r2_lr_ud": monitor.r2(student, probe.probe_rgb),
            "patch_cosine_to_teacher": mean_patch_cosine(student, probe.pixel_values, probe_targets),
        }
    finally:
        student.train(was_training)
    return results


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

    args: RunArguments
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
    monitor: PositionalMonitor | None = None  # None only for runs without probe images
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


def setup_accelerator(args: RunArguments):
    """The accelerator (a CPU group for multi-process launches without GPU), logging, and a clean output folder."""
    from accelerate.utils import DataLoaderConfiguration

    accelerator = make_accelerator(
        args.output_dir,
        mixed_precision=args.mixed_precision,
        log_with=args.trackers,
        cpu=args.cpu,
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


def holds_out_probe_images(args: RunArguments) -> bool:
    """Whether the run probes held-out images (`--probe_dir`, or `--num_probe_images` > 0)."""
    return bool(args.probe_dir or args.num_probe_images)


def load_models(args: RunArguments, accelerator, monitor: PositionalMonitor | None = None):
    """`(teacher on the device, student, patch size)`. The sources are checked first; the first process
    downloads, the others read its cache."""
    teacher_source = check_model_source(args.teacher, "teacher")
    init_from = check_model_source(args.init_from, "student") if args.init_from else None
    with accelerator.main_process_first():
        teacher = load_teacher(teacher_source)
        student = build_student(teacher_source, args.variant, init_from)
    patch_size = check_models(teacher, student, args)
    if holds_out_probe_images(args) and accelerator.is_main_process:
        monitor.check_grid(args.probe_image_size, patch_size)
    return teacher.to(accelerator.device), student, patch_size


def load_data(args: RunArguments, accelerator, patch_size: int):
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


def build_dataloader(args: RunArguments, train_dataset, accelerator) -> DataLoader:
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


def training_length(args: RunArguments, dataloader, num_processes: int) -> tuple[int, int | None]:
    """`(max_train_steps, num_train_epochs)`: with a known length, epochs give the steps or --max_train_steps gives
    the epochs (as in transformers' examples); a stream has only steps."""
    if args.streaming:
        return args.max_train_steps, None
    batches_per_process = math.ceil(len(dataloader) / num_processes)
    steps_per_epoch = math.ceil(batches_per_process / args.gradient_accumulation_steps)
    max_train_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch
    return max_train_steps, math.ceil(max_train_steps / steps_per_epoch)


def build_optimizer(args: RunArguments, student, max_train_steps: int, num_processes: int):
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


def prepare_run(args: RunArguments, monitor: PositionalMonitor | None = None) -> DistillationRun:
    """Accelerator, models, data, optimiser, resumed progress, blanked channels, target cache and the held-out
    reference numbers: everything the training loop needs. `monitor` scores the held-out images; a run with probe
    images needs one."""
    started = time.perf_counter()
    if holds_out_probe_images(args) and monitor is None:
        raise ValueError(
            "A run with probe images needs a monitor, e.g. evaluation.distillation_probe.DistillationProbe()"
        )
    accelerator = setup_accelerator(args)
    teacher, student, patch_size = load_models(args, accelerator, monitor)
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
        skipped=SkippedInputs(strict=args.strict), monitor=monitor,
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
        scores = run.monitor.channel_scores(run.teacher, run.probe.probe_rgb)
        channels = run.monitor.most_positional_channels(scores, AUTO_BLANK_CHANNEL_COUNT)  # index order
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
        run.progress.teacher_probe_r2 = run.monitor.r2(run.teacher, run.probe.probe_rgb)


def _tracker_config(args: RunArguments) -> dict:
    """Options as the scalar types trackers accept."""
    config = {}
    for key, value in sorted(dataclasses.asdict(args).items()):
        if isinstance(value, (bool, int, float, str)):
            config[key] = value
        elif value is not None:
            config[key] = str(value)
    return config


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
        results = evaluate_student(
            run.accelerator.unwrap_model(run.student), run.probe, run.probe_targets, run.monitor
        )
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
            push_to_hub(
                run.output_dir, run.args.hub_model_id, private=run.args.hub_private_repo,
                commit_message=f"Distilled {title}",
            )
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
            f"patch cosine to teacher target, held-out, {args.image_size} px": last_probe["patch_cosine_to_teacher"],
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
            "patch_cosine_image_size": run.args.image_size,  # centre crops, against the (blanked) teacher target
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


def train(args: RunArguments, monitor: PositionalMonitor | None = None) -> TrainingResult:
    """Run the distillation described by `args` (train_distill.py's options), scoring the held-out images with
    `monitor`. accelerate's settings are released afterwards (even after an error), so that the same process can
    run another stage."""
    run = None
    try:
        run = prepare_run(args, monitor)
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
