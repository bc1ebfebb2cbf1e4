"""Image + scribble-label pairs to train a segmenter on, from what microscopists hold: single images, pages of
stacks and folders.

* an image file and a label file (one page each);
* a stack and a label stack: page `i` of the labels scribbles page `i` of the stack (all pages, or `pages`);
* a stack and several label files: one label file per selected page, in order;
* a folder of images and a folder of labels: each image with the label file of the same relative path and stem
  (any image suffix); images without one are left out, and named.

Pages (or images) whose labels hold no scribble are left out and counted: scribbling a few pages of a stack is the
usual way to train on it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from alibi_dinov2.errors import InputError, SourceNotFoundError
from alibi_dinov2.io.images import count_pages, list_image_files, read_image, read_labels


logger = logging.getLogger(__name__)


@dataclass
class TrainingPair:
    """One training image `(H, W[, C])` and its labels `(H, W)` (0 = unlabelled), named for messages."""

    name: str
    image: np.ndarray
    labels: np.ndarray


def parse_pages(spec: str | Sequence[int] | None) -> list[int] | None:
    """`"0,3,7"`, `"2-5"` (both ends included) or a mix, or a list of indices -> sorted unique page indices; None
    stays None (all pages).

    Raises:
        InputError: anything else (the message shows the form).
    """
    if spec is None or (isinstance(spec, str) and not spec.strip()):
        return None
    if not isinstance(spec, str):
        spec = ",".join(str(page) for page in spec)
    pages = set()
    try:
        for part in spec.split(","):
            first, _, last = part.strip().partition("-")
            first_page, last_page = int(first), int(last) if last else int(first)
            if first_page < 0 or last_page < first_page:
                raise ValueError(part)
            pages.update(range(first_page, last_page + 1))
    except ValueError as error:
        raise InputError(f"--pages takes page indices from 0, like 0,3,7 or 2-5; got {spec!r}") from error
    return sorted(pages)


def training_pairs(images: Sequence[str], labels: Sequence[str], pages=None) -> list[TrainingPair]:
    """The scribbled pairs of `images` and `labels` (files, stacks or folders; see the module docstring).

    Raises:
        InputError: counts that do not pair, a missing file, labels of another shape than their image, a page
            outside a stack, or no scribble at all (each message names the files).
    """
    pages = parse_pages(pages)
    images, labels = [Path(path) for path in images], [Path(path) for path in labels]
    for path in images:
        if not path.exists():
            raise SourceNotFoundError(f"image file not found: {path}")
    owners = images * len(labels) if len(images) == 1 else images if len(images) == len(labels) else []
    for index, path in enumerate(labels):
        if not path.exists():
            owner = f" (the labels of {owners[index]})" if owners else ""
            raise SourceNotFoundError(f"label file not found: {path}{owner}")
    if len(images) == 1 and images[0].is_file() and len(labels) > 1:
        found = list(_stack_with_label_files(images[0], labels, pages))
    elif len(images) != len(labels) or not images:
        raise InputError(f"Give one --labels file or folder per --images one (got {len(images)} and {len(labels)})")
    else:
        found = [pair for image, label in zip(images, labels) for pair in _pairs_of(image, label, pages)]
    scribbled = [pair for pair in found if np.any(pair.labels > 0)]
    for pair in found:
        if not np.any(pair.labels > 0):
            logger.warning("%s: no scribble, left out", pair.name)
    if not scribbled:
        raise InputError(f"No scribble in any of the {len(found)} label image(s): label some pixels 1..K")
    return scribbled


def _pairs_of(image: Path, label: Path, pages):
    if image.is_dir() != label.is_dir():
        raise InputError(f"{image} and {label}: pair a folder of images with a folder of labels, a file with a file")
    if image.is_dir():
        yield from _folder_pairs(image, label)
        return
    count, label_count = count_pages(image), count_pages(label)
    selected = _selected_pages(image, count, pages)
    if label_count != count:
        raise InputError(
            f"{label} holds {label_count} page(s) for the {count} of {image}: give a label stack with one page per "
            "page, or one label file per selected page"
        )
    for page in selected:
        yield _pair(image, page if count > 1 else None, label, page if count > 1 else None)


def _stack_with_label_files(image: Path, labels: list[Path], pages):
    count = count_pages(image)
    selected = _selected_pages(image, count, pages)
    if len(labels) != len(selected):
        raise InputError(
            f"{len(labels)} label files for the {len(selected)} selected page(s) of {image}: give one per page "
            "(--pages picks them)"
        )
    for page, label in zip(selected, labels):
        yield _pair(image, page if count > 1 else None, label, None)


def _selected_pages(image: Path, count: int, pages) -> list[int]:
    if pages is None:
        return list(range(count))
    outside = [page for page in pages if page >= count]
    if outside:
        raise InputError(f"--pages {outside[0]}: {image} holds {count} page(s) (0 to {count - 1})")
    return list(pages)


def _folder_pairs(images: Path, labels: Path):
    files = list_image_files(images)
    by_stem = {path.relative_to(labels).with_suffix(""): path for path in list_image_files(labels)}
    unlabelled = []
    for path in files:
        label = by_stem.get(path.relative_to(images).with_suffix(""))
        if label is None:
            unlabelled.append(path.name)
            continue
        yield from _pairs_of(path, label, None)
    if unlabelled:
        shown = ", ".join(unlabelled[:5]) + (", ..." if len(unlabelled) > 5 else "")
        logger.warning("%d of %d images in %s have no label file in %s, left out: %s", len(unlabelled), len(files),
                       images, labels, shown)  # fmt: skip


def _pair(image: Path, image_page: int | None, label: Path, label_page: int | None) -> TrainingPair:
    name = f"{image} page {image_page}" if image_page is not None else str(image)
    pixels = read_image(image, page=image_page)
    scribbles = read_labels(label, page=label_page)
    if scribbles.shape != pixels.shape[:2]:
        where = f"{label} page {label_page}" if label_page is not None else str(label)
        raise InputError(f"{where} is {scribbles.shape[1]} x {scribbles.shape[0]} px but {name} is "
                         f"{pixels.shape[1]} x {pixels.shape[0]}: labels must match their image")  # fmt: skip
    return TrainingPair(name, pixels, scribbles)
