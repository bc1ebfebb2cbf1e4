"""Feature maps (PCA-RGB, k-means, similarity) and probe plots."""

import io

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from transformers import Dinov2Config, Dinov2Model

from alibi_dinov2.features.visualisation import (
    compare_models,
    cosine_similarity_map,
    kmeans_map,
    labels_to_rgb,
    pca_components,
    pca_rgb,
    plot_channel_r2,
    plot_layer_fingerprint,
    side_by_side,
)
from evaluation.positional_probe import make_ramp


def planted_features(h=12, w=16, c=10, seed=0):
    """Noise plus one strong direction that follows the lr ramp."""
    rng = np.random.default_rng(seed)
    direction = rng.normal(size=c)
    direction /= np.linalg.norm(direction)
    return 0.05 * rng.normal(size=(h, w, c)) + 5 * make_ramp("lr", h, w)[..., None] * direction


def test_pca_rgb_shape_range_and_first_component():
    features = planted_features()
    rgb = pca_rgb(features)
    assert rgb.shape == (12, 16, 3)
    assert rgb.min() == 0.0 and rgb.max() == 1.0
    np.testing.assert_allclose(rgb.min(axis=(0, 1)), 0.0)
    np.testing.assert_allclose(rgb.max(axis=(0, 1)), 1.0)
    first = pca_components(features, n_components=1)[..., 0]
    assert abs(np.corrcoef(first.ravel(), make_ramp("lr", 12, 16).ravel())[0, 1]) > 0.99
    # Signs are fixed by the loadings, not by the SVD's arbitrary choice: negated features project
    # onto the same axes, so their projections are exactly negated.
    np.testing.assert_allclose(pca_components(-features), -pca_components(features), atol=1e-10)
    assert pca_rgb(features, standardised=True).shape == (12, 16, 3)


def test_pca_components_are_orthogonal_projections():
    features = np.random.default_rng(1).normal(size=(8, 9, 6))
    projected = pca_components(features, n_components=3).reshape(-1, 3)
    gram = projected.T @ projected
    np.testing.assert_allclose(gram - np.diag(np.diag(gram)), 0.0, atol=1e-8)
    assert np.all(np.diff(np.diag(gram)) <= 1e-9)  # decreasing variance
    with pytest.raises(ValueError, match="n_components"):
        pca_components(features[:1, :1], n_components=3)


def test_kmeans_recovers_two_planted_regions():
    rng = np.random.default_rng(2)
    features = rng.normal(size=(10, 12, 8)) * 0.1
    features[:, 6:] += 3.0
    labels = kmeans_map(features, n_clusters=2)
    assert labels.shape == (10, 12) and set(np.unique(labels)) == {0, 1}
    assert len(np.unique(labels[:, :6])) == 1 and len(np.unique(labels[:, 6:])) == 1
    assert labels[0, 0] != labels[0, 11]
    assert labels_to_rgb(labels).shape == (10, 12, 3)


def test_cosine_similarity_map():
    features = np.zeros((3, 4, 2))
    features[..., 0] = 1.0
    features[1, 2] = [0.0, 2.0]  # orthogonal patch
    features[2, 3] = [-3.0, 0.0]  # opposite patch
    similarity = cosine_similarity_map(features, query=(0, 0))
    assert similarity.shape == (3, 4) and similarity[0, 0] == pytest.approx(1.0)
    assert similarity[1, 2] == pytest.approx(0.0) and similarity[2, 3] == pytest.approx(-1.0)
    assert similarity[1, 1] == pytest.approx(1.0)
    with pytest.raises(IndexError):
        cosine_similarity_map(features, query=(3, 0))


def test_channel_r2_plot():
    scores = np.linspace(-0.2, 0.3, 20)
    scores[7] = 0.9
    figure = plot_channel_r2(scores, top_k=1)
    assert isinstance(figure, Figure)
    axes = figure.axes[0]
    assert len(axes.patches) == 20
    assert [text.get_text() for text in axes.texts] == ["7"]
    lines = plot_channel_r2({"dinov2": scores, "alibi": -scores}, kind="line", top_k=0)
    assert len(lines.axes[0].lines) == 2 and lines.axes[0].get_legend() is not None
    with pytest.raises(ValueError):
        plot_channel_r2(scores, kind="pie")


def test_layer_fingerprint_heat_map_uses_a_fixed_scale():
    fingerprint = np.random.default_rng(3).random((16, 5))
    figure = plot_layer_fingerprint({"a": fingerprint, "b": fingerprint / 2})
    images = [axis.images[0] for axis in figure.axes if axis.images]
    assert len(images) == 2
    assert images[0].get_clim() == (0.0, 0.5)
    np.testing.assert_array_equal(images[0].get_array(), fingerprint)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    assert buffer.getvalue()[:8] == b"\x89PNG\r\n\x1a\n"


def test_side_by_side_layout():
    images = [np.zeros((20, 30)), np.ones((20, 30, 3))]
    maps = {"m1": [np.zeros((2, 3, 3)), np.zeros((2, 3, 3))], "m2": [np.zeros((2, 3), int), np.ones((2, 3))]}
    figure = side_by_side(images, maps, image_titles=["a", "b"])
    assert len(figure.axes) == 2 * 3
    assert figure.axes[1].get_title() == "m1"
    with pytest.raises(ValueError, match="maps for"):
        side_by_side(images, {"m1": maps["m1"][:1]})


def test_compare_models_on_images():
    torch.manual_seed(0)
    tiny = dict(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, patch_size=14, image_size=56
    )
    model = Dinov2Model(Dinov2Config(**tiny)).eval()
    images = [np.random.default_rng(4).random((56, 70)).astype(np.float32)] * 2
    figure = compare_models({"tiny": model}, images, kind="kmeans")
    assert len(figure.axes) == 4
    shown = figure.axes[1].images[0].get_array()
    assert shown.shape[:2] == (4, 5)
