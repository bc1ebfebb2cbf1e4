"""Classical-feature segmentation of images of any size with bounded memory: the image is cut into square blocks,
each block is extended by a halo wide enough for every filter of the feature stack, featurised, classified and
trimmed back, so that the mask equals the whole-image one (the features agree to float32 rounding) while only one
block's feature stack (58 float32 channels of `(block + 2 halo)^2` pixels) exists per worker.

Blocks run through dask (`dask.array.map_overlap`): threads by default, or any scheduler dask takes (a
`dask.distributed.Client` for a cluster). Intensity scaling is the project's rule applied to the whole image (its
bit depth or range is measured once), not block by block.

    mask = segment_in_blocks(segmenter, image, block_size=2048).compute()
"""

from __future__ import annotations

import numpy as np

from alibi_dinov2.features.classical import GAUSSIAN_TRUNCATE, MEMBRANE_KERNEL_SIZE
from alibi_dinov2.io.images import to_float01, to_grayscale


DEFAULT_BLOCK_SIZE = 2048
# Derivatives on a blur reach one more pixel each way (Sobel, second differences); one more for safety.
_DERIVATIVE_REACH = 2


def classical_halo(sigmas) -> int:
    """Pixels a block must borrow from its neighbours for its classical features to equal the whole image's: the
    widest Gaussian radius (scipy's `int(4 sigma + 0.5)`) plus the derivatives' reach, or the membrane kernel's."""
    blur = max(int(GAUSSIAN_TRUNCATE * float(sigma) + 0.5) for sigma in sigmas)
    return max(blur + _DERIVATIVE_REACH, MEMBRANE_KERNEL_SIZE // 2 + 1)


def scaled_gray(image):
    """`image` (a numpy or dask array, `(H, W)` or `(H, W, C)`) as a lazy float32 gray image in [0, 1], scaled as
    :func:`alibi_dinov2.io.images.to_float01` scales the whole image (its extremes measured once)."""
    import dask.array as da

    image = da.asarray(image)
    extremes = tuple(float(value) for value in da.compute(image.min(), image.max()))
    values = image.map_blocks(to_float01, extremes=extremes, dtype=np.float32)
    if values.ndim == 3:
        values = values.rechunk({2: -1}).map_blocks(to_grayscale, drop_axis=2, dtype=np.float32)
    return values


def segment_in_blocks(segmenter, image, block_size: int = DEFAULT_BLOCK_SIZE):
    """The mask of a fitted classical-feature :class:`~alibi_dinov2.segmentation.trainable.TrainableSegmenter`
    on `image`, as a lazy dask array `(H, W)` int32 computed block by block.

    Raises:
        ValueError: a segmenter with ViT features or the CRF (whole-image steps), or a block smaller than its halo.
    """
    segmenter._check_fitted()
    if segmenter.features != "classical" or segmenter.crf:
        raise ValueError(
            f"Block-wise segmentation takes classical features without CRF; this segmenter uses "
            f"features={segmenter.features!r}, crf={segmenter.crf}: segment the whole image with predict()"
        )
    halo = classical_halo(segmenter.sigmas)
    if block_size < halo:
        raise ValueError(f"block_size {block_size} is smaller than the {halo}-pixel halo of these features")
    segmenter._check_channels(np.zeros((1, 1) + tuple(np.shape(image)[2:]), dtype=np.float32))
    gray = scaled_gray(image).rechunk((block_size, block_size))
    extractor = segmenter.feature_extractor()
    # `boundary="none"`: blocks at the image's edge get no halo there, and the filters' own mirror border applies,
    # as on the whole image.
    return gray.map_overlap(
        _segment_block, depth=halo, boundary="none", trim=True, dtype=np.int32, segmenter=segmenter,
        extractor=extractor,
    )  # fmt: skip


def _segment_block(block: np.ndarray, segmenter, extractor) -> np.ndarray:
    features = extractor.compute(np.asarray(block, dtype=np.float32))
    return segmenter.predict_features(features)
