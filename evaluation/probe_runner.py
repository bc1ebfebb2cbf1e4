"""Positional-probe runs over models x image sets, with a command line.

Image sources (``--images``):

* ``textures``: scikit-image's bundled homogeneous textures (brick, grass, gravel; 512 x 512).
* ``micro``: synthetic homogeneous microstructures from
  :func:`alibi_dinov2.synthetic.microstructures.generate_microstructure` (15 images of 518 x 518 by default).
* ``noise``: uniform RGB noise (60 images of 518 x 518 by default).
* ``NAME:COUNT`` for any of the three above picks the number of images (``noise:10``).
* a folder of image files (PNG, JPEG, TIFF, ...), read at native size by :mod:`alibi_dinov2.io.images`'s one policy;
* a folder written by ``datasets.Dataset.save_to_disk`` or ``hf:NAME`` for ``datasets.load_dataset``.

Every image is cropped to its native size floored to the patch grid (never resized), its features are
extracted once per model, and each ramp is probed with ``repeats`` samplings (6 by default). Sample
seeds depend on the image and the repeat only, so every model is probed on the same positions. Scores
are summarised as mean +- std over images x repeats. An unreadable file, or an image smaller than one patch, is
skipped with a warning that names it and counted in the results (``skipped``); ``--strict`` fails instead.

Example::

    python -m evaluation.probe_runner --models facebook/dinov2-with-registers-small ./alibi-dinov2-small \\
        --names stock alibi --images textures micro noise:20 --ramps lr+ud random --output_dir outputs/probe
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Literal, Mapping, Sequence

import numpy as np
from tqdm.auto import tqdm

from alibi_dinov2.cli import ArgumentParser, run_command
from alibi_dinov2.errors import InputError
from alibi_dinov2.features.extraction import (
    extract_patch_features,
    patch_size_of,
    prefix_token_count,
    resolve_backbone,
)
from alibi_dinov2.hub.models import load_model
from alibi_dinov2.io.files import write_json_atomic
from alibi_dinov2.io.image_sets import NamedImage, load_image_source
from alibi_dinov2.io.images import ImageReadError, SkippedInputs
from alibi_dinov2.names import display_names
from evaluation.content_control import content_flags, patch_pixel_statistics
from evaluation.positional_probe import PROBE_PROTOCOL, ProbeProtocol, expand_ramps


logger = logging.getLogger(__name__)

RESULTS_FILE = "probe.json"


# --------------------------------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------------------------------
def _summary(scores: list[list[float]]) -> dict:
    flat = np.asarray([score for image_scores in scores for score in image_scores], dtype=np.float64)
    return {
        "mean": float(flat.mean()) if flat.size else float("nan"),
        "std": float(flat.std()) if flat.size else float("nan"),
        "n": int(flat.size),
        "per_image": [[float(score) for score in image_scores] for image_scores in scores],
    }


def _model_description(model) -> dict:
    backbone = resolve_backbone(model)
    return {
        "class": type(backbone).__name__,
        "model_type": backbone.config.model_type,
        "patch_size": patch_size_of(backbone),
        "prefix_tokens": prefix_token_count(backbone),
        "hidden_size": int(backbone.config.hidden_size),
    }


def run_probe(
    models: Mapping[str, object],
    sources: Mapping[str, Sequence[NamedImage]],
    ramps: Sequence[str] = ("lr+ud", "random"),
    protocol: ProbeProtocol = PROBE_PROTOCOL,
    per_channel: bool = False,
    image_processors: Mapping[str, object] | None = None,
    progress: bool = True,
    skipped: SkippedInputs | None = None,
) -> dict:
    """Probe every model on every image of every source.

    Args:
        models: {name: transformers model}.
        sources: {source name: [(image name, image array), ...]}.
        ramps: ramp names (see :data:`evaluation.positional_probe.RAMPS`).
        protocol: step, sampling, penalty, repeats (for ``sampling="grid"`` only the ``random`` ramp changes
            between them), seeds and minimum sample count of every fit.
        per_channel: also store the per-channel R^2 (mean over images x repeats) of each ramp.
        image_processors: {model name: processor or dict with image_mean / image_std}.
        skipped: where images a model cannot take (smaller than its patch) are recorded; by default they are
            skipped with a warning (`SkippedInputs(strict=True)` raises instead).

    Returns:
        JSON-ready dict: ``protocol``, ``models`` (descriptions), ``sources`` (image names and sizes),
        ``grids[model][source]`` (patch grid of each image),
        ``scores[model][source][ramp] = {mean, std, n, per_image}`` and, with ``per_channel``,
        ``per_channel[model][source][ramp] = [C values]``, ``skipped`` (name and reason of each input left
        out, including unreadable files recorded in `skipped` before the call) and ``warnings``: images whose
        grid gives fewer than the protocol's ``min_samples`` sampled patches, left out of the means (their R^2
        would be noise); ``content_baseline[patch size][source][ramp] = {mean, std, n, per_image}``: the same probe
        on the images' own patch pixel statistics (see :mod:`evaluation.content_control`), for each patch size of
        the models.
    """
    skipped = SkippedInputs() if skipped is None else skipped
    for ramp in ramps:
        expand_ramps(ramp)  # fail on a bad name before any model runs
    image_processors = dict(image_processors or {})
    results: dict = {
        "protocol": {"ramps": list(ramps), **protocol.to_dict(), "score": protocol.score_name},
        "models": {name: _model_description(model) for name, model in models.items()},
        "sources": {},
        "grids": {name: {} for name in models},
        "scores": {name: {} for name in models},
        "warnings": [],
    }
    if per_channel:
        results["per_channel"] = {name: {} for name in models}
    total = len(models) * sum(len(images) for images in sources.values())
    bar = tqdm(total=total, desc="positional probe", disable=not progress, file=sys.stderr)
    for model_name, model in models.items():
        for source_name, images in sources.items():
            probed = _probe_source(
                (model_name, model, image_processors.get(model_name)), (source_name, images), ramps, protocol,
                per_channel, skipped, bar,
            )
            results["warnings"].extend(probed.warnings)
            shapes = [{"name": item["name"], "shape": item["shape"]} for item in probed.images]
            results["sources"][source_name] = shapes
            results["grids"][model_name][source_name] = [item["grid"] for item in probed.images]
            results["scores"][model_name][source_name] = {ramp: _summary(probed.scores[ramp]) for ramp in ramps}
            if per_channel:
                results["per_channel"][model_name][source_name] = probed.channel_means
    bar.close()
    patch_sizes = sorted({description["patch_size"] for description in results["models"].values()})
    results["content_baseline"] = {
        str(patch_size): {
            source_name: content_baseline(images, patch_size, ramps, protocol)
            for source_name, images in sources.items()
        }
        for patch_size in patch_sizes
    }
    results["skipped"] = skipped.as_dict()
    return results


def content_baseline(
    images: Sequence[NamedImage], patch_size: int, ramps: Sequence[str], protocol: ProbeProtocol = PROBE_PROTOCOL
) -> dict:
    """The content control of one image set: every ramp's R^2 summary (as in ``scores``) of the probe on each
    image's patch pixel statistics, with the samplings the models get (same image indices) and the same images left
    out (unreadable, too small to probe)."""
    scores = {ramp: [] for ramp in ramps}
    for image_index, (_, image) in enumerate(images):
        try:
            statistics = patch_pixel_statistics(image, patch_size)
        except ImageReadError:
            continue  # recorded in `skipped` by the models' pass
        if not protocol.can_probe(*statistics.shape[:2]):
            continue
        image_scores, _ = _probe_image(statistics, ramps, protocol, image_index, per_channel=False)
        for ramp in ramps:
            scores[ramp].append(image_scores[ramp])
    return {ramp: _summary(scores[ramp]) for ramp in ramps}


@dataclass
class _SourceProbe:
    """One model on one image set: the images it took (name, shape, grid), each probed image's R^2 per repeat by
    ramp, the per-channel R^2 averaged over images x repeats by ramp, and the small-grid warnings."""

    images: list[dict] = field(default_factory=list)
    scores: dict[str, list[list[float]]] = field(default_factory=dict)
    channel_means: dict[str, list[float]] = field(default_factory=dict)
    warnings: list[dict] = field(default_factory=list)


def _probe_source(model_item, source_item, ramps, protocol: ProbeProtocol, per_channel: bool, skipped, bar):
    """Probe `model_item = (name, model, image processor)` on `source_item = (name, [(image name, image)])`.

    Raises:
        InputError: no image of the set could be read.
    """
    model_name, model, processor = model_item
    source_name, images = source_item
    probed = _SourceProbe(scores={ramp: [] for ramp in ramps})
    channel_sums: dict[str, np.ndarray] = {}
    n_images, channel_count = 0, 0
    for image_index, (image_name, image) in enumerate(images):
        bar.set_postfix_str(f"{model_name} / {image_name}", refresh=False)
        bar.update(1)
        try:
            features = extract_patch_features(model, image, processor)
        except ImageReadError as error:
            if f"{source_name}/{image_name}" not in skipped.names:
                skipped.add(f"{source_name}/{image_name}", error)
            continue
        grid = [int(features.shape[0]), int(features.shape[1])]
        probed.images.append({"name": image_name, "shape": list(np.shape(image)[:2]), "grid": grid})
        channel_count = int(features.shape[-1])
        if not protocol.can_probe(*grid):
            probed.warnings.append(_small_grid_warning(model_name, source_name, image_name, grid, protocol))
            continue
        n_images += 1
        image_scores, image_channels = _probe_image(features, ramps, protocol, image_index, per_channel)
        for ramp in ramps:
            probed.scores[ramp].append(image_scores[ramp])
            if per_channel:
                channel_sums[ramp] = channel_sums.get(ramp, 0.0) + image_channels[ramp]
    if not probed.images:
        raise InputError(f"no usable image in {source_name} for {model_name} (all skipped)")
    if per_channel:
        n_fits = n_images * protocol.repeats
        probed.channel_means = {
            ramp: (channel_sums[ramp] / n_fits).tolist() if n_fits else [float("nan")] * channel_count
            for ramp in ramps
        }
    return probed


def _probe_image(
    features: np.ndarray, ramps: Sequence[str], protocol: ProbeProtocol, image_index: int, per_channel: bool
):
    """Every ramp's R^2 over the protocol's repeats on one image, and (with `per_channel`) the sum over repeats of
    the per-channel R^2: `({ramp: [R^2 per repeat]}, {ramp: (C,) sum})`."""
    scores, channels = {ramp: [] for ramp in ramps}, {}
    for repeat in range(protocol.repeats):
        for ramp in ramps:
            scores[ramp].append(protocol.linear_probe(features, ramp, image_index, repeat))
            if per_channel:
                channel_r2 = protocol.per_channel_probe(features, ramp, image_index, repeat)
                channels[ramp] = channels.get(ramp, 0.0) + channel_r2
    return scores, channels


def _small_grid_warning(model: str, source: str, image: str, grid: list[int], protocol: ProbeProtocol) -> dict:
    sampled = protocol.n_samples(*grid)
    message = (
        f"{source}/{image}: a {grid[0]} x {grid[1]} patch grid gives {sampled} sampled patches at step "
        f"{protocol.step} (fewer than {protocol.min_samples}): left out of {model}'s means; use larger images or a "
        "smaller --step"
    )
    logger.warning(message)
    return {"model": model, "source": source, "image": image, "grid": grid, "samples": sampled, "message": message}


def _score_text(score: Mapping[str, float]) -> str:
    """`+0.123 +- 0.045`: one ramp's mean and std."""
    return f"{score['mean']:+.3f} +- {score['std']:.3f}"


