"""Block-wise segmentation with ViT features: the whole image's patch grid (one streamed pass, or overlapping tiles
beyond a token budget), upsampled block by block."""

import dask.array as da
import numpy as np
import pytest
import torch

from alibi_dinov2.conversion.convert import convert
from alibi_dinov2.conversion.families import family_of
from alibi_dinov2.features.extraction import extract_patch_features
from alibi_dinov2.features.large_images import VitTiling, large_image_patch_grid
from alibi_dinov2.features.vit import _tile_starts, upsample_channels, vit_feature_channels_from_patches
from alibi_dinov2.segmentation.blocks import segment_in_blocks
from alibi_dinov2.segmentation.trainable import TrainableSegmenter
from alibi_dinov2.synthetic.microstructures import generate_microstructure_dataset
from alibi_dinov2.synthetic.teachers import STUDENT_ALIBI_OPTIONS, build_synthetic_teacher, student_alibi_slope
from conftest import tiny_alibi_model
from evaluation.scribble_benchmark import simulate_scribble_rounds


SIGMAS = (0.0, 1.0, 2.0, 4.0)


@pytest.fixture(scope="module")
def micrograph():
    """A 12-bit two-phase micrograph in uint16 (300 x 340), its truth and its scribbles."""
    ((image, truth),) = generate_microstructure_dataset(1, size=(300, 340), n_phases=2, seed=7)
    image = np.round(image * 4095).astype(np.uint16)
    return image, truth, simulate_scribble_rounds([truth], n_rounds=3, seed=0)[-1][0]


@pytest.mark.parametrize("model_type", ["alibi_dinov2", "alibi_dinov3"])
def test_one_pass_of_a_lazy_image_gives_the_whole_images_features(micrograph, model_type):
    image, _, _ = micrograph
    model = tiny_alibi_model(model_type)
    expected = extract_patch_features(model, image)
    lazy = da.from_array(image, chunks=64)
    np.testing.assert_allclose(large_image_patch_grid(model, lazy), expected, atol=1e-4, rtol=0)
    # A tile as large as the image is the image: the tiled route is exact there.
    one_tile = VitTiling(max_tokens=1, tile_patches=32, overlap_patches=4)
    np.testing.assert_allclose(large_image_patch_grid(model, lazy, one_tile), expected, atol=1e-4, rtol=0)
    # Smaller tiles are a different computation (each tile attends only to itself).
    tiles = VitTiling(max_tokens=1, tile_patches=10, overlap_patches=3)
    assert np.abs(large_image_patch_grid(model, lazy, tiles) - expected).max() > 1e-3


def test_a_segmenter_trained_on_tiles_gets_the_same_tiles(micrograph):
    from alibi_dinov2.features.vit import extract_patch_features_tiled
    from alibi_dinov2.io.images import to_rgb01

    image, _, _ = micrograph
    model = tiny_alibi_model()
    expected = extract_patch_features_tiled(model, to_rgb01(image), max_side=140)  # the whole-image route's tiles
    tiled = large_image_patch_grid(model, da.from_array(image, chunks=64), max_side=140)
    np.testing.assert_allclose(tiled, expected, atol=1e-4, rtol=0)
    assert np.abs(tiled - extract_patch_features(model, image)).max() > 1e-3


def test_a_window_of_the_upsampled_channels_is_cut_from_the_whole():
    rng = np.random.default_rng(0)
    patches = rng.normal(size=(7, 9, 16)).astype(np.float32)
    whole = vit_feature_channels_from_patches(patches, (103, 131), 4, patch_size=14)  # 5 px beyond the grid
    from alibi_dinov2.features.vit import pca_reduce_patches

    reduced = pca_reduce_patches(patches, 4)
    for window in (((0, 40), (0, 50)), ((37, 103), (60, 131)), ((98, 103), (126, 131))):
        (top, bottom), (left, right) = window
        block = upsample_channels(reduced, (103, 131), 14, window)
        np.testing.assert_allclose(block, whole[top:bottom, left:right], atol=1e-6, rtol=0)


@pytest.mark.parametrize("features", ["classical+vit", "vit"])
def test_block_wise_vit_segmentation_equals_the_whole_image(micrograph, features):
    image, truth, scribbles = micrograph
    segmenter = TrainableSegmenter(
        features=features, model=tiny_alibi_model(), n_components=3, sigmas=SIGMAS, feature_backend="numpy"
    ).fit(image, scribbles)
    whole = segmenter.predict(image)
    mask = segment_in_blocks(segmenter, da.from_array(image, chunks=100), block_size=64).compute(
        scheduler="threads", num_workers=2
    )
    # The patch features agree to 1e-6 (streamed against dense attention), so at most one pixel in 10,000 may
    # change class; in practice none does.
    assert (mask != whole).mean() <= 1e-4
    if features == "classical+vit":  # a tiny random ViT alone segments poorly; the equality is what counts
        assert (mask == truth).mean() > 0.85


def _teacher_and_students(folder):
    """The synthetic DINOv2 teacher (a learned position embedding holding ramps), and the teacher with that
    embedding replaced by the ALiBi bias its attention imitates, wrapped and unwrapped."""
    build_synthetic_teacher(folder, seed=0).save_pretrained(folder)
    learned = convert(str(folder), variant="keep-pe").eval()
    students = []
    for wrap in (True, False):
        student = convert(str(folder), variant="alibi", **{**STUDENT_ALIBI_OPTIONS["dinov2"], "alibi_wrap": wrap})
        with torch.no_grad():
            student.get_parameter(family_of(student.config).slopes_key).fill_(student_alibi_slope("dinov2", 8))
        students.append(student.eval())
    return learned, *students


def test_tile_seams_of_wrapped_alibi_are_smaller_than_of_a_learned_position_embedding(tmp_path):
    learned, wrapped, unwrapped = _teacher_and_students(tmp_path / "teacher")
    # A homogeneous lattice, one motif per 14 px patch: every patch looks alike, so any jump between neighbouring
    # patches of the tiled grid comes from where the patches sit in their tiles.
    rows, columns = np.mgrid[0:392, 0:392]
    image = (0.5 + 0.25 * np.cos(2 * np.pi * columns / 14) * np.cos(2 * np.pi * rows / 7)).astype(np.float32)
    tiling = VitTiling(max_tokens=1, tile_patches=12, overlap_patches=4)  # 28 x 28 patches: 3 x 3 tiles
    seams = np.zeros(27, bool)  # the boundaries between neighbouring patches inside the tiles' overlaps
    for start in _tile_starts(28, 12, 8)[1:]:
        seams[start : start + 3] = True

    def seam_jump(model) -> float:
        grid = large_image_patch_grid(model, image, tiling)
        jumps = np.concatenate([np.linalg.norm(grid[:, 1:] - grid[:, :-1], axis=-1).mean(0),
                                np.linalg.norm(grid[1:] - grid[:-1], axis=-1).mean(1)])  # fmt: skip
        return jumps[np.concatenate([seams, seams])].mean() / np.linalg.norm(grid, axis=-1).mean()

    # Wrapped ALiBi sees every tile as a torus: all its patches alike, no seam. The learned embedding restarts its
    # ramps in every tile; unwrapped ALiBi treats each tile's border patches apart.
    assert seam_jump(wrapped) < 1e-5
    assert seam_jump(learned) > 1e-2 and seam_jump(unwrapped) > 1e-3
