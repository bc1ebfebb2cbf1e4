"""Scribble segmentation without Python: train a segmenter from image + scribble-label pairs, apply it to a file,
a folder or a multi-page TIFF stack.

    python -m alibi_dinov2.segmentation.command train --images a.tif b.png --labels a_labels.png b_labels.png \\
        --output segmenter.zip [--model ID_OR_FOLDER] [--features classical|classical+vit]
    python -m alibi_dinov2.segmentation.command apply --segmenter segmenter.zip --input stack.tif --output masks.tif

Label images: 0 = unlabelled, 1..K = classes. `apply` writes one TIFF stack for a stack (or any single file) and
one mask per image, mirroring the folder, for a folder. Outputs are written atomically; a re-run skips outputs
that exist, and a killed run over a stack resumes from the pages it had finished.
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from tqdm.auto import tqdm

from alibi_dinov2.cli import ArgumentParser, load_config_file
from alibi_dinov2.errors import InputError
from alibi_dinov2.hub.sources import check_model_source
from alibi_dinov2.io.files import atomic_path, save_array_atomic
from alibi_dinov2.io.images import (
    ImageReadError,
    SkippedInputs,
    list_image_files,
    read_image,
    read_labels,
    read_pages,
    write_image,
    write_mask,
)
from alibi_dinov2.segmentation.trainable import TrainableSegmenter


SUBCOMMANDS = ("train", "apply")
USAGE = (
    "usage: python -m alibi_dinov2.segmentation.command {train,apply} [CONFIG_FILE] [--option VALUE ...]; "
    "{train,apply} --help"
)


@dataclass
class TrainArguments:
    images: list[str] = field(default_factory=list, metadata={"help": "Training images (PNG/JPEG/TIFF)."})
    labels: list[str] = field(
        default_factory=list, metadata={"help": "Scribble label images, one per image (0 = unlabelled, 1..K)."}
    )
    output: str = field(default="segmenter.zip", metadata={"help": "The segmenter file to write."})
    model: Optional[str] = field(default=None, metadata={"help": "Hub id or folder of the ViT (classical+vit)."})
    features: str = field(default="classical", metadata={"help": "classical or classical+vit."})
    n_components: int = field(default=9, metadata={"help": "PCA dimensions of the ViT channels."})
    max_side: Optional[int] = field(default=None, metadata={"help": "Tile side of ViT features on large images."})

    def __post_init__(self):
        self.images, self.labels = _as_list(self.images), _as_list(self.labels)
        if self.features not in ("classical", "classical+vit"):
            raise ValueError(f"--features must be classical or classical+vit, not {self.features!r}")


@dataclass
class ApplyArguments:
    segmenter: str = field(default="segmenter.zip", metadata={"help": "A file written by `train`."})
    input: str = field(default="", metadata={"help": "An image, a multi-page TIFF stack or a folder of images."})
    output: str = field(
        default="", metadata={"help": "Mask file (a TIFF stack for a stack) or, for a folder, a folder."}
    )
    model: Optional[str] = field(default=None, metadata={"help": "ViT to use instead of the one the file names."})
    strict: bool = field(
        default=False, metadata={"help": "Fail on the first unreadable image instead of skipping it."}
    )


def _as_list(value) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


# --------------------------------------------------------------------------------------------------
# train
# --------------------------------------------------------------------------------------------------
def _load_vit(name: Optional[str]):
    """(model, its image statistics) of a Hub id or folder, `(None, None)` for no name."""
    from alibi_dinov2.hub.models import load_model

    return (None, None) if name is None else load_model(name)


def train(arguments: TrainArguments) -> Path:
    """Fit a segmenter on the image + label pairs and save it; returns the file."""
    if arguments.model is not None:
        check_model_source(arguments.model)
    if arguments.features == "classical+vit" and arguments.model is None:
        raise InputError("--features classical+vit needs --model ID_OR_FOLDER")
    if not arguments.images or len(arguments.images) != len(arguments.labels):
        raise InputError(
            f"Give one --labels file per --images file (got {len(arguments.images)} and {len(arguments.labels)})"
        )
    images = [read_image(path) for path in arguments.images]
    labels = [read_labels(path) for path in arguments.labels]
    model, statistics = _load_vit(arguments.model if arguments.features != "classical" else None)
    segmenter = TrainableSegmenter(
        features=arguments.features,
        model=model,
        image_processor=statistics,  # the model's own, recorded in the file
        n_components=arguments.n_components,
        max_side=arguments.max_side,
    )
    try:
        segmenter.fit(images, labels)
    except ValueError as error:
        raise InputError(str(error)) from error
    segmenter.save(arguments.output)
    print(f"Saved {arguments.output}: classes {segmenter.classes_.tolist()}, {segmenter.n_features_in_} features")
    return Path(arguments.output)


# --------------------------------------------------------------------------------------------------
# apply
# --------------------------------------------------------------------------------------------------
def load_segmenter(path: str, model: Optional[str] = None) -> TrainableSegmenter:
    """A saved segmenter with the ViT it names (or `model`) loaded when its features need one; its ViT features use
    the image statistics the file records, those it was trained with."""
    from alibi_dinov2.segmentation.segmenter_file import read_segmenter

    if not Path(path).is_file():
        raise InputError(f"not found: {path} (no such segmenter file)")
    settings, _ = read_segmenter(path)
    name = model or settings["model_name"]
    uses_vit = settings["params"]["features"] != "classical"
    return TrainableSegmenter.load(path, model=_load_vit(name)[0] if uses_vit else None)


def _segment(segmenter: TrainableSegmenter, image: np.ndarray, name) -> np.ndarray:
    try:
        return segmenter.predict(image)
    except ValueError as error:
        raise InputError(f"{name}: {error}") from error


def apply_to_stack(segmenter: TrainableSegmenter, source: Path, output: Path) -> bool:
    """Segment every page of `source` into the TIFF stack `output`; False when `output` already exists.

    Finished pages are kept beside the output (`.NAME.pages/`) until the stack is written, so a killed run resumes.
    """
    if output.exists():
        return False
    pages = read_pages(source)
    done = output.with_name(f".{output.name}.pages")
    done.mkdir(parents=True, exist_ok=True)
    masks = []
    for index, page in enumerate(tqdm(pages, desc=source.name, unit="page")):
        saved = done / f"page_{index:05d}.npy"
        if not saved.exists():
            save_array_atomic(saved, _segment(segmenter, page, f"{source} page {index}"))
        masks.append(np.load(saved))
    with atomic_path(output) as temporary:
        write_image(temporary, [mask.astype(np.uint8 if mask.max() <= 255 else np.uint16) for mask in masks])
    shutil.rmtree(done)
    return True


def apply_to_folder(segmenter: TrainableSegmenter, folder: Path, output: Path, strict: bool = False) -> int:
    """One mask (`NAME.tif`, the folder's layout mirrored) per image of `folder`; returns how many were written."""
    files = list_image_files(folder)
    skipped = SkippedInputs(strict=strict)
    written = 0
    for path in tqdm(files, desc=folder.name, unit="image"):
        target = (output / path.relative_to(folder)).with_suffix(".tif")
        if target.exists():
            continue
        try:
            mask = _segment(segmenter, read_image(path), path)
        except (ImageReadError, ValueError) as error:
            skipped.add(path, error)
            continue
        with atomic_path(target) as temporary:
            write_mask(temporary, mask)
        written += 1
    skipped.summarise(total=len(files))
    return written


def apply(arguments: ApplyArguments) -> int:
    """Segment the input; returns the number of outputs written (0 when all were complete)."""
    source = Path(arguments.input)
    if not source.exists():
        raise InputError(f"not found: {source} (no such file or folder)")
    if not arguments.output:
        raise InputError("--output PATH is required")
    segmenter = load_segmenter(arguments.segmenter, arguments.model)
    output = Path(arguments.output)
    if source.is_dir():
        written = apply_to_folder(segmenter, source, output, arguments.strict)
    else:
        written = int(apply_to_stack(segmenter, source, output))
    print(f"Wrote {written} mask file(s) to {output}" if written else f"{output}: complete, nothing to do")
    return written


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------
def _parser(command: str) -> ArgumentParser:
    arguments = TrainArguments if command == "train" else ApplyArguments
    return ArgumentParser(arguments, prog=f"python -m alibi_dinov2.segmentation.command {command}")


def _split_command(argv: list[str]) -> tuple[str, list[str], Optional[dict]]:
    """(subcommand, remaining argv, config values): the subcommand is the first word or a config file's `command`."""
    if argv and argv[0] in SUBCOMMANDS:
        return argv[0], argv[1:], None
    if argv and Path(argv[0]).suffix.lower() in (".json", ".yaml", ".yml"):
        config = dict(load_config_file(argv[0]))
        command = config.pop("command", None)
        if command in SUBCOMMANDS:
            return command, argv[1:], config
    if argv and argv[0] in ("-h", "--help"):
        print(f"{USAGE}\n\n{__doc__}")
        raise SystemExit(0)
    raise InputError(f"first word must be train or apply (or a config file with \"command\"); {USAGE}")


def main(argv: Sequence[str] | None = None):
    command, rest, config = _split_command(list(sys.argv[1:] if argv is None else argv))
    parser = _parser(command)
    if config is not None:
        parser.apply_config(config, "the config file")
    (arguments,) = parser.parse(rest)
    return train(arguments) if command == "train" else apply(arguments)


if __name__ == "__main__":
    from alibi_dinov2.cli import run_command

    run_command(main, prog="alibi-segment")