def format_table(results: dict) -> str:
    """Plain-text table: one row per model and source, one ``mean +- std`` column per ramp, the content baseline's
    rows, and a line for each image set whose content predicts position."""
    ramps = results["protocol"]["ramps"]
    header = ["model", "images"] + list(ramps)
    rows = []
    for model_name, per_source in results["scores"].items():
        for source_name, per_ramp in per_source.items():
            rows.append([model_name, source_name] + [_score_text(per_ramp[ramp]) for ramp in ramps])
    for patch_size, per_source in results.get("content_baseline", {}).items():
        for source_name, per_ramp in per_source.items():
            rows.append([f"image content ({patch_size} px patches)", source_name]
                        + [_score_text(per_ramp[ramp]) for ramp in ramps])
    widths = [max(len(str(row[column])) for row in [header] + rows) for column in range(len(header))]
    lines = ["  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)) for row in [header] + rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    for patch_size, per_source in results.get("content_baseline", {}).items():
        for source_name, flag in content_flags(per_source).items():
            if flag["flagged"]:
                lines.append(
                    f"{source_name}: the images' own pixels ({patch_size} px patches) predict position "
                    f"({flag['ramp']} R^2 {flag['r2']:+.2f}): the models' R^2 on this set can be content, not "
                    "positional encoding"
                )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------
@dataclass
class ImageSetArguments:
    """Which images a probing command reads (shared by the probe runner and the report)."""

    images: list[str] = field(
        default_factory=lambda: ["textures"],
        metadata={"help": "image sets: textures, micro, noise (optionally NAME:COUNT), an image file or folder, "
                          "a save_to_disk folder or hf:NAME"},
    )
    max_images: int | None = field(default=None, metadata={"help": "at most this many images per set"})
    size: list[int] | None = field(default=None, metadata={"help": "H W of the generated sets micro and noise"})
    split: str = field(default="train", metadata={"help": "split of datasets sources"})
    image_column: str | None = field(default=None, metadata={"help": "image column of datasets sources"})
    strict: bool = field(default=False, metadata={"help": "fail on an unreadable or too-small image instead of "
                                                          "skipping it with a warning"})

    def __post_init__(self):
        if self.size is not None and len(self.size) != 2:
            raise ValueError(f"--size takes two numbers, H and W; got {self.size}")


@dataclass
class ProbeArguments:
    """Models and probe protocol of ``python -m evaluation.probe_runner``."""

    models: list[str] = field(metadata={"help": "Hub ids or local folders (AutoModel, trust_remote_code)"})
    names: list[str] | None = field(default=None, metadata={"help": "display names, one per model (default: the last "
                                                                  "part of each path or Hub id)"})
    ramps: list[str] = field(default_factory=lambda: ["lr+ud", "random"], metadata={"help": "ramps to probe"})
    step: int = field(
        default=PROBE_PROTOCOL.step, metadata={"help": "sampling step of the probe (about one patch in step^2)"}
    )
    sampling: Literal["random", "grid"] = field(
        default=PROBE_PROTOCOL.sampling, metadata={"help": "how patches are sampled"}
    )
    alpha: float = field(default=PROBE_PROTOCOL.alpha, metadata={"help": "ridge penalty"})
    holdout: bool = field(default=PROBE_PROTOCOL.holdout, metadata={"help": "score held-out patches only"})
    repeats: int = field(default=PROBE_PROTOCOL.repeats, metadata={"help": "samplings per image"})
    seed: int = field(default=PROBE_PROTOCOL.seed, metadata={"help": "seed of the samplings and generated sets"})
    per_channel: bool = field(default=False, metadata={"help": "also store per-channel R^2"})
    device: str | None = field(default=None, metadata={"help": "torch device (default: CPU)"})
    output_dir: str | None = field(default=None, metadata={"help": f"folder to write {RESULTS_FILE} into (default: "
                                                                    "print the table only)"})
    no_progress: bool = field(default=False, metadata={"help": "no progress bar"})

    def __post_init__(self):
        display_names(self.models, self.names)
        for ramp in self.ramps:
            expand_ramps(ramp)
        try:
            self.protocol()  # a bad step, penalty or repeat count fails here, before any model loads
        except ValueError as error:
            raise ValueError(f"--{error}") from error  # the messages start with the field's name

    def protocol(self) -> ProbeProtocol:
        """The probe protocol these options give (the minimum sample count is the project's)."""
        return ProbeProtocol(step=self.step, sampling=self.sampling, alpha=self.alpha, holdout=self.holdout,
                             repeats=self.repeats, seed=self.seed)  # fmt: skip


def load_image_sets(arguments: ImageSetArguments, seed: int = 0) -> tuple[dict[str, list[NamedImage]], SkippedInputs]:
    """The image sets a command asked for, and the record of the files it skipped."""
    skipped = SkippedInputs(strict=arguments.strict)
    size = tuple(arguments.size) if arguments.size else None
    sources = {
        spec: load_image_source(spec, limit=arguments.max_images, size=size, split=arguments.split,
                                image_column=arguments.image_column, seed=seed, skipped=skipped)
        for spec in arguments.images
    }
    return sources, skipped


def build_parser() -> ArgumentParser:
    """The command-line parser over [`ProbeArguments`, `ImageSetArguments`]."""
    return ArgumentParser(
        (ProbeArguments, ImageSetArguments),
        renamed={"output": "output_dir"},
        prog="python -m evaluation.probe_runner",
        description="Positional linear probe (R^2 of positional ramps predicted from patch features).",
    )


def main(argv: Iterable[str] | None = None) -> dict:
    probe_args, image_args = build_parser().parse(None if argv is None else list(argv))
    models, processors = {}, {}
    for name, source in zip(display_names(probe_args.models, probe_args.names), probe_args.models):
        models[name], processors[name] = load_model(source, device=probe_args.device)
    sources, skipped = load_image_sets(image_args, seed=probe_args.seed)
    total = sum(len(images) for images in sources.values()) + len(skipped)
    results = run_probe(
        models,
        sources,
        ramps=probe_args.ramps,
        protocol=probe_args.protocol(),
        per_channel=probe_args.per_channel,
        image_processors=processors,
        progress=not probe_args.no_progress,
        skipped=skipped,
    )
    skipped.summarise(total=total)
    print(format_table(results))
    if probe_args.output_dir:
        print(f"wrote {write_json_atomic(Path(probe_args.output_dir) / RESULTS_FILE, results)}")
    return results


if __name__ == "__main__":
    run_command(main)
