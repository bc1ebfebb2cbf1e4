"""Semantic-segmentation data for the linear probes: image/mask pairs from the Hub, from disk or from a folder.

Every source is turned into a ``datasets.Dataset`` with an image column and a mask column, so the probe code
sees one kind of object whatever the data came from:

* a Hub dataset, by name (``datasets.load_dataset(name, config_name, split=...)``), e.g. ADE20K or VOC;
* a folder written by ``datasets.Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``;
* a local image/mask folder, in one of three layouts::

      ROOT/train/images/x.jpg        ROOT/train/masks/x.png      (any split name: train, val, test ...)
      ROOT/val/images/y.png          ROOT/val/masks/y.png

  Pascal VOC's own devkit layout (the extracted ``VOCdevkit/VOC2007`` or ``VOCdevkit/VOC2012`` folder)::

      ROOT/JPEGImages/x.jpg   ROOT/SegmentationClass/x.png   ROOT/ImageSets/Segmentation/train.txt (one name a line)

  or ADE20K's (the extracted ``ADEChallengeData2016`` folder; splits ``train``/``training`` and
  ``validation``/``val``)::

      ROOT/images/training/x.jpg     ROOT/annotations/training/x.png

  Images and masks are paired by file stem. Masks are single-channel images holding class indices
  (palette PNGs such as VOC's are read as their indices): 0 .. num_classes - 1, and the ignore index
  (255 by default) for unlabelled pixels.

:class:`SegmentationDataset` reads images through :mod:`alibi_dinov2.io.images`, resizes every pair to a fixed square
(:mod:`alibi_dinov2.features.preprocessing`: image bilinear in float32, mask nearest-neighbour on the same
geometry), normalises the image and checks the label values.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Sequence, Union

import numpy as np
import torch

from alibi_dinov2.features.preprocessing import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    center_crop_box,
    normalize,
    resize_and_crop,
    resize_nearest,
)
from alibi_dinov2.io.images import IMAGE_SUFFIXES, load_image, read_rgb01


PathLike = Union[str, os.PathLike]

# The modes of alibi_dinov2.features.preprocessing.resize_and_crop that give the fixed-size square a batch needs.
RESIZE_MODES = ("resize", "center_crop")

# Column names of the datasets built from local folders.
LOCAL_IMAGE_COLUMN = "image"
LOCAL_MASK_COLUMN = "mask"


# --------------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------------
def _files_by_stem(folder: Path) -> dict[str, Path]:
    return {path.stem: path for path in sorted(folder.iterdir()) if path.suffix.lower() in IMAGE_SUFFIXES}


def _pairs_to_dataset(names: Sequence[str], images: Sequence[Path], masks: Sequence[Path]):
    import datasets

    columns = {
        "name": list(names),
        LOCAL_IMAGE_COLUMN: [str(path) for path in images],
        LOCAL_MASK_COLUMN: [str(path) for path in masks],
    }
    dataset = datasets.Dataset.from_dict(columns)
    # Decoding through datasets.Image keeps palette masks as their indices (PIL mode "P").
    dataset = dataset.cast_column(LOCAL_IMAGE_COLUMN, datasets.Image())
    return dataset.cast_column(LOCAL_MASK_COLUMN, datasets.Image())


def is_voc_devkit_folder(root: PathLike) -> bool:
    """Whether `root` looks like ``VOCdevkit/VOC20xx`` (JPEGImages, SegmentationClass, ImageSets/Segmentation)."""
    root = Path(root)
    return all((root / name).is_dir() for name in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"))


def _voc_devkit_split(root: Path, split: str):
    list_file = root / "ImageSets" / "Segmentation" / f"{split}.txt"
    if not list_file.is_file():
        available = sorted(path.stem for path in (root / "ImageSets" / "Segmentation").glob("*.txt"))
        raise FileNotFoundError(
            f"No split list {list_file}; this VOC folder has the splits {available}. Set the split name "
            "(--train_split / --val_split) to one of them."
        )
    names = [line.strip() for line in list_file.read_text().splitlines() if line.strip()]
    images = [root / "JPEGImages" / f"{name}.jpg" for name in names]
    masks = [root / "SegmentationClass" / f"{name}.png" for name in names]
    missing = [str(path) for path in images + masks if not path.is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} files listed in {list_file} are missing, e.g. {missing[:3]}")
    return _pairs_to_dataset(names, images, masks)


def is_ade_challenge_folder(root: PathLike) -> bool:
    """Whether `root` looks like the extracted ``ADEChallengeData2016`` (``images/<split>``,
    ``annotations/<split>``)."""
    root = Path(root)
    return (root / "images").is_dir() and (root / "annotations").is_dir()


# ADE20K's folders are named "training" and "validation"; the Hub and our configs say "train" and "validation".
ADE_SPLIT_FOLDERS = {"train": "training", "val": "validation"}


def local_folder_split(root: PathLike, split: str):
    """One split of a local image/mask folder as a ``datasets.Dataset`` with columns name, image, mask.

    Layouts: ``ROOT/<split>/images`` + ``ROOT/<split>/masks`` (paired by file stem), a VOC devkit folder
    (``JPEGImages``, ``SegmentationClass``, ``ImageSets/Segmentation/<split>.txt``) or ``ADEChallengeData2016``
    (``images/<split>`` + ``annotations/<split>``).

    Raises:
        FileNotFoundError: the folder, the split or a mask is missing.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"Data folder {root} does not exist; set --data_dir to an existing folder.")
    if is_voc_devkit_folder(root):
        return _voc_devkit_split(root, split)
    if is_ade_challenge_folder(root):
        folder = ADE_SPLIT_FOLDERS.get(split, split)
        image_folder, mask_folder = root / "images" / folder, root / "annotations" / folder
        splits = sorted(path.name for path in (root / "images").iterdir() if path.is_dir())
    else:
        image_folder, mask_folder = root / split / "images", root / split / "masks"
        splits = sorted(path.name for path in root.iterdir() if (path / "images").is_dir())
    if not image_folder.is_dir() or not mask_folder.is_dir():
        raise FileNotFoundError(
            f"Expected {image_folder} and {mask_folder} (layout ROOT/<split>/images/x.jpg + ROOT/<split>/masks/x.png, "
            f"a VOCdevkit/VOC20xx folder or ADEChallengeData2016); splits found in {root}: {splits or 'none'}."
        )
    images, masks = _files_by_stem(image_folder), _files_by_stem(mask_folder)
    if not images:
        raise FileNotFoundError(f"No image files ({', '.join(IMAGE_SUFFIXES)}) in {image_folder}")
    unpaired = sorted(set(images) - set(masks))
    if unpaired:
        raise FileNotFoundError(
            f"{len(unpaired)} images in {image_folder} have no mask of the same name in {mask_folder}, "
            f"e.g. {unpaired[:3]}; add the masks or remove those images."
        )
    names = sorted(images)
    return _pairs_to_dataset(names, [images[name] for name in names], [masks[name] for name in names])


