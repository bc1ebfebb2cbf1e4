"""Scribble benchmark for trainable segmentation (paper S16).

Simulates a user who labels a few training images with scribbles, round after round: in every round
each training image gets one new scribble per class present in it; scribbles accumulate. After each
round a :class:`~alibi_dinov2.segmentation.trainable.TrainableSegmenter` is fitted on all scribbles so
far and scored on separate, unlabelled test images with the class-averaged mIoU. Scribbles are short
thick random-walk strokes drawn strictly inside the eroded region of their class, so they always agree
with the ground truth.

Data (``--data DIR``), label masks with 0 = unlabelled/ignored and 1..K = classes
(``--mask_zero_is_class`` if the masks use 0..K-1):

* ``DIR/images/NAME.EXT`` with ``DIR/masks/NAME.EXT`` (or ``DIR/masks/NAME_mask.EXT``), or
* ``DIR/NAME.EXT`` with ``DIR/NAME_mask.EXT`` side by side;
* optionally split into ``DIR/train/`` and ``DIR/test/``, each laid out as above. Without that split
  the first ``--n_train`` pairs (sorted by name) train and the rest test.

EXT is any image suffix :mod:`alibi_dinov2.io.images` reads (mask and image may differ); images are read by its one
policy (RGB in [0, 1]). A pair whose image or mask cannot be read is skipped with a warning that names it and a
final count; ``--strict`` fails instead. Without ``--data`` a
generated multi-phase microstructure set is used (:mod:`alibi_dinov2.synthetic.microstructures`).

Usage::

    python -m evaluation.scribble_benchmark --rounds 5 --output_dir outputs/scribbles
    python -m evaluation.scribble_benchmark --models facebook/dinov2-small ./my-alibi-model \\
        --feature_sets classical classical+vit --rounds 5 --output_dir outputs/scribbles

Models are hub ids or local folders loaded with
``transformers.AutoModel.from_pretrained(name, trust_remote_code=True)``. Outputs:
``scribble_benchmark.json`` (configuration, mIoU per round per run) and ``scribble_benchmark.png``.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Literal, Optional, Sequence

import numpy as np
from scipy import ndimage

from alibi_dinov2.cli import ArgumentParser, run_command
from alibi_dinov2.errors import InputError, SourceNotFoundError
from alibi_dinov2.features.cache import FeatureCache
from alibi_dinov2.io.files import write_json_atomic
from alibi_dinov2.io.images import ImageReadError, SkippedInputs, list_image_files, read_labels, read_rgb01
from alibi_dinov2.names import display_names
from alibi_dinov2.segmentation.extractors import (
    FEATURE_SETS,
    FeatureExtractor,
    build_extractor,
    feature_set_parts,
    image_statistics_of,
)
from alibi_dinov2.segmentation.trainable import TrainableSegmenter
from evaluation.metrics import confusion_matrix, scores_from_confusion


Pair = tuple[np.ndarray, np.ndarray]


# --------------------------------------------------------------------------------------------------
# Scribbles
# --------------------------------------------------------------------------------------------------
def _disk(radius: int) -> np.ndarray:
    offsets = np.arange(-radius, radius + 1)
    return (offsets[:, None] ** 2 + offsets[None, :] ** 2) <= radius * radius


def default_scribble_length(shape: tuple[int, int]) -> int:
    """Random-walk steps of a scribble: about 1/8 of the shorter image side (at least 8)."""
    return max(8, min(shape[:2]) // 8)


def random_scribble(
    labels: np.ndarray,
    class_value: int,
    rng: np.random.Generator,
    length: Optional[int] = None,
    thickness: int = 3,
    margin: int = 1,
) -> np.ndarray:
    """Draw one scribble of ``class_value`` that lies entirely inside that class.

    The stroke's centre line is a persistent random walk (small random turns) confined to the class
    region eroded by ``thickness // 2 + margin`` pixels; dilating it to ``thickness`` therefore stays
    inside the class. Thin regions fall back to smaller erosions and, at worst, a 1-pixel stroke.

    Args:
        labels: ground truth (H, W).
        class_value: the class to scribble.
        rng: random generator.
        length: centre-line steps (default :func:`default_scribble_length`).
        thickness: stroke width in pixels.
        margin: extra distance kept from the class boundary.

    Returns:
        bool (H, W) mask of the scribble (all False when the class is absent).
    """
    labels = np.asarray(labels)
    region = labels == class_value
    if not region.any():
        return np.zeros(labels.shape, dtype=bool)
    length = default_scribble_length(labels.shape) if length is None else int(length)
    radius = max(int(thickness) // 2, 0)

    # Largest erosion that leaves room for a start point; shrink the stroke if the region is thin.
    allowed = None
    for erosion, stroke_radius in [(radius + margin, radius), (radius, radius), (0, 0)]:
        eroded = ndimage.binary_erosion(region, _disk(erosion)) if erosion > 0 else region
        if eroded.any():
            allowed, radius = eroded, stroke_radius
            break

    candidates = np.argwhere(allowed)
    position = candidates[rng.integers(len(candidates))].astype(np.float64)
    angle = rng.uniform(0, 2 * np.pi)
    path = np.zeros(labels.shape, dtype=bool)
    path[int(position[0]), int(position[1])] = True
    height, width = labels.shape
    for _ in range(length):
        for attempt in range(8):
            # Persistent walk: small turns; when blocked, try sharper random turns.
            turn = rng.normal(0.0, 0.3) if attempt == 0 else rng.uniform(-np.pi, np.pi)
            step = np.array([np.sin(angle + turn), np.cos(angle + turn)])
            candidate = position + step
            row, col = int(round(candidate[0])), int(round(candidate[1]))
            if 0 <= row < height and 0 <= col < width and allowed[row, col]:
                angle, position = angle + turn, candidate
                path[row, col] = True
                break
        else:
            break  # boxed in: end the stroke early
    stroke = ndimage.binary_dilation(path, _disk(radius)) if radius > 0 else path
    return stroke & region  # a no-op by construction; guarantees agreement with the ground truth


def scribble_round(
    ground_truth: np.ndarray,
    rng: np.random.Generator,
    length: Optional[int] = None,
    thickness: int = 3,
    classes: Optional[Iterable[int]] = None,
) -> np.ndarray:
    """One scribble per class present in ``ground_truth``.

    Args:
        ground_truth: int (H, W), 0 = unknown, 1..K = classes.
        rng: random generator.
        length, thickness: see :func:`random_scribble`.
        classes: the classes to scribble (default: every non-zero value present).

    Returns:
        int32 (H, W): class value on scribbled pixels, 0 elsewhere.
    """
    ground_truth = np.asarray(ground_truth)
    if classes is None:
        classes = [c for c in np.unique(ground_truth) if c != 0]
    scribbles = np.zeros(ground_truth.shape, dtype=np.int32)
    for class_value in classes:
        stroke = random_scribble(ground_truth, int(class_value), rng, length=length, thickness=thickness)
        scribbles[stroke] = class_value
    return scribbles


def simulate_scribble_rounds(
    ground_truths: Sequence[np.ndarray],
    n_rounds: int,
    seed: int = 0,
    length: Optional[int] = None,
    thickness: int = 3,
) -> list[list[np.ndarray]]:
    """Accumulated scribbles after each labelling round.

    Returns:
        ``rounds[r][i]``: int32 label image of training image ``i`` after round ``r + 1`` (all
        scribbles of rounds 1..r+1; 0 = unlabelled).
    """
    if n_rounds < 1:
        raise ValueError(f"n_rounds must be >= 1, got {n_rounds}")
    rng = np.random.default_rng(seed)
    current = [np.zeros(np.shape(gt), dtype=np.int32) for gt in ground_truths]
    rounds = []
    for _ in range(n_rounds):
        for index, ground_truth in enumerate(ground_truths):
            new = scribble_round(ground_truth, rng, length=length, thickness=thickness)
            current[index] = np.where(new > 0, new, current[index]).astype(np.int32)
        rounds.append([labels.copy() for labels in current])
    return rounds


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------
def _image_files(directory: Path) -> list[Path]:
    return list_image_files(directory, recursive=False)


def _find_mask(directory: Path, stem: str) -> Optional[Path]:
    for candidate_stem in (stem, f"{stem}_mask"):
        for path in _image_files(directory):
            if path.stem == candidate_stem:
                return path
    return None


def find_image_mask_pairs(directory: str | Path) -> list[tuple[Path, Path]]:
    """(image, mask) paths in ``directory`` (``images/`` + ``masks/`` or ``NAME`` + ``NAME_mask``)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise SourceNotFoundError(f"not found: {directory} (no such data folder)")
    pairs = []
    if (directory / "images").is_dir() and (directory / "masks").is_dir():
        for image_path in _image_files(directory / "images"):
            mask_path = _find_mask(directory / "masks", image_path.stem)
            if mask_path is None:
                raise FileNotFoundError(f"No mask for {image_path} in {directory / 'masks'}")
            pairs.append((image_path, mask_path))
    else:
        files = _image_files(directory)
        for image_path in files:
            if image_path.stem.endswith("_mask"):
                continue
            mask_path = next((p for p in files if p.stem == f"{image_path.stem}_mask"), None)
            if mask_path is None:
                raise FileNotFoundError(f"No mask {image_path.stem}_mask.* for {image_path}")
            pairs.append((image_path, mask_path))
    if not pairs:
        raise FileNotFoundError(
            f"No image/mask pairs in {directory} (expected images/ + masks/ or NAME.png + NAME_mask.png)"
        )
    return pairs


