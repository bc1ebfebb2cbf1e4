"""Named image sets for probes, reports and the demo, read by one policy.

* ``textures``: scikit-image's bundled homogeneous textures (brick, grass, gravel; 512 x 512).
* ``micro``: synthetic homogeneous microstructures from
  :func:`alibi_dinov2.synthetic.microstructures.generate_microstructure` (15 images of 518 x 518 by default).
* ``noise``: uniform RGB noise (60 images of 518 x 518 by default).
* ``NAME:COUNT`` for any of the three above picks the number of images (``noise:10``).
* a folder of image files (PNG, JPEG, TIFF, ...), read at native size by :mod:`alibi_dinov2.io.images`;
* a folder written by ``datasets.Dataset.save_to_disk`` or ``hf:NAME`` for ``datasets.load_dataset``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Union

import numpy as np

from alibi_dinov2.errors import InputError, SourceNotFoundError
from alibi_dinov2.io.images import ImageReadError, SkippedInputs, list_image_files, read_rgb01, to_rgb01


BUILTIN_SOURCES: tuple[str, ...] = ("textures", "micro", "noise")
DEFAULT_COUNTS = {"textures": 3, "micro": 15, "noise": 60}
DEFAULT_SIZE = (518, 518)
TEXTURE_NAMES = ("brick", "grass", "gravel")
NamedImage = tuple[str, np.ndarray]


def texture_images(count: int | None = None) -> list[NamedImage]:
    """scikit-image's bundled textures (no download): brick, grass, gravel, uint8 (512, 512)."""
    from skimage import data

    names = TEXTURE_NAMES[: count if count is not None else len(TEXTURE_NAMES)]
    return [(name, getattr(data, name)()) for name in names]


def micro_images(count: int = 15, size: tuple[int, int] = DEFAULT_SIZE, seed: int = 0) -> list[NamedImage]:
    """Synthetic homogeneous microstructures (2 or 3 phases, varied grain sizes), float32 in [0, 1].

    No illumination gradient: the images carry no positional signal, so any probe score is the model's.
    """
    from alibi_dinov2.synthetic.microstructures import generate_microstructure

    grain_sizes = (8.0, 12.0, 16.0)
    images = []
    for index in range(count):
        image, _ = generate_microstructure(
            size=tuple(size),
            n_phases=2 + index % 2,
            seed=seed + index,
            noise=0.05,
            illumination=0.0,
            blur=0.0,
            grain_size=grain_sizes[index % len(grain_sizes)],
        )
        images.append((f"micro_{index:02d}", np.asarray(image, dtype=np.float32)))
    return images


def noise_images(count: int = 60, size: tuple[int, int] = DEFAULT_SIZE, seed: int = 0) -> list[NamedImage]:
    """Uniform RGB noise images, float32 (H, W, 3) in [0, 1)."""
    return [
        (f"noise_{index:02d}", np.random.default_rng([seed, index]).random((*size, 3), dtype=np.float32))
        for index in range(count)
    ]


def folder_images(
    folder: Union[str, Path], limit: int | None = None, skipped: SkippedInputs | None = None
) -> list[NamedImage]:
    """Every image file of a folder (sorted by name, not recursive) as RGB in [0, 1] (first page of stacks).

    Unreadable files are recorded in `skipped` (a warning naming each; `SkippedInputs(strict=True)` raises).
    """
    skipped = SkippedInputs() if skipped is None else skipped
    images = []
    for path in list_image_files(folder, recursive=False):
        if limit is not None and len(images) >= limit:
            break
        try:
            images.append((path.name, read_rgb01(path)))
        except ImageReadError as error:
            skipped.add(path, error)
    return images


def _is_saved_dataset(folder: Path) -> bool:
    return any((folder / marker).exists() for marker in ("dataset_info.json", "state.json", "dataset_dict.json"))


def dataset_images(
    name_or_path: str, split: str = "train", image_column: str | None = None, limit: int | None = None
) -> list[NamedImage]:
    """Images of a ``datasets`` dataset: a ``save_to_disk`` folder or a name for ``load_dataset``.

    Args:
        image_column: column holding the images; by default the first ``Image`` feature, else
            ``"image"`` or ``"img"``.
    """
    import datasets

    path = Path(name_or_path)
    if path.is_dir() and _is_saved_dataset(path):
        dataset = datasets.load_from_disk(str(path))
    else:
        dataset = datasets.load_dataset(name_or_path, split=split)
    if isinstance(dataset, datasets.DatasetDict):
        dataset = dataset[split]
    if image_column is None:
        image_columns = [name for name, feature in dataset.features.items() if isinstance(feature, datasets.Image)]
        image_columns += [name for name in ("image", "img") if name in dataset.column_names]
        if not image_columns:
            raise ValueError(f"No image column in {name_or_path}; columns are {dataset.column_names}")
        image_column = image_columns[0]
    count = len(dataset) if limit is None else min(limit, len(dataset))
    return [
        (f"{Path(name_or_path).name}_{index:04d}", to_rgb01(dataset[index][image_column]))
        for index in range(count)
    ]


def load_image_source(
    spec: str,
    limit: int | None = None,
    size: tuple[int, int] | None = None,
    split: str = "train",
    image_column: str | None = None,
    seed: int = 0,
    skipped: SkippedInputs | None = None,
) -> list[NamedImage]:
    """Resolve one ``--images`` entry to a list of (name, image) pairs.

    Args:
        spec: ``textures``, ``micro``, ``noise`` (optionally ``:COUNT``), a folder of images, a
            ``save_to_disk`` folder, or ``hf:NAME``.
        limit: at most this many images (overrides the default count of the built-in sets).
        size: (H, W) of the generated sets ``micro`` and ``noise`` (518 x 518 by default).
        skipped: where unreadable files of a folder are recorded (see :func:`folder_images`).

    Raises:
        SourceNotFoundError: a path that is no folder; InputError: an unknown name.
    """
    name, _, count_text = spec.partition(":")
    if name in BUILTIN_SOURCES:
        count = int(count_text) if count_text else DEFAULT_COUNTS[name]
        count = count if limit is None else min(count, limit)
        if name == "textures":
            return texture_images(count)
        generator = micro_images if name == "micro" else noise_images
        return generator(count=count, size=tuple(size or DEFAULT_SIZE), seed=seed)
    if name == "hf":
        return dataset_images(count_text, split=split, image_column=image_column, limit=limit)
    path = Path(spec)
    if path.is_dir():
        if _is_saved_dataset(path):
            return dataset_images(spec, split=split, image_column=image_column, limit=limit)
        return folder_images(path, limit=limit, skipped=skipped)
    if path.is_file():
        return [(path.name, read_rgb01(path))]
    if spec.startswith((".", "/", "~")) or "/" in spec or Path(spec).suffix:
        raise SourceNotFoundError(f"not found: {spec} (no such image file or folder)")
    raise InputError(
        f"Unknown image source {spec!r}: use one of {', '.join(BUILTIN_SOURCES)} (optionally NAME:COUNT), "
        "an image folder, a datasets save_to_disk folder or hf:NAME"
    )

