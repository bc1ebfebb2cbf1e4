"""The feature-set extractors of trainable segmentation: channels, cache keys, composition, sharing."""

import copy
import re

import numpy as np
import pytest
import torch

from alibi_dinov2.features.cache import FeatureCache
from alibi_dinov2.features.classical import classical_features, feature_names
from alibi_dinov2.features.vit import vit_feature_channels
from alibi_dinov2.segmentation import extractors
from alibi_dinov2.segmentation.extractors import (
    FEATURE_SETS,
    ClassicalFeatures,
    ComposedFeatures,
    VitFeatures,
    build_extractor,
    model_fingerprint,
)
from conftest import tiny_alibi_model


@pytest.fixture(scope="module")
def model():
    return tiny_alibi_model("alibi_dinov2")


@pytest.fixture(scope="module")
def image():
    return np.random.default_rng(0).random((40, 44)).astype(np.float32)


def test_the_composed_stack_is_the_parts_side_by_side_in_channel_order(model, image):
    extractor = build_extractor("classical+vit", model=model, sigmas=(0, 1), n_components=3)
    stack = extractor(image)
    expected = np.concatenate(
        [classical_features(image, sigmas=(0, 1)), vit_feature_channels(model, image, n_components=3)], axis=-1
    )
    np.testing.assert_allclose(stack, expected, rtol=1e-5, atol=1e-6)
    assert extractor.channel_names == feature_names((0, 1)) + ["vit_pca1", "vit_pca2", "vit_pca3"]
    assert stack.shape == (40, 44, len(extractor.channel_names)) and stack.dtype == np.float32
    assert [type(part) for part in extractor.parts] == [ClassicalFeatures, VitFeatures]
    assert extractor.cache_key == "+".join(part.cache_key for part in extractor.parts)


def test_compositions_flatten_into_their_parts(model):
    classical, vit = ClassicalFeatures((0, 1)), VitFeatures(model, 2)
    nested = ComposedFeatures([ComposedFeatures([classical, vit]), classical])
    assert nested.parts == (classical, vit, classical)
    assert nested.channel_names == classical.channel_names + vit.channel_names + classical.channel_names
    with pytest.raises(ValueError, match="at least one"):
        ComposedFeatures([])


def test_the_cache_key_changes_with_every_setting_the_stack_depends_on(model):
    other_statistics = {"image_mean": [0.5] * 3, "image_std": [0.25] * 3}
    keys = [
        ClassicalFeatures().cache_key,
        ClassicalFeatures((0, 1)).cache_key,
        ClassicalFeatures(backend="numpy").cache_key,
        VitFeatures(model).cache_key,
        VitFeatures(model, n_components=4).cache_key,
        VitFeatures(model, max_side=224).cache_key,
        VitFeatures(model, image_processor=other_statistics).cache_key,
        VitFeatures(tiny_alibi_model("alibi_dinov2", seed=1)).cache_key,
    ]
    assert len(set(keys)) == len(keys)
    assert VitFeatures(copy.deepcopy(model)).cache_key == VitFeatures(model).cache_key


def test_the_model_fingerprint_follows_the_weights(model):
    same = copy.deepcopy(model)
    assert model_fingerprint(same) == model_fingerprint(model)
    with torch.no_grad():
        same.embeddings.patch_embeddings.projection.weight.add_(1.0)
    assert model_fingerprint(same) != model_fingerprint(model)


def test_a_part_shared_by_two_compositions_is_computed_once(model, image, monkeypatch):
    calls = []
    original = extractors.classical_features
    monkeypatch.setattr(extractors, "classical_features", lambda *a, **k: calls.append(1) or original(*a, **k))
    cache = FeatureCache()
    classical = build_extractor("classical", sigmas=(0, 1))
    both = build_extractor("classical+vit", model=model, sigmas=(0, 1), n_components=2)
    alone = classical(image, cache=cache)
    together = both(image, cache=cache)
    assert len(calls) == 1 and len(cache) == 2
    np.testing.assert_array_equal(together[..., : alone.shape[-1]], alone)
    assert not alone.flags.writeable  # the cached array is shared, so read-only
    assert both.cache_keys(image) != both.cache_keys(image + 1)


def test_unknown_sets_and_missing_models_are_named():
    with pytest.raises(
        ValueError,
        match=re.escape(f"Unknown feature set 'vit+classical'; allowed values: {', '.join(FEATURE_SETS)}"),
    ):
        build_extractor("vit+classical")
    with pytest.raises(ValueError, match="need a model"):
        build_extractor("classical+vit")
    with pytest.raises(ValueError):
        ClassicalFeatures(sigmas=())
