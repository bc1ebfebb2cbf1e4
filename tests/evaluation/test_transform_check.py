"""Equivariance checks: exact for per-patch feature functions and wrapped ALiBi rolls, not for positions."""

import numpy as np
import pytest
import torch
from transformers import Dinov2Config, Dinov2Model

from evaluation.positional_probe import make_ramp
from evaluation.transform_check import (
    TRANSFORMS,
    apply_transform,
    equivariance_error,
    feature_error,
    transform_check,
    transform_errors,
)


PATCH = 4


def patch_statistics(image):
    """Per-patch mean, std, min and max: unchanged by moving whole patches or flipping inside them."""
    h, w = image.shape[0] // PATCH, image.shape[1] // PATCH
    patches = image[: h * PATCH, : w * PATCH].reshape(h, PATCH, w, PATCH).transpose(0, 2, 1, 3).reshape(h, w, -1)
    return np.stack([patches.mean(-1), patches.std(-1), patches.min(-1), patches.max(-1)], axis=-1)


def with_position(image):
    """The same features plus lr and ud ramps: a positional feature function."""
    features = patch_statistics(image)
    h, w = features.shape[:2]
    return np.concatenate([features, make_ramp("lr+ud", h, w)], axis=-1)


@pytest.fixture(scope="module")
def pictures():
    rng = np.random.default_rng(0)
    return [rng.random((26, 34)), rng.random((24, 24))]  # cropped to 24 x 32 and 24 x 24


def test_apply_transform_on_feature_grids():
    grid = np.arange(24).reshape(4, 6, 1)
    assert apply_transform(grid, "flip_lr")[0, 0, 0] == 5
    assert apply_transform(grid, "flip_ud")[0, 0, 0] == 18
    assert apply_transform(grid, "rot90").shape == (6, 4, 1)
    assert apply_transform(grid, "rot90")[0, 0, 0] == 5  # counter-clockwise: top-right goes top-left
    rolled = apply_transform(grid, "roll")  # half the grid: (2, 3)
    assert rolled[2, 3, 0] == 0
    assert apply_transform(grid, "roll", shift=(1, 0))[1, 0, 0] == 0
    image = np.arange(8 * 12).reshape(8, 12)
    assert apply_transform(image, "roll", cell=4)[4, 4] == 0  # half of a 2 x 3 patch grid: (1, 1) patches
    with pytest.raises(ValueError, match="Unknown transform"):
        apply_transform(grid, "shear")


def test_feature_error_metrics():
    grid = np.random.default_rng(1).normal(size=(3, 4, 5))
    assert feature_error(grid, grid) == 0.0 and abs(feature_error(grid, grid, "cosine")) < 1e-12
    assert feature_error(2 * grid, grid) == pytest.approx(1.0)
    assert feature_error(2 * grid, grid, "cosine") == pytest.approx(0.0, abs=1e-12)  # same directions
    assert feature_error(-grid, grid, "cosine") == pytest.approx(2.0)


@pytest.mark.parametrize("metric", ["relative_l2", "cosine"])
def test_per_patch_function_is_exactly_equivariant(pictures, metric):
    errors = transform_errors(patch_statistics, pictures, PATCH, metric=metric)
    assert set(errors) == set(TRANSFORMS)
    assert max(errors.values()) < 1e-12


def test_positional_function_is_not_equivariant(pictures):
    errors = transform_errors(with_position, pictures, PATCH)
    assert min(errors.values()) > 0.05
    assert equivariance_error(with_position, pictures[0], "roll", PATCH, shift=(0, 0)) < 1e-12  # identity


def test_wrapped_alibi_model_is_roll_equivariant_unlike_learned_positions():
    configuration = pytest.importorskip("configuration_alibi_dinov2")
    modeling = pytest.importorskip("modeling_alibi_dinov2")
    tiny = dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, patch_size=14, image_size=56
    )
    torch.manual_seed(0)
    alibi = modeling.AlibiDinov2Model(configuration.AlibiDinov2Config(**tiny, num_register_tokens=4)).eval()
    learned = Dinov2Model(Dinov2Config(**tiny)).eval()
    with torch.no_grad():  # make the learned position embedding matter, as in a trained model
        learned.embeddings.position_embeddings.normal_(std=1.0)
    images = [np.random.default_rng(2).random((56, 70)).astype(np.float32)]
    errors = transform_check({"alibi": alibi, "learned": learned}, images, transforms=("roll",))
    assert errors["alibi"]["roll"] < 1e-5
    assert errors["learned"]["roll"] > 1e-2


def test_a_position_free_patch_embedding_follows_rolls_but_not_flips_or_turns(pictures):
    """What the report's transformation table expects: with no position anywhere, a linear map of each patch's
    pixels in their order (as a ViT's patch embedding) moves exactly with whole-patch rolls, but a flip or a turn
    also reorders the pixels inside every patch, so the features of the flipped image are not the flipped features."""
    projection = np.random.default_rng(1).normal(size=(PATCH * PATCH, 8))

    def patch_embedding(image):
        h, w = image.shape[0] // PATCH, image.shape[1] // PATCH
        patches = image[: h * PATCH, : w * PATCH].reshape(h, PATCH, w, PATCH).transpose(0, 2, 1, 3)
        return patches.reshape(h, w, -1) @ projection

    square = [picture[:24, :24] for picture in pictures]  # rot90 keeps a square grid's shape
    errors = transform_errors(patch_embedding, square, PATCH)
    assert errors["roll"] < 1e-12
    assert min(errors["flip_lr"], errors["flip_ud"], errors["rot90"]) > 0.5
