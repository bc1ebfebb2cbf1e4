"""TODO docstring for alibi_dinov2.training.data."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import numpy as np
import torch

from alibi_dinov2.errors import InputError
from alibi_dinov2.features.preprocessing import normalize, resize_and_crop
from alibi_dinov2.io.images import (
    ImageReadError,
    SkippedInputs,
    check_image_size,
    describe_source,
    list_image_files,
    read_rgb01,
)
from alibi_dinov2.training.arguments import RunArguments


CONTENT_KEY_BYTES = 16


# Why an image was skipped travels with its (placeholder) sample, as UTF-8 bytes, from the loader to the loop.
ERROR_MESSAGE_BYTES = 256


def read_checked_image(source, patch_size: int = 1, name: str | None = None) -> np.ndarray:
    """Any image source as `(H, W, 3)` RGB in [0, 1] (the project's image policy, `alibi_dinov2.io.images`).

    Raises:
        ImageReadError: unreadable, or smaller than one `patch_size` patch (`ImageTooSmallError`); the message
            starts with the image's name.
    """
    rgb = read_rgb01(source)
    check_image_size(rgb, patch_size, name or describe_source(source))
    return rgb


def preprocess_image(source, image_size: int, patch_size: int = 1) -> torch.Tensor:
    """Decode, resize the shortest side to `image_size`, centre-crop and normalise: `(3, image_size, image_size)`."""
    rgb = read_checked_image(source, patch_size)
    return normalize(resize_and_crop(rgb, image_size, mode="center_crop"))


def content_key(pixel_values: torch.Tensor) -> bytes:
    """Hash of a preprocessed image, the key of its cached teacher target (16 bytes)."""
    data = pixel_values.detach().cpu().contiguous().numpy().tobytes()
    return hashlib.blake2b(data, digest_size=CONTENT_KEY_BYTES).digest()


def encode_message(text: str) -> torch.Tensor:
    """`(ERROR_MESSAGE_BYTES,)` uint8: `text` as UTF-8, cut and zero-padded (a collatable string)."""
    data = text.encode("utf-8")[:ERROR_MESSAGE_BYTES]
    encoded = torch.zeros(ERROR_MESSAGE_BYTES, dtype=torch.uint8)
    if data:
        encoded[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return encoded


def decode_message(encoded: torch.Tensor) -> str:
    return bytes(encoded.cpu().tolist()).rstrip(b"\0").decode("utf-8", errors="replace")


def describe_record(source, index: int | None = None) -> str:
    """A readable name for an image record: its path when known, else its index."""
    if isinstance(source, (str, os.PathLike)) or (isinstance(source, dict) and source.get("path")):
        return describe_source(source)
    return f"item {index}"


class _TrainingSamples:
    """What both training datasets share: one record -> one sample dict.

    A sample holds `pixel_values` `(3, S, S)` normalised, `valid` (False for an unreadable or too small image,
    whose pixels are zeros and whose loss weight is 0, so that batch shapes and the step count never change),
    `index` (position in the dataset, or a stable id when streaming), `key` `(16,)` uint8 (content hash, zeros
    unless `with_keys`) and `error` (why the image was skipped, see [`encode_message`]; zeros when valid).
    """

    def __init__(self, records, image_column: str, image_size: int, patch_size: int = 1, with_keys=False) -> None:
        self.records = records
        self.image_column = image_column
        self.image_size = image_size
        self.patch_size = patch_size
        self.with_keys = with_keys

    def make_sample(self, source, sample_id: int) -> dict:
        try:
            pixel_values, error = preprocess_image(source, self.image_size, self.patch_size), ""
        except (ImageReadError, FileNotFoundError) as problem:
            pixel_values, error = torch.zeros(3, self.image_size, self.image_size), str(problem)
        valid = not error
        key = torch.zeros(CONTENT_KEY_BYTES, dtype=torch.uint8)
        if self.with_keys and valid:
            key = torch.frombuffer(bytearray(content_key(pixel_values)), dtype=torch.uint8)
        return {
            "pixel_values": pixel_values,
            "valid": torch.tensor(valid),
            "index": torch.tensor(sample_id, dtype=torch.int64),
            "key": key,
            "error": encode_message(error),
        }


class DistillationImages(_TrainingSamples, torch.utils.data.Dataset):
    """Map-style training images (a `datasets.Dataset` of undecoded images); items as in `_TrainingSamples`."""

    def __len__(self) -> int:
        return len(self.records)

    def describe(self, index: int) -> str:
        return describe_record(self.records[int(index)][self.image_column], int(index))

    def __getitem__(self, index: int) -> dict:
        return self.make_sample(self.records[int(index)][self.image_column], int(index))


def _stream_sample_id(source) -> int:
    """A stable 63-bit id for a streamed record (there is no index), from its path or its bytes."""
    if isinstance(source, dict):
        seed = (source.get("path") or "").encode() or (source.get("bytes") or b"")[: 1 << 20]
    elif isinstance(source, (str, os.PathLike)):
        seed = str(source).encode()
    else:
        seed = repr(source)[:4096].encode()
    return int.from_bytes(hashlib.blake2b(seed, digest_size=8).digest(), "little") >> 1


class StreamingDistillationImages(_TrainingSamples, torch.utils.data.IterableDataset):
    """Streamed training images (a `datasets.IterableDataset`); `index` is a stable id derived from the record."""

    def describe(self, index: int) -> str:
        return f"streamed item {int(index)}"

    def set_epoch(self, epoch: int) -> None:
        self.records.set_epoch(epoch)  # reshuffles the shard order and the shuffle buffer per epoch

    def __iter__(self):
        for record in self.records:
            source = record[self.image_column]
            yield self.make_sample(source, _stream_sample_id(source))


def _image_column_of(dataset, requested: str | None) -> str:
    from datasets import Image

    columns = list(dataset.features or {}) if dataset.features is not None else []
    if requested:
        if columns and requested not in columns:
            raise InputError(
                f"--image_column {requested!r} is not a column of the dataset; columns: {', '.join(columns)}."
            )
        return requested
    for name, feature in (dataset.features or {}).items():
        if isinstance(feature, Image):
            return name
    for name in ("image", "img", "pixel_values"):
        if name in columns:
            return name
    raise InputError(f"No image column found among {', '.join(columns) or 'no columns'}; name it with --image_column.")


def load_image_records(args: RunArguments):
    """The training records and the image column.

    Returns:
        `(records, image_column)`: a `datasets.Dataset` (or `IterableDataset` with `--streaming`) whose image
        column holds undecoded images (file paths, or `{"bytes", "path"}` records), decoded later by the dataset so
        that one bad file is skipped instead of ending the run.
    """
    import datasets

    if args.train_dir:
        return datasets.Dataset.from_dict({"image": [str(p) for p in list_image_files(args.train_dir)]}), "image"
    records = datasets.load_dataset(
        args.dataset_name, args.dataset_config_name, split=args.train_split, streaming=args.streaming
    )
    image_column = _image_column_of(records, args.image_column)
    records = records.select_columns([image_column])  # annotations and captions are never decoded
    if isinstance(records.features.get(image_column) if records.features else None, datasets.Image):
        records = records.cast_column(image_column, datasets.Image(decode=False))
    return records, image_column


def split_probe_records(records, image_column: str, args: RunArguments):
    """Held-out probe images and the remaining training records.

    Returns:
        `(train_records, probe_sources)` where `probe_sources` is a list of `(name, source)`: from `--probe_dir`,
        or `--num_probe_images` training images chosen with the seed and removed from training.
    """
    if args.probe_dir:
        return records, [(str(path), str(path)) for path in list_image_files(args.probe_dir)]
    count = args.num_probe_images
    if count == 0:
        return records, []
    if args.streaming:
        held_out = list(records.take(count))
        sources = [(describe_record(r[image_column], i), r[image_column]) for i, r in enumerate(held_out)]
        return records.skip(count), sources
    if count >= len(records):
        raise InputError(
            f"--num_probe_images {count} would hold out all {len(records)} training images; lower it, or give "
            "--probe_dir."
        )
    order = np.random.default_rng(args.seed).permutation(len(records))
    held_out, kept = sorted(order[:count].tolist()), sorted(order[count:].tolist())
    sources = [(describe_record(records[i][image_column], i), records[i][image_column]) for i in held_out]
    return records.select(kept), sources


@dataclass
class ProbeImages:
    """Held-out images, decoded once.

    Attributes:
        names: one per readable image.
        pixel_values: `(K, 3, image_size, image_size)` normalised, for the patch cosine to the teacher.
        probe_rgb: K arrays `(P, P, 3)` float32 in [0, 1] at `--probe_image_size`, for the positional probes.
        skipped: names of unreadable (or too small) images.
    """

    names: list
    pixel_values: torch.Tensor
    probe_rgb: list
    skipped: list

    def __len__(self) -> int:
        return len(self.names)


def prepare_probe_images(
    sources, image_size: int, probe_image_size: int, patch_size: int = 1, strict: bool = False
) -> ProbeImages:
    """Decode the `(name, source)` probe images; unreadable ones are skipped with a warning (`strict`: raised)."""
    skipped = SkippedInputs(strict=strict, what="probe image")
    names, pixel_values, probe_rgb = [], [], []
    for name, source in sources:
        try:
            rgb = read_checked_image(source, patch_size, name)
        except (ImageReadError, FileNotFoundError) as error:
            skipped.add(name, error)
            continue
        names.append(name)
        pixel_values.append(normalize(resize_and_crop(rgb, image_size, mode="center_crop")))
        probe_rgb.append(resize_and_crop(rgb, probe_image_size, mode="center_crop").permute(1, 2, 0).numpy())
    skipped.summarise(total=len(sources))
    stacked = torch.stack(pixel_values) if pixel_values else torch.zeros(0, 3, image_size, image_size)
    return ProbeImages(names, stacked, probe_rgb, skipped.names)