def _is_saved_dataset(folder: Path) -> bool:
    return any((folder / marker).exists() for marker in ("dataset_info.json", "state.json", "dataset_dict.json"))


def _load_hub_dataset(name: str, config_name: str | None, split: str, revision: str | None):
    import datasets

    try:
        return datasets.load_dataset(name, config_name, split=split, revision=revision)
    except RuntimeError as error:
        if "scripts are no longer supported" not in str(error):
            raise
        raise RuntimeError(
            f"{name} is read by a loading script, which datasets {datasets.__version__} no longer runs. Use the "
            "Hub's Parquet export (--dataset_revision refs/convert/parquet; its configuration may then be named "
            "'default'), a Parquet copy of the dataset, or the original files with --data_dir (VOCdevkit/VOC20xx, "
            "ADEChallengeData2016, or ROOT/<split>/images + ROOT/<split>/masks)."
        ) from error


def load_segmentation_split(
    split: str,
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    data_dir: PathLike | None = None,
    image_column: str = "image",
    mask_column: str = "label",
    max_samples: int | None = None,
    dataset_revision: str | None = None,
):
    """One split of a segmentation data source.

    Args:
        split: split name (``train``, ``validation``, ``val`` ...).
        dataset_name: a Hub dataset name or a ``save_to_disk`` folder; exclusive with `data_dir`.
        dataset_revision: branch, tag or commit of the Hub dataset (e.g. ``refs/convert/parquet``, the Hub's
            Parquet export of a dataset that only a loading script could read).
        data_dir: a local image/mask folder (see the module docstring for the layouts).
        image_column, mask_column: columns of a Hub / saved dataset; local folders use ``image`` / ``mask``.
        max_samples: keep only the first ones (quick runs).

    Returns:
        (dataset, image_column, mask_column): a ``datasets.Dataset`` and the columns to read.
    """
    import datasets

    if (dataset_name is None) == (data_dir is None):
        raise ValueError(
            "Give exactly one data source: --dataset_name (a Hub dataset or a save_to_disk folder) or --data_dir "
            f"(a local image/mask folder); got dataset_name={dataset_name!r}, data_dir={data_dir!r}."
        )
    if data_dir is not None:
        dataset = local_folder_split(data_dir, split)
        image_column, mask_column = LOCAL_IMAGE_COLUMN, LOCAL_MASK_COLUMN
    else:
        path = Path(dataset_name)
        if path.is_dir() and _is_saved_dataset(path):
            dataset = datasets.load_from_disk(str(path))
        else:
            dataset = _load_hub_dataset(dataset_name, dataset_config_name, split, dataset_revision)
        if isinstance(dataset, datasets.DatasetDict):
            if split not in dataset:
                raise ValueError(f"Split {split!r} not in {dataset_name}; its splits are {list(dataset)}.")
            dataset = dataset[split]
        for role, column in (("image", image_column), ("mask", mask_column)):
            if column not in dataset.column_names:
                raise ValueError(
                    f"{role} column {column!r} not in {dataset_name} (split {split!r}); its columns are "
                    f"{dataset.column_names}. Set --{role}_column."
                )
    if max_samples is not None:
        dataset = dataset.select(range(min(max_samples, len(dataset))))
    if len(dataset) == 0:
        raise ValueError(f"Split {split!r} of the data source is empty.")
    return dataset, image_column, mask_column


