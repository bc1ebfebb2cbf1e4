"""Block-wise classical segmentation: halos wide enough that blocks equal the whole image, through dask."""

import numpy as np
import pytest

from alibi_dinov2.features.classical import classical_features, prepare_image
from alibi_dinov2.segmentation.blocks import classical_halo, scaled_gray, segment_in_blocks
from alibi_dinov2.segmentation.trainable import TrainableSegmenter
from alibi_dinov2.synthetic.microstructures import generate_microstructure_dataset
from evaluation.scribble_benchmark import simulate_scribble_rounds


SIGMAS = (0.0, 1.0, 2.0, 4.0)  # a halo of 18 px keeps the test images small


@pytest.fixture(scope="module")
def micrograph():
    """A 12-bit two-phase micrograph in uint16 (300 x 340), its truth and a segmenter trained on its scribbles."""
    ((image, truth),) = generate_microstructure_dataset(1, size=(300, 340), n_phases=2, seed=7)
    image = np.round(image * 4095).astype(np.uint16)
    scribbles = simulate_scribble_rounds([truth], n_rounds=3, seed=0)[-1][0]
    segmenter = TrainableSegmenter(sigmas=SIGMAS, feature_backend="numpy").fit(image, scribbles)
    return image, truth, segmenter


def test_a_block_with_its_halo_has_the_whole_images_features(micrograph):
    image, _, _ = micrograph
    halo = classical_halo(SIGMAS)
    assert halo == 18  # int(4 * 4 + 0.5) + 2
    whole = classical_features(image, sigmas=SIGMAS, backend="numpy")
    gray = prepare_image(image)
    for top, left, size in ((0, 0, 64), (100, 120, 64), (236, 276, 64), (40, 200, 50)):  # corners, inside, edges
        rows = slice(max(0, top - halo), min(gray.shape[0], top + size + halo))
        cols = slice(max(0, left - halo), min(gray.shape[1], left + size + halo))
        block = classical_features(gray[rows, cols], sigmas=SIGMAS, backend="numpy")
        inner = block[top - rows.start : top - rows.start + size, left - cols.start : left - cols.start + size]
        np.testing.assert_allclose(inner, whole[top : top + size, left : left + size], atol=1e-5, rtol=0)
    # A halo of the membrane kernel's reach only is not enough: the widest blur reaches past it.
    short = 8
    rows, cols = slice(100 - short, 164 + short), slice(120 - short, 184 + short)
    block = classical_features(gray[rows, cols], sigmas=SIGMAS, backend="numpy")
    assert np.abs(block[short : short + 64, short : short + 64] - whole[100:164, 120:184]).max() > 1e-3


@pytest.mark.parametrize("block_size", [64, 97])
def test_the_block_wise_mask_equals_the_whole_image_mask(micrograph, block_size):
    image, truth, segmenter = micrograph
    lazy = segment_in_blocks(segmenter, image, block_size=block_size)
    assert lazy.shape == image.shape and lazy.chunks[0][0] == block_size
    mask = lazy.compute(scheduler="threads", num_workers=2)
    np.testing.assert_array_equal(mask, segmenter.predict(image))
    assert (mask == truth).mean() > 0.9


def test_scaling_is_the_whole_images(micrograph):
    image, _, _ = micrograph
    np.testing.assert_array_equal(scaled_gray(image).rechunk(50).compute(), prepare_image(image))
    floats = image.astype(np.float64) * 3.0 - 7.0  # not in [0, 1]: min-max over the whole image
    np.testing.assert_allclose(scaled_gray(floats).rechunk(50).compute(), prepare_image(floats), atol=1e-6)
    rgb = np.stack([image, image // 2, image // 3], axis=-1)
    np.testing.assert_allclose(scaled_gray(rgb).rechunk((50, 50, 1)).compute(), prepare_image(rgb), atol=1e-6)


def test_whole_image_steps_and_tiny_blocks_are_refused(micrograph):
    image, _, segmenter = micrograph
    with pytest.raises(ValueError, match="smaller than the 18-pixel halo"):
        segment_in_blocks(segmenter, image, block_size=10)
    crf = TrainableSegmenter(sigmas=SIGMAS, crf=False)
    crf.__dict__.update(segmenter.__dict__)
    crf.crf = True
    with pytest.raises(ValueError, match="Block-wise segmentation takes no CRF"):
        segment_in_blocks(crf, image)
