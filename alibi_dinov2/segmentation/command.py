"""Scribble segmentation without Python: train a segmenter from image + scribble-label pairs, apply it to a file,
a folder or a multi-page TIFF stack.

    python -m alibi_dinov2.segmentation.command train --images a.tif b.png --labels a_labels.png b_labels.png \\
        --output segmenter.zip [--model ID_OR_FOLDER] [--features classical|classical+vit]
    python -m alibi_dinov2.segmentation.command apply --segmenter segmenter.zip --input stack.tif --output masks.tif

    python -m alibi_dinov2.segmentation.command train --images stack.tif --labels stack_labels.tif --pages 0,3,7

Label images: 0 = unlabelled, 1..K = classes. `train` takes images and label files, stacks and label stacks (or
one label file per page; `--pages` picks pages), and folders of images and labels paired by name (see
:mod:`alibi_dinov2.segmentation.pairs`). `apply` writes one TIFF stack (one series, the source's pixel size kept)
for a stack or any single file, a zarr array or an OME-Zarr image (NGFF 0.4, the source's pixel size kept) for an
output named `.zarr` or `.ome.zarr`, and one mask per image, mirroring the folder, for a folder. With
`--block_size` (always, for zarr outputs) images are segmented block by block through dask (see
:mod:`alibi_dinov2.segmentation.blocks`), TIFF pages and zarr inputs read lazily, on local threads or a
`dask.distributed` cluster (`--scheduler`). Every output records the segmenter that made it (file name and
SHA-256, in ImageJ's Info or the zarr's attributes): a re-run with the same segmenter skips it, another segmenter
is refused unless `--overwrite`. Outputs are written atomically, and a killed run over a stack
resumes from the pages it had finished.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from tqdm.auto import tqdm

from alibi_dinov2.cli import ArgumentParser, load_config_file
from alibi_dinov2.errors import InputError
from alibi_dinov2.features.large_images import VitTiling
from alibi_dinov2.hub.sources import check_model_source
from alibi_dinov2.io.chunked_images import create_ome_zarr, read_tiff_page_lazily, read_zarr_image
from alibi_dinov2.io.files import atomic_path, save_array_atomic
from alibi_dinov2.io.images import (
    ImageReadError,
    SkippedInputs,
    count_pages,
    is_tiff,
    list_image_files,
    read_image,
    write_image,
    write_mask,
)
from alibi_dinov2.io.tiff_stacks import StackMetadata, read_stack_metadata
from alibi_dinov2.segmentation.blocks import DEFAULT_BLOCK_SIZE, BlockOptions, scheduler_client
from alibi_dinov2.segmentation.pairs import parse_pages, training_pairs
from alibi_dinov2.segmentation.trainable import TrainableSegmenter


SUBCOMMANDS = ("train", "apply")
USAGE = (
    "usage: python -m alibi_dinov2.segmentation.command {train,apply} [CONFIG_FILE] [--option VALUE ...]; "
    "{train,apply} --help"
)


@dataclass
class TrainArguments:
    images: list[str] = field(
        default_factory=list, metadata={"help": "Training images (PNG/JPEG/TIFF), TIFF stacks or folders of images."}
    )
    labels: list[str] = field(
        default_factory=list,
        metadata={"help": "Scribble labels (0 = unlabelled, 1..K): one file per image, a label stack per stack (or "
                          "one file per selected page), a folder of labels (same names) per folder."},
    )
    pages: Optional[str] = field(
        default=None, metadata={"help": "Pages of the stacks to train on, like 0,3,7 or 2-5 (default: all)."}
    )
    output: str = field(default="segmenter.zip", metadata={"help": "The segmenter file to write."})
    model: Optional[str] = field(default=None, metadata={"help": "Hub id or folder of the ViT (classical+vit)."})
    features: str = field(default="classical", metadata={"help": "classical or classical+vit."})
    n_components: int = field(default=9, metadata={"help": "PCA dimensions of the ViT channels."})
    max_side: Optional[int] = field(default=None, metadata={"help": "Tile side of ViT features on large images."})

    def __post_init__(self):
        self.images, self.labels = _as_list(self.images), _as_list(self.labels)
        parse_pages(self.pages)  # a bad --pages fails before anything is read
        if self.features not in ("classical", "classical+vit"):
            raise ValueError(f"--features must be classical or classical+vit, not {self.features!r}")


@dataclass
class ApplyArguments:
    segmenter: str = field(default="segmenter.zip", metadata={"help": "A file written by `train`."})
    input: str = field(
        default="",
        metadata={"help": "An image, a multi-page TIFF stack, a folder of images, or a zarr / OME-Zarr image (read "
                          "lazily, segmented in blocks into a zarr --output)."},
    )
    output: str = field(
        default="",
        metadata={"help": "Mask file (a TIFF stack for a stack), a zarr array (NAME.zarr) or an OME-Zarr image "
                          "(NAME.ome.zarr, OME-NGFF 0.4), both written block by block, or, for a folder, a folder."},
    )
    model: Optional[str] = field(default=None, metadata={"help": "ViT to use instead of the one the file names."})
    strict: bool = field(
        default=False, metadata={"help": "Fail on the first unreadable image instead of skipping it."}
    )
    overwrite: bool = field(
        default=False, metadata={"help": "Redo outputs another segmenter made (those of this one are still skipped)."}
    )
    block_size: Optional[int] = field(
        default=None,
        metadata={"help": "Segment each image in blocks of this many pixels a side, through dask: memory bounded by "
                          "one block's features per worker, the mask equal to the whole-image one. Default: whole "
                          "images (zarr inputs and outputs: 2048)."},
    )
    num_workers: Optional[int] = field(
        default=None, metadata={"help": "dask threads for --block_size (default: the CPUs)."}
    )
    scheduler: Optional[str] = field(
        default=None,
        metadata={"help": "Run the blocks on the dask.distributed scheduler at this address (tcp://host:port) "
                          "instead of local threads; its workers must see the input and output paths."},
    )
    vit_max_tokens: int = field(
        default=VitTiling.max_tokens,
        metadata={"help": "ViT features in blocks: the whole image in one streamed pass up to this many patches, "
                          "overlapping tiles beyond."},
    )
    vit_tile_patches: int = field(default=VitTiling.tile_patches, metadata={"help": "ViT tile side, in patches."})
    vit_overlap_patches: int = field(
        default=VitTiling.overlap_patches, metadata={"help": "Overlap of neighbouring ViT tiles, in patches."}
    )

    def __post_init__(self):
        self.vit_tiling()  # bad tiling fails before anything is read

    def vit_tiling(self) -> VitTiling:
        return VitTiling(self.vit_max_tokens, self.vit_tile_patches, self.vit_overlap_patches)

    def block_options(self, client=None) -> Optional[BlockOptions]:
        """The block settings (blocks run on `client`, a dask.distributed client, when given), None for whole
        images (a zarr input or output is always run in blocks)."""
        if self.block_size is None and client is None:
            return None
        return BlockOptions(self.block_size or DEFAULT_BLOCK_SIZE, self.num_workers, client, self.vit_tiling())


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
    pairs = training_pairs(arguments.images, arguments.labels, arguments.pages)
    print(f"Training on {len(pairs)} scribbled image(s) or page(s)")
    model, statistics = _load_vit(arguments.model if arguments.features != "classical" else None)
    segmenter = TrainableSegmenter(
        features=arguments.features,
        model=model,
        image_processor=statistics,  # the model's own, recorded in the file
        n_components=arguments.n_components,
        max_side=arguments.max_side,
    )
    try:
        segmenter.fit([pair.image for pair in pairs], [pair.labels for pair in pairs])
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


def _segment(segmenter: TrainableSegmenter, image, name, blocks: Optional[BlockOptions] = None) -> np.ndarray:
    """The mask of one image: whole, or block by block through dask with `blocks`."""
    try:
        if blocks is None:
            return segmenter.predict(image)
        return blocks.compute(blocks.segment(segmenter, image))
    except ValueError as error:
        raise InputError(f"{name}: {error}") from error


@dataclass(frozen=True)
class Provenance:
    """Which segmenter file (name and SHA-256 of its bytes) makes the outputs of an `apply`."""

    segmenter: str
    sha256: str

    @classmethod
    def of(cls, path) -> "Provenance":
        return cls(Path(path).name, hashlib.sha256(Path(path).read_bytes()).hexdigest())

    def info(self, source) -> str:
        """The text recorded in every output (ImageJ's "Info")."""
        record = {"made_by": "alibi-segment apply", "segmenter": self.segmenter, "segmenter_sha256": self.sha256,
                  "source": str(source)}  # fmt: skip
        return json.dumps(record)


def recorded_segmenter(output: Path) -> str | None:
    """The segmenter SHA-256 an output of `apply` (a TIFF, or a zarr array's attributes) records, None when it
    records none."""
    try:
        if _is_zarr(output):
            import zarr

            return zarr.open(str(output), mode="r").attrs.get("segmenter_sha256")
        return json.loads(read_stack_metadata(output).info or "{}").get("segmenter_sha256")
    except Exception:  # not a TIFF or zarr array, not our record
        return None


def _is_zarr(path: Path) -> bool:
    return Path(path).suffix.lower() == ".zarr"


def _is_ome_zarr(path: Path) -> bool:
    return Path(path).name.lower().endswith(".ome.zarr")


def _is_done(output: Path, provenance: Provenance, overwrite: bool) -> bool:
    """True when `output` exists and this segmenter made it; False when it is to be (re)made.

    Raises:
        InputError: `output` was made by another segmenter (or by something else) and `overwrite` is off.
    """
    if not output.exists():
        return False
    recorded = recorded_segmenter(output)
    if recorded == provenance.sha256:
        return True
    if overwrite:
        return False
    made_by = f"another segmenter (sha256 {recorded[:12]}...)" if recorded else "no recorded segmenter"
    raise InputError(
        f"{output} exists and was made by {made_by}, not {provenance.segmenter} (sha256 {provenance.sha256[:12]}...): "
        "pass --overwrite to redo it, or choose another --output"
    )


def _source_metadata(source: Path) -> StackMetadata:
    try:
        return read_stack_metadata(source)
    except Exception:  # not a TIFF (PNG, JPEG...): no pixel size to keep
        return StackMetadata()


def _pages_done_folder(output: Path, provenance: Provenance) -> Path:
    """`.NAME.pages/` beside `output`, holding the finished pages of this segmenter (another one's are discarded)."""
    done = output.with_name(f".{output.name}.pages")
    record = done / "segmenter.sha256"
    if done.exists() and (not record.is_file() or record.read_text().strip() != provenance.sha256):
        print(f"{output}: discarding the finished pages of another segmenter")
        shutil.rmtree(done)
    done.mkdir(parents=True, exist_ok=True)
    record.write_text(provenance.sha256)
    return done


def apply_to_stack(
    segmenter: TrainableSegmenter,
    source: Path,
    output: Path,
    provenance: Provenance,
    overwrite: bool = False,
    blocks: Optional[BlockOptions] = None,
) -> bool:
    """Segment every page of `source` into the TIFF stack `output` (one series, the source's page axis and pixel
    size, the segmenter recorded); False when this segmenter already made `output`.

    Pages are read one at a time; finished pages are kept beside the output (`.NAME.pages/`) until the stack is
    written, so a killed run resumes where it stopped.
    """
    if _is_done(output, provenance, overwrite):
        return False
    count = count_pages(source)
    done = _pages_done_folder(output, provenance)
    finished = sum((done / f"page_{index:05d}.npy").exists() for index in range(count))
    if finished:
        print(f"{output}: resuming at page {finished} of {count}")
    for index in tqdm(range(count), desc=source.name, unit="page"):
        saved = done / f"page_{index:05d}.npy"
        if not saved.exists():
            page = _read_page(source, index, lazy=blocks is not None)
            mask = _segment(segmenter, page, f"{source} page {index}", blocks)
            save_array_atomic(saved, mask)
    masks = [np.load(done / f"page_{index:05d}.npy") for index in range(count)]
    dtype = np.uint8 if max(int(mask.max()) for mask in masks) <= 255 else np.uint16
    metadata = _source_metadata(source).with_info(provenance.info(source))
    with atomic_path(output) as temporary:
        write_image(temporary, [mask.astype(dtype) for mask in masks], metadata)
    shutil.rmtree(done)
    return True


def apply_to_folder(
    segmenter: TrainableSegmenter,
    folder: Path,
    output: Path,
    provenance: Provenance,
    strict: bool = False,
    overwrite: bool = False,
    blocks: Optional[BlockOptions] = None,
) -> int:
    """One mask (`NAME.tif`, the folder's layout mirrored) per image of `folder`; returns how many were written."""
    files = list_image_files(folder)
    skipped = SkippedInputs(strict=strict)
    written = 0
    for path in tqdm(files, desc=folder.name, unit="image"):
        target = (output / path.relative_to(folder)).with_suffix(".tif")
        if _is_done(target, provenance, overwrite):
            continue
        try:
            mask = _segment(segmenter, _read_page(path, 0, lazy=blocks is not None), path, blocks)
        except (ImageReadError, ValueError) as error:
            skipped.add(path, error)
            continue
        with atomic_path(target) as temporary:
            write_mask(temporary, mask, _source_metadata(path).with_info(provenance.info(path)))
        written += 1
    skipped.summarise(total=len(files))
    return written


def _read_page(source: Path, index: int, lazy: bool):
    """Page `index` of an image file: read whole, or (`lazy`, a TIFF) as a dask array read by its tiles or strips."""
    if lazy and is_tiff(source):
        return read_tiff_page_lazily(source, index)
    return read_image(source, page=index)


def _lazy_pages(source: Path) -> tuple[list, StackMetadata]:
    """The pages of a zarr / OME-Zarr image or an image file, lazily where the format allows, and its metadata."""
    if not _is_zarr(source):
        return [_read_page(source, index, lazy=True) for index in range(count_pages(source))], _source_metadata(source)
    image, metadata = read_zarr_image(source)
    if image.ndim == 2 or (image.ndim == 3 and image.shape[-1] in (1, 3, 4)):
        return [image], metadata
    if image.ndim == 3:
        return [image[index] for index in range(image.shape[0])], metadata
    raise InputError(f"{source} holds an array of shape {image.shape}: block-wise segmentation takes planes (H, W), "
                     "(H, W, 1|3|4) or a stack of them (pages, H, W)")  # fmt: skip


def apply_to_zarr(
    segmenter: TrainableSegmenter,
    source: Path,
    output: Path,
    provenance: Provenance,
    overwrite: bool = False,
    blocks: Optional[BlockOptions] = None,
) -> bool:
    """Segment an image (zarr / OME-Zarr read lazily, a TIFF by its tiles or strips, or any image file) in blocks
    into the zarr `output`: a plain zarr array, or an OME-Zarr image for a name ending in `.ome.zarr` (the source's
    pixel size kept); `(H, W)`, or `(pages, H, W)` for a stack. Written block by block through a temporary folder
    beside it, so that a killed run leaves no output; False when this segmenter already made `output`."""
    import dask.array as da
    import zarr

    if _is_done(output, provenance, overwrite):
        return False
    blocks = blocks or BlockOptions()
    try:
        pages, metadata = _lazy_pages(source)
        masks = [blocks.segment(segmenter, page) for page in pages]
    except (ImageReadError, ValueError) as error:
        raise InputError(f"{source}: {error}") from error
    dtype = np.uint8 if int(np.max(segmenter.classes_)) <= 255 else np.uint16
    mask = (masks[0] if len(masks) == 1 else da.stack(masks)).astype(dtype)
    mask = mask.rechunk((1,) * (mask.ndim - 2) + (blocks.block_size, blocks.block_size))  # zarr's regular chunks
    record = json.loads(provenance.info(source))
    temporary = output.with_name(f".{output.name}.tmp")
    shutil.rmtree(temporary, ignore_errors=True)
    if _is_ome_zarr(output):
        level = create_ome_zarr(temporary, mask.shape, dtype, mask.chunksize, metadata, record, name=output.name)
        blocks.compute(da.store(mask, level, lock=False, compute=False))
    else:
        blocks.compute(da.to_zarr(mask, str(temporary), compute=False))
        zarr.open(str(temporary), mode="r+").attrs.update(record)
    shutil.rmtree(output, ignore_errors=True)
    temporary.rename(output)
    return True


def apply(arguments: ApplyArguments) -> int:
    """Segment the input; returns the number of outputs written (0 when this segmenter had made them all)."""
    source, output = Path(arguments.input), Path(arguments.output)
    if not source.exists():
        raise InputError(f"not found: {source} (no such file or folder)")
    if not arguments.output:
        raise InputError("--output PATH is required")
    if _is_zarr(source) and not _is_zarr(output):
        raise InputError(f"a zarr input gives a zarr output: --output {output.with_suffix('.zarr')} (or .ome.zarr)")
    if _is_zarr(output) and source.is_dir() and not _is_zarr(source):
        raise InputError(f"a folder gives a folder of TIFF masks, not a zarr: --output {output.with_suffix('')}")
    segmenter = load_segmenter(arguments.segmenter, arguments.model)
    provenance = Provenance.of(arguments.segmenter)
    with scheduler_client(arguments.scheduler) as client:  # an unreachable scheduler stops the run before any work
        blocks = arguments.block_options(client)
        if _is_zarr(output):
            written = int(apply_to_zarr(segmenter, source, output, provenance, arguments.overwrite, blocks))
        elif source.is_dir():
            written = apply_to_folder(segmenter, source, output, provenance, arguments.strict, arguments.overwrite,
                                      blocks)  # fmt: skip
        else:
            written = int(apply_to_stack(segmenter, source, output, provenance, arguments.overwrite, blocks))
    if written:
        print(f"Wrote {written} mask file(s) to {output}")
    else:
        print(f"{output}: complete, made by this segmenter ({provenance.segmenter}); nothing to do")
    return written


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------
def build_parser(command: str) -> ArgumentParser:
    """The command-line parser of the subcommand `command` (`train` or `apply`)."""
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
    parser = build_parser(command)
    if config is not None:
        parser.apply_config(config, "the config file")
    (arguments,) = parser.parse(rest)
    return train(arguments) if command == "train" else apply(arguments)


if __name__ == "__main__":
    from alibi_dinov2.cli import run_command

    run_command(main, prog="alibi-segment")