# --------------------------------------------------------------------------------------------------
# Pre-processing
# --------------------------------------------------------------------------------------------------
def mask_to_array(mask, where: str = "mask") -> np.ndarray:
    """Mask (any source :func:`alibi_dinov2.io.images.load_image` takes) -> (H, W) int64 class indices; palette
    images give their indices.

    Raises:
        ValueError: a multi-channel (colour-coded) mask, or non-integer values.
    """
    mask = load_image(mask, palette="indices")
    if mask.ndim == 3 and mask.shape[-1] == 1:
        mask = mask[..., 0]
    if mask.ndim == 3 and mask.shape[-1] in (2, 3, 4):
        kind = {2: "LA", 3: "RGB", 4: "RGBA"}[mask.shape[-1]]
        raise ValueError(
            f"{where} is a {kind} colour image; masks must hold one class index per pixel (a palette or grayscale "
            "PNG). Convert colour-coded masks to index masks first."
        )
    if mask.ndim != 2:
        raise ValueError(f"{where} must be a (H, W) array of class indices; got shape {mask.shape}.")
    if not np.issubdtype(mask.dtype, np.integer) and not np.all(np.mod(mask, 1) == 0):
        raise ValueError(f"{where} holds non-integer values; masks must hold class indices.")
    return mask.astype(np.int64)


def resize_mask(mask: np.ndarray, size: int, mode: str = "resize") -> np.ndarray:
    """(H, W) int class indices -> (size, size) int64, nearest neighbour (labels are never blended), on the same
    geometry as :func:`alibi_dinov2.features.preprocessing.resize_and_crop` gives the image."""
    height, width = mask.shape
    if mode == "resize":
        (new_height, new_width), (top, left) = (size, size), (0, 0)
    else:
        (new_height, new_width), (top, left) = center_crop_box(height, width, size)
    mask = resize_nearest(mask, (new_height, new_width))
    return np.ascontiguousarray(mask[top : top + size, left : left + size], dtype=np.int64)


def prepare_labels(
    mask: np.ndarray, num_classes: int, ignore_index: int = 255, reduce_labels: bool = False, where: str = "mask"
) -> np.ndarray:
    """Map raw mask values to training labels and check them.

    Args:
        mask: (H, W) integer class indices.
        reduce_labels: ADE20K convention: 0 ("other") becomes the ignore index and every other value v becomes v - 1.

    Returns:
        (H, W) int64 with values in [0, num_classes) or equal to `ignore_index`.

    Raises:
        ValueError: a value outside that range, naming the values and the fix.
    """
    raw = np.asarray(mask, dtype=np.int64)
    mask = raw
    if reduce_labels:
        ignored = (raw == 0) | (raw == ignore_index)
        mask = np.where(ignored, ignore_index, raw - 1)
    bad = (mask != ignore_index) & ((mask < 0) | (mask >= num_classes))
    if bad.any():
        values = np.unique(raw[bad])  # as stored in the file, before reduce_labels
        allowed = f"1..{num_classes} (reduce_labels)" if reduce_labels else f"0..{num_classes - 1}"
        raise ValueError(
            f"{where} holds label values {values[:10].tolist()} outside {allowed} and not the ignore index "
            f"{ignore_index}. Set --num_classes to the number of classes, --ignore_index to the unlabelled value, "
            "or --reduce_labels for masks whose 0 means 'unlabelled' (ADE20K)."
        )
    return mask