def load_image_mask_pairs(
    directory: str | Path, mask_zero_is_class: bool = False, skipped: SkippedInputs | None = None
) -> list[Pair]:
    """Read the pairs found by :func:`find_image_mask_pairs` as ((H, W, 3) float32 RGB in [0, 1], int32 labels).

    A pair that cannot be read, or whose mask does not match its image, is recorded in `skipped` (a warning naming
    it; `SkippedInputs(strict=True)` raises instead).
    """
    skipped = SkippedInputs(what="image/mask pair") if skipped is None else skipped
    pairs = []
    for image_path, mask_path in find_image_mask_pairs(directory):
        try:
            image, labels = read_rgb01(image_path), read_labels(mask_path)
            if image.shape[:2] != labels.shape:
                raise ImageReadError(f"{mask_path} has shape {labels.shape} but {image_path} is {image.shape[:2]}")
        except (ImageReadError, ValueError) as error:
            skipped.add(image_path, error)
            continue
        pairs.append((image, labels + 1 if mask_zero_is_class else labels))
    return pairs


def load_benchmark_data(
    directory: str | Path, n_train: int, mask_zero_is_class: bool = False, skipped: SkippedInputs | None = None
) -> tuple[list[Pair], list[Pair]]:
    """Training and test pairs: ``train/`` + ``test/`` subfolders, else the first ``n_train`` pairs."""
    directory = Path(directory)
    if (directory / "train").is_dir() and (directory / "test").is_dir():
        return (
            load_image_mask_pairs(directory / "train", mask_zero_is_class, skipped),
            load_image_mask_pairs(directory / "test", mask_zero_is_class, skipped),
        )
    pairs = load_image_mask_pairs(directory, mask_zero_is_class, skipped)
    if len(pairs) <= n_train:
        raise InputError(
            f"{directory} holds {len(pairs)} readable pairs; need more than n_train={n_train} to keep test images"
        )
    return pairs[:n_train], pairs[n_train:]


