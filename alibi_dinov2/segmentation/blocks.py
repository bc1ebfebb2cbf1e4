"""Segmentation of images of any size with bounded memory: the image is cut into square blocks, each block is
extended by a halo wide enough for every filter of the classical stack, featurised, classified and trimmed back, so
that the mask equals the whole-image one (the classical features agree to float32 rounding) while only one block's
feature stack (58 float32 channels of `(block + 2 halo)^2` pixels, plus the ViT channels) exists per worker.

ViT channels (feature sets with ``vit``) come from the whole image's patch grid, computed first
(:func:`~alibi_dinov2.features.large_images.large_image_patch_grid`: one pass on the streamed attention up to a token
budget, overlapping tiles beyond) and reduced by the image's PCA to `n_components` channels per patch; each block
then upsamples its own window of that small grid (:func:`~alibi_dinov2.features.vit.upsample_channels`), the values
the whole image's upsampling has there.

Blocks run through dask (`dask.array.map_overlap`): threads by default, or any scheduler dask takes (a
`dask.distributed.Client` for a cluster). Intensity scaling is the project's rule applied to the whole image (its
bit depth or range is measured once), not block by block.

    mask = segment_in_blocks(segmenter, image, block_size=2048).compute()
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from alibi_dinov2.cli import available_cpus
from alibi_dinov2.errors import InputError
from alibi_dinov2.features.classical import GAUSSIAN_TRUNCATE, MEMBRANE_KERNEL_SIZE
from alibi_dinov2.features.large_images import VitTiling, image_extremes, large_image_patch_grid
from alibi_dinov2.features.vit import model_patch_size, pca_reduce_patches, upsample_channels
from alibi_dinov2.io.images import to_float01, to_grayscale
from alibi_dinov2.segmentation.extractors import ClassicalFeatures, VitFeatures


DEFAULT_BLOCK_SIZE = 2048
SCHEDULER_TIMEOUT_S = 10  # how long a dask.distributed scheduler is tried before the address is reported
# Derivatives on a blur reach one more pixel each way (Sobel, second differences); one more for safety.
_DERIVATIVE_REACH = 2


def classical_halo(sigmas) -> int:
    """Pixels a block must borrow from its neighbours for its classical features to equal the whole image's: the
    widest Gaussian radius (scipy's `int(4 sigma + 0.5)`) plus the derivatives' reach, or the membrane kernel's."""
    blur = max(int(GAUSSIAN_TRUNCATE * float(sigma) + 0.5) for sigma in sigmas)
    return max(blur + _DERIVATIVE_REACH, MEMBRANE_KERNEL_SIZE // 2 + 1)


def scaled_gray(image, extremes: tuple[float, float] | None = None):
    """`image` (a numpy or dask array, `(H, W)` or `(H, W, C)`) as a lazy float32 gray image in [0, 1], scaled as
    :func:`alibi_dinov2.io.images.to_float01` scales the whole image (its extremes measured once, unless given)."""
    import dask.array as da

    image = da.asarray(image)
    extremes = image_extremes(image) if extremes is None else extremes
    values = image.map_blocks(to_float01, extremes=extremes, dtype=np.float32)
    if values.ndim == 3:
        values = values.rechunk({2: -1}).map_blocks(to_grayscale, drop_axis=2, dtype=np.float32)
    return values


def segment_in_blocks(
    segmenter, image, block_size: int = DEFAULT_BLOCK_SIZE, vit_tiling: VitTiling = VitTiling(),
    attention_memory_mb: float = 512.0,
):  # fmt: skip
    """The mask of a fitted :class:`~alibi_dinov2.segmentation.trainable.TrainableSegmenter` on `image` (numpy or
    dask, `(H, W[, C])`), as a lazy dask array `(H, W)` int32 computed block by block.

    With ViT features the image's reduced patch grid is computed now (see the module docstring; `vit_tiling` and
    `attention_memory_mb` bound it), the blocks when the result is computed.

    Raises:
        ValueError: a segmenter with the CRF (a whole-image step), or a block smaller than its halo.
    """
    import dask
    import dask.array as da
    from dask.array.overlap import ensure_minimum_chunksize

    segmenter._check_fitted()
    if segmenter.crf:
        raise ValueError("Block-wise segmentation takes no CRF (a whole-image step): segment the whole image with "
                         "predict(), or use a segmenter without crf")  # fmt: skip
    parts = segmenter.feature_extractor().parts
    halo = classical_halo(segmenter.sigmas) if any(isinstance(part, ClassicalFeatures) for part in parts) else 0
    if block_size < halo:
        raise ValueError(f"block_size {block_size} is smaller than the {halo}-pixel halo of these features")
    segmenter._check_channels(np.zeros((1, 1) + tuple(np.shape(image)[2:]), dtype=np.float32))
    image = da.asarray(image)
    extremes = image_extremes(image)
    gray = scaled_gray(image, extremes).rechunk((block_size, block_size))
    # Every block at least as large as the halo, so that dask keeps these blocks (their starts locate the ViT window).
    gray = gray.rechunk(tuple(ensure_minimum_chunksize(max(halo, 1), chunks) for chunks in gray.chunks))
    # Each part as the blocks need it: a classical extractor, or the patch size and reduced grid of a ViT part. The
    # segmenter and the grids go into the graph once each (for a cluster), not once per block.
    layout = [part if isinstance(part, ClassicalFeatures) else model_patch_size(part.model) for part in parts]
    reduced = [
        dask.delayed(_reduced_vit_grid(part, image, extremes, vit_tiling, attention_memory_mb), pure=True)
        for part in parts if isinstance(part, VitFeatures)
    ]  # fmt: skip
    starts = tuple(np.cumsum((0,) + chunks[:-1]) for chunks in gray.chunks)
    # `boundary="none"`: blocks at the image's edge get no halo there, and the filters' own mirror border applies,
    # as on the whole image.
    return gray.map_overlap(
        _segment_block, depth=halo, boundary="none", trim=True, allow_rechunk=False, dtype=np.int32,
        segmenter=dask.delayed(segmenter, pure=False), layout=layout, reduced=reduced, starts=starts, halo=halo,
        image_shape=gray.shape,
    )  # fmt: skip


def _reduced_vit_grid(part: VitFeatures, image, extremes, tiling: VitTiling, attention_memory_mb: float) -> np.ndarray:
    """The `(h, w, n_components)` PCA of the whole image's patch grid, as the whole-image ViT channels reduce it."""
    grid = large_image_patch_grid(
        part.model, image, tiling, max_side=part.max_side, image_processor=part.image_processor,
        attention_memory_mb=attention_memory_mb, extremes=extremes,
    )  # fmt: skip
    return pca_reduce_patches(grid, part.n_components)


def _segment_block(block, segmenter, layout, reduced, starts, halo, image_shape, block_info=None) -> np.ndarray:
    """The mask of one block with its halo: classical features of its pixels, ViT channels of its window."""
    block = np.asarray(block, dtype=np.float32)
    row, column = block_info[0]["chunk-location"]
    top = int(starts[0][row]) - (halo if row else 0)
    left = int(starts[1][column]) - (halo if column else 0)
    window = ((top, top + block.shape[0]), (left, left + block.shape[1]))
    grids = iter(reduced)
    stacks = [
        part.compute(block) if isinstance(part, ClassicalFeatures)
        else upsample_channels(next(grids), image_shape, part, window)
        for part in layout
    ]  # fmt: skip
    features = stacks[0] if len(stacks) == 1 else np.concatenate(stacks, axis=-1)
    return segmenter.predict_features(features)


@dataclass(frozen=True)
class BlockOptions:
    """How `alibi-segment apply` runs an image in blocks: their side, where they run (dask threads, or the
    `dask.distributed.Client` of :func:`scheduler_client`), and the ViT features' tiling."""

    block_size: int = DEFAULT_BLOCK_SIZE
    num_workers: Optional[int] = None
    client: Any = None
    vit_tiling: VitTiling = VitTiling()

    def segment(self, segmenter, image):
        """The lazy mask of `image` (:func:`segment_in_blocks`)."""
        return segment_in_blocks(segmenter, image, self.block_size, self.vit_tiling)

    def compute(self, collection):
        """Compute a dask collection on the client's cluster, or on `num_workers` dask threads (default: the CPUs)."""
        if self.client is not None:
            return collection.compute(scheduler=self.client)
        return collection.compute(scheduler="threads", num_workers=self.num_workers or available_cpus())


@contextmanager
def scheduler_client(address: str | None):
    """A `dask.distributed.Client` connected to the scheduler at `address` (`tcp://host:port`; its workers must see
    the input and output paths) for the block of the `with` statement; None when `address` is None (dask threads).

    Raises:
        InputError: `address` cannot be reached, or `distributed` is not installed.
    """
    if address is None:
        yield None
        return
    try:
        from distributed import Client
    except ImportError as error:
        raise InputError("--scheduler needs dask.distributed: pip install distributed") from error
    try:
        client = Client(address, timeout=f"{SCHEDULER_TIMEOUT_S}s", set_as_default=False)
    except (OSError, TimeoutError, ValueError, TypeError) as error:
        raise InputError(
            f"cannot reach the dask scheduler at {address} ({type(error).__name__}: {error}); start one "
            "(`dask scheduler`, then `dask worker ADDRESS`) or leave --scheduler out"
        ) from None
    with client:
        yield client