def _undecoded(dataset, columns: Sequence[str]):
    """`dataset` with its ``datasets.Image`` columns left as ``{"bytes", "path"}`` records, so that
    :mod:`alibi_dinov2.io.images` decodes them (and names the file when it cannot)."""
    import datasets

    features = getattr(dataset, "features", None) or {}
    for column in columns:
        feature = features.get(column)
        if isinstance(feature, datasets.Image) and feature.decode:
            dataset = dataset.cast_column(column, datasets.Image(decode=False))
    return dataset


class SegmentationDataset(torch.utils.data.Dataset):
    """Resized, normalised image/mask pairs of a ``datasets.Dataset``.

    Images are read by the project's one policy (:func:`alibi_dinov2.io.images.read_rgb01`: any format, palette,
    alpha, high-bit data) and resized in float32 (:func:`alibi_dinov2.features.preprocessing.resize_and_crop`,
    bilinear); masks by nearest neighbour on the same geometry.

    Items are dicts with ``pixel_values`` (3, S, S) float32, ``labels`` (S, S) int64 (values in
    [0, num_classes) or the ignore index) and ``index`` (int), S = `image_size`.
    """

    def __init__(
        self,
        dataset,
        image_column: str,
        mask_column: str,
        num_classes: int,
        image_size: int,
        ignore_index: int = 255,
        reduce_labels: bool = False,
        resize_mode: str = "resize",
        image_mean: Sequence[float] = IMAGENET_MEAN,
        image_std: Sequence[float] = IMAGENET_STD,
    ):
        if resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {RESIZE_MODES}; got {resize_mode!r}.")
        self.dataset = _undecoded(dataset, (image_column, mask_column))
        self.image_column, self.mask_column = image_column, mask_column
        self.num_classes, self.image_size = int(num_classes), int(image_size)
        self.ignore_index, self.reduce_labels, self.resize_mode = int(ignore_index), bool(reduce_labels), resize_mode
        self.image_mean, self.image_std = tuple(image_mean), tuple(image_std)

    def __len__(self) -> int:
        return len(self.dataset)

    def sample_name(self, index: int, row: dict | None = None) -> str:
        """'sample 3 (2007_000032)': the index and, for local folders, the file stem."""
        row = self.dataset[int(index)] if row is None else row
        return f"sample {index}" + (f" ({row['name']})" if "name" in row else "")

    def read_image(self, index: int, row: dict | None = None) -> np.ndarray:
        """(H, W, 3) float32 RGB in [0, 1] of one sample, as stored (ImageReadError naming it if unreadable)."""
        row = self.dataset[int(index)] if row is None else row
        return read_rgb01(row[self.image_column])

    def select(self, indices: Sequence[int]) -> "SegmentationDataset":
        """The same dataset restricted to `indices` (renumbered 0 .. len - 1)."""
        subset = copy.copy(self)
        subset.dataset = self.dataset.select(list(indices))
        return subset

    def __getitem__(self, index: int) -> dict:
        row = self.dataset[int(index)]
        where = f"mask of {self.sample_name(index, row)}"
        image = resize_and_crop(self.read_image(index, row), self.image_size, self.resize_mode, resample="bilinear")
        mask = resize_mask(mask_to_array(row[self.mask_column], where), self.image_size, self.resize_mode)
        labels = prepare_labels(mask, self.num_classes, self.ignore_index, self.reduce_labels, where)
        return {
            "pixel_values": normalize(image, self.image_mean, self.image_std),
            "labels": torch.from_numpy(labels),
            "index": int(index),
        }


__all__ = [
    "RESIZE_MODES",
    "SegmentationDataset",
    "is_voc_devkit_folder",
    "load_segmentation_split",
    "local_folder_split",
    "mask_to_array",
    "prepare_labels",
    "resize_mask",
]