# --------------------------------------------------------------------------------------------------
# Benchmark
# --------------------------------------------------------------------------------------------------
def _run_plan(feature_sets: Sequence[str], models: dict) -> list[tuple[str, str, Optional[str]]]:
    """(run name, feature set, model name) for every run; classical-only sets run once."""
    plan = []
    for feature_set in feature_sets:
        if "vit" not in feature_set_parts(feature_set):
            plan.append((feature_set, feature_set, None))
            continue
        if not models:
            raise ValueError(f"Feature set {feature_set!r} needs at least one model (--models)")
        plan += [(f"{feature_set} [{name}]", feature_set, name) for name in models]
    return plan


def _distinct_parts(extractors: Iterable[FeatureExtractor]) -> list[FeatureExtractor]:
    """The parts of `extractors`, each cache key once (the classical stack shared by the runs is one part)."""
    parts = {}
    for extractor in extractors:
        for part in extractor.parts:
            parts.setdefault(part.cache_key, part)
    return list(parts.values())


def run_scribble_benchmark(
    train_pairs: Sequence[Pair],
    test_pairs: Sequence[Pair],
    feature_sets: Sequence[str] = ("classical",),
    models: Optional[dict] = None,
    n_rounds: int = 5,
    classifier: str = "xgboost",
    seed: int = 0,
    scribble_length: Optional[int] = None,
    scribble_thickness: int = 3,
    n_components: int = 9,
    max_side: Optional[int] = None,
    n_jobs: Optional[int] = None,
    progress: bool = True,
    image_processors: Optional[dict] = None,
) -> dict:
    """Run the scribble benchmark.

    Args:
        train_pairs: (image, ground truth) pairs that receive scribbles.
        test_pairs: (image, ground truth) pairs that are only predicted and scored.
        feature_sets: any of ``"classical"``, ``"vit"``, ``"classical+vit"``.
        models: ``{name: transformers model}`` for the ViT feature sets (each set runs per model).
        n_rounds: labelling rounds.
        classifier: ``"xgboost"`` or ``"random_forest"``.
        seed: seed of the scribbles and the classifier. All runs see the same scribbles.
        scribble_length, scribble_thickness: see :func:`random_scribble`.
        n_components, max_side: ViT channel options (see :class:`TrainableSegmenter`).
        n_jobs: classifier threads.
        progress: show a tqdm progress bar.
        image_processors: ``{model name: processor or dict with image_mean / image_std}``, the statistics each
            model's ViT features normalise with (ImageNet's for a model without an entry).

    Returns:
        JSON-ready dict: ``config`` (with the ``image_statistics`` of each model), ``rounds`` (1..N) and
        ``runs``, each with ``name``,
        ``feature_set``, ``model``, ``miou`` (per round; pooled over the test images),
        ``mean_image_miou`` (per round; mean of per-image mIoU), ``per_class_iou`` (per round) and
        ``labelled_pixels`` (per round).
    """
    from tqdm.auto import tqdm

    models = dict(models or {})
    image_processors = dict(image_processors or {})
    if not train_pairs or not test_pairs:
        raise ValueError("Need at least one training and one test image")
    plan = _run_plan(feature_sets, models)
    n_classes = int(max(np.max(labels) for _, labels in list(train_pairs) + list(test_pairs)))
    scribble_rounds = simulate_scribble_rounds(
        [labels for _, labels in train_pairs],
        n_rounds,
        seed=seed,
        length=scribble_length,
        thickness=scribble_thickness,
    )
    all_images = [image for image, _ in train_pairs] + [image for image, _ in test_pairs]
    n_train = len(train_pairs)
    extractors = {
        run_name: build_extractor(
            feature_set,
            model=models.get(model_name),
            n_components=n_components,
            image_processor=image_processors.get(model_name),
            max_side=max_side,
        )
        for run_name, feature_set, model_name in plan
    }
    parts = _distinct_parts(extractors.values())
    vit_models = sorted({name for _, _, name in plan if name is not None})
    bar = tqdm(total=len(all_images) * len(parts) + len(plan) * n_rounds, disable=not progress,
               desc="scribble benchmark")

    # Features do not change between rounds (only the scribbles do): each part's stack is computed once per image
    # and kept for the whole benchmark (the classical stack once for all the runs that use it).
    cache = FeatureCache(max_bytes=sys.maxsize)
    for part in parts:
        for image in all_images:
            part(image, cache=cache)
            bar.update(1)

    runs = []
    for run_name, feature_set, model_name in plan:
        feature_maps = [extractors[run_name](image, cache=cache) for image in all_images]
        train_maps, test_maps = feature_maps[:n_train], feature_maps[n_train:]
        record = {
            "name": run_name,
            "feature_set": feature_set,
            "model": model_name,
            "miou": [],
            "mean_image_miou": [],
            "per_class_iou": [],
            "labelled_pixels": [],
            "fit_seconds": [],
        }
        for round_labels in scribble_rounds:
            bar.set_postfix_str(run_name)
            segmenter = TrainableSegmenter(
                features=feature_set,
                classifier=classifier,
                model=models.get(model_name),
                image_processor=image_processors.get(model_name),
                n_components=n_components,
                random_state=seed,
                n_jobs=n_jobs,
            )
            start = time.perf_counter()
            record["labelled_pixels"].append(int(sum(np.count_nonzero(labels) for labels in round_labels)))
            try:
                segmenter.fit_features(train_maps, round_labels)
            except ValueError:  # e.g. only one class scribbled so far
                for key in ("miou", "mean_image_miou", "per_class_iou"):
                    record[key].append(None)
                record["fit_seconds"].append(None)
                bar.update(1)
                continue
            record["fit_seconds"].append(time.perf_counter() - start)
            # Masks: 0 = unlabelled (not scored), classes 1..K.
            confusion = np.zeros((n_classes, n_classes), np.int64)
            image_scores = []
            for feature_map, (_, truth) in zip(test_maps, test_pairs):
                prediction = segmenter.predict_features(feature_map)
                image_confusion = confusion_matrix(prediction, truth, n_classes, ignore_index=0, first_class=1)
                confusion += image_confusion
                image_scores.append(scores_from_confusion(image_confusion, first_class=1)["miou"])
            scores = scores_from_confusion(confusion, first_class=1)
            record["miou"].append(scores["miou"])
            record["mean_image_miou"].append(float(np.nanmean(image_scores)))
            record["per_class_iou"].append(list(scores["per_class_iou"].values()))
            bar.update(1)
        runs.append(record)
    bar.close()
    return {
        "config": {
            "n_train": n_train,
            "n_test": len(test_pairs),
            "n_classes": n_classes,
            "n_rounds": n_rounds,
            "classifier": classifier,
            "seed": seed,
            "scribble_length": scribble_length,
            "scribble_thickness": scribble_thickness,
            "n_components": n_components,
            "feature_sets": list(feature_sets),
            "models": list(models),
            "image_statistics": {name: image_statistics_of(image_processors.get(name)) for name in vit_models},
        },
        "rounds": list(range(1, n_rounds + 1)),
        "runs": runs,
    }


def plot_results(results: dict, path: str | Path) -> None:
    """Plot mIoU against labelling round, one line per run (feature set and model), to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for run in results["runs"]:
        values = [np.nan if v is None else v for v in run["miou"]]
        axis.plot(results["rounds"], values, marker="o", label=run["name"])
    axis.set_xlabel("labelling round (one scribble per class per training image)")
    axis.set_ylabel("class-averaged mIoU on test images")
    axis.set_ylim(0, 1)
    axis.set_xticks(results["rounds"])
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------
@dataclass
class ScribbleBenchmarkArguments:
    """Options of ``python -m evaluation.scribble_benchmark``."""

    models: list[str] = field(default_factory=list, metadata={"help": "Hub ids or local model folders"})
    names: list[str] | None = field(default=None, metadata={"help": "display names, one per model (default: the last "
                                                                  "part of each path or Hub id)"})
    feature_sets: list[str] | None = field(
        default=None, metadata={"help": f"any of {', '.join(FEATURE_SETS)}; default: classical, plus "
                                        "classical+vit when --models are given"})
    rounds: int = field(default=5, metadata={"help": "labelling rounds"})
    output_dir: str = field(default="outputs/scribbles", metadata={"help": "folder of the JSON and the plot"})
    data: str | None = field(default=None, metadata={"help": "folder of image/mask pairs (default: generated "
                                                             "microstructures)"})
    mask_zero_is_class: bool = field(default=False, metadata={"help": "masks use 0..K-1 (shifted to 1..K)"})
    n_train: int = field(default=5, metadata={"help": "training images"})
    n_test: int = field(default=17, metadata={"help": "test images (generated data only)"})
    size: list[int] = field(default_factory=lambda: [256], metadata={"help": "H W of the generated images (one "
                                                                             "value: square), pixels"})
    n_phases: int = field(default=3, metadata={"help": "phases of the generated data"})
    noise: float = field(default=0.08, metadata={"help": "noise of the generated data"})
    illumination: float = field(default=0.0, metadata={"help": "illumination gradient of the generated data"})
    blur: float = field(default=0.0, metadata={"help": "blur of the generated data"})
    classifier: Literal["xgboost", "random_forest"] = field(default="xgboost", metadata={"help": "pixel classifier"})
    seed: int = field(default=0, metadata={"help": "seed of data, scribbles and classifier"})
    scribble_length: int | None = field(default=None, metadata={"help": "scribble length (pixels)"})
    scribble_thickness: int = field(default=3, metadata={"help": "scribble thickness (pixels)"})
    n_components: int = field(default=9, metadata={"help": "PCA dimensions of the ViT channels"})
    max_side: int | None = field(default=None, metadata={"help": "tile size for ViT features on large images"})
    device: str | None = field(default=None, metadata={"help": "torch device for the models (default: CPU)"})
    n_jobs: int | None = field(default=None, metadata={"help": "classifier threads"})
    no_progress: bool = field(default=False, metadata={"help": "no progress bar"})
    strict: bool = field(default=False, metadata={"help": "fail on an unreadable pair instead of skipping it"})

    def __post_init__(self):
        display_names(self.models, self.names)
        if len(self.size) > 2:
            raise ValueError(f"--size takes H W or one side; got {' '.join(map(str, self.size))}")
        unknown = sorted(set(self.feature_sets or ()) - set(FEATURE_SETS))
        if unknown:
            raise ValueError(f"--feature_sets: unknown {unknown}; choose from {', '.join(FEATURE_SETS)}")


def _benchmark_data(args: ScribbleBenchmarkArguments, skipped: SkippedInputs) -> tuple[list[Pair], list[Pair]]:
    if args.data:
        return load_benchmark_data(args.data, args.n_train, args.mask_zero_is_class, skipped)
    from alibi_dinov2.synthetic.microstructures import generate_microstructure_dataset

    pairs = generate_microstructure_dataset(
        args.n_train + args.n_test,
        size=(args.size[0], args.size[-1]),
        n_phases=args.n_phases,
        seed=args.seed,
        noise=args.noise,
        illumination=args.illumination,
        blur=args.blur,
    )
    return pairs[: args.n_train], pairs[args.n_train :]


def build_parser() -> ArgumentParser:
    """The command-line parser over [`ScribbleBenchmarkArguments`]."""
    return ArgumentParser(
        ScribbleBenchmarkArguments,
        prog="python -m evaluation.scribble_benchmark",
        description="Scribble benchmark: mIoU of trainable segmentation against labelling rounds.",
    )


def main(argv: Optional[Sequence[str]] = None) -> dict:
    from alibi_dinov2.hub.models import load_model

    (args,) = build_parser().parse(argv)
    feature_sets = args.feature_sets or (["classical", "classical+vit"] if args.models else ["classical"])
    names = display_names(args.models, args.names) if args.models else []
    loaded = {name: load_model(source, args.device) for name, source in zip(names, args.models)}
    models = {name: model for name, (model, _) in loaded.items()}
    skipped = SkippedInputs(strict=args.strict, what="image/mask pair")
    train_pairs, test_pairs = _benchmark_data(args, skipped)
    results = run_scribble_benchmark(
        train_pairs,
        test_pairs,
        feature_sets=feature_sets,
        models=models,
        n_rounds=args.rounds,
        classifier=args.classifier,
        seed=args.seed,
        scribble_length=args.scribble_length,
        scribble_thickness=args.scribble_thickness,
        n_components=args.n_components,
        max_side=args.max_side,
        n_jobs=args.n_jobs,
        progress=not args.no_progress,
        image_processors={name: statistics for name, (_, statistics) in loaded.items()},
    )
    results["config"]["data"] = args.data or "generated microstructures"
    results["skipped"] = skipped.as_dict()
    skipped.summarise(total=len(train_pairs) + len(test_pairs) + len(skipped))
    output_dir = Path(args.output_dir)
    write_json_atomic(output_dir / "scribble_benchmark.json", results)
    plot_results(results, output_dir / "scribble_benchmark.png")
    for run in results["runs"]:
        scores = " ".join("  n/a" if v is None else f"{v:.3f}" for v in run["miou"])
        print(f"{run['name']:40s} mIoU per round: {scores}")
    print(f"Wrote {output_dir / 'scribble_benchmark.json'} and {output_dir / 'scribble_benchmark.png'}")
    return results


if __name__ == "__main__":
    run_command(main)
