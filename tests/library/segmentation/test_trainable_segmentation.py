"""TrainableSegmenter: learning from scribbles, persistence, ViT channels and error messages."""

import importlib.util

import numpy as np
import pytest
from sklearn.base import BaseEstimator, clone
from sklearn.exceptions import NotFittedError

from alibi_dinov2.features.classical import n_features
from alibi_dinov2.features.vit import (
    extract_patch_features_tiled,
    pca_reduce_patches,
    vit_feature_channels_from_patches,
)
from alibi_dinov2.segmentation.trainable import TrainableSegmenter
from alibi_dinov2.synthetic.microstructures import generate_microstructure, generate_microstructure_dataset
from evaluation.metrics import segmentation_scores
from evaluation.scribble_benchmark import simulate_scribble_rounds


HAS_CRF = importlib.util.find_spec("pydensecrf") is not None


def mean_iou(prediction, truth, n_classes):
    """mIoU of the scribble tools' masks: 0 = unlabelled, classes 1..n_classes."""
    return segmentation_scores(prediction, truth, n_classes, ignore_index=0, first_class=1)["miou"]


@pytest.fixture(scope="module")
def two_phase():
    """Train and test micrographs of one two-phase material, plus 3 rounds of scribbles on the train image."""
    (train_image, train_truth), (test_image, test_truth) = generate_microstructure_dataset(
        2, size=(96, 96), n_phases=2, seed=3
    )
    scribbles = simulate_scribble_rounds([train_truth], n_rounds=3, seed=0)[-1][0]
    return train_image, train_truth, scribbles, test_image, test_truth


@pytest.fixture(scope="module")
def fitted(two_phase):
    train_image, _, scribbles, _, _ = two_phase
    return TrainableSegmenter(classifier_params={"n_estimators": 30}, n_jobs=2).fit(train_image, scribbles)


@pytest.fixture(scope="module")
def tiny_vit():
    transformers = pytest.importorskip("transformers")
    import torch

    torch.manual_seed(0)
    config = transformers.Dinov2WithRegistersConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, patch_size=14, image_size=56, num_register_tokens=4
    )
    return transformers.Dinov2WithRegistersModel(config).eval()


def test_learns_a_two_phase_microstructure_from_scribbles(two_phase, fitted):
    _, _, scribbles, test_image, test_truth = two_phase
    assert 0 < np.count_nonzero(scribbles) < 0.1 * scribbles.size  # sparse labels only
    prediction = fitted.predict(test_image)
    assert prediction.shape == test_truth.shape and prediction.dtype == np.int32
    assert set(np.unique(prediction)) <= {1, 2}
    assert mean_iou(prediction, test_truth, n_classes=2) >= 0.9


def test_random_forest_also_learns_the_microstructure(two_phase):
    train_image, _, scribbles, test_image, test_truth = two_phase
    segmenter = TrainableSegmenter(classifier="random_forest", classifier_params={"n_estimators": 30}, n_jobs=2)
    segmenter.fit([train_image], [scribbles])
    assert segmenter.classifier_.class_weight == "balanced"
    assert mean_iou(segmenter.predict(test_image), test_truth, n_classes=2) >= 0.9


def test_xgboost_uses_depth_8(fitted):
    assert fitted.classifier_.get_params()["max_depth"] == 8


def test_probabilities_and_list_inputs(two_phase, fitted):
    train_image, _, _, test_image, _ = two_phase
    probabilities = fitted.predict_proba(test_image)
    assert probabilities.shape == (96, 96, 2)
    np.testing.assert_allclose(probabilities.sum(-1), 1.0, atol=1e-5)
    masks = fitted.predict([train_image, test_image[:50, :70]])
    assert isinstance(masks, list) and masks[1].shape == (50, 70)
    np.testing.assert_array_equal(masks[0], fitted.predict(train_image))
    np.testing.assert_array_equal(
        fitted.classes_[np.argmax(probabilities, -1)], fitted.predict(test_image)
    )


def test_non_contiguous_class_values_are_kept(two_phase):
    train_image, _, scribbles, test_image, _ = two_phase
    relabelled = np.where(scribbles == 2, 7, scribbles)
    segmenter = TrainableSegmenter(classifier_params={"n_estimators": 10}).fit(train_image, relabelled)
    np.testing.assert_array_equal(segmenter.classes_, [1, 7])
    assert set(np.unique(segmenter.predict(test_image))) <= {1, 7}


@pytest.mark.parametrize("classifier", ["xgboost", "random_forest"])
def test_save_load_round_trip_predicts_the_same_mask(tmp_path, two_phase, classifier):
    train_image, _, scribbles, test_image, _ = two_phase
    segmenter = TrainableSegmenter(classifier=classifier, classifier_params={"n_estimators": 10})
    segmenter.fit(train_image, scribbles)
    path = tmp_path / "segmenter.zip"
    segmenter.save(path)
    loaded = TrainableSegmenter.load(path)
    assert loaded.get_params()["classifier"] == classifier
    np.testing.assert_array_equal(loaded.predict(test_image), segmenter.predict(test_image))
    np.testing.assert_allclose(loaded.predict_proba(test_image), segmenter.predict_proba(test_image), atol=1e-6)


def test_constructor_only_stores_parameters_and_clones():
    segmenter = TrainableSegmenter(features="nonsense", classifier="svm")  # checked at fit time
    assert segmenter.get_params()["features"] == "nonsense"
    segmenter.set_params(features="classical", classifier="random_forest")
    copy = clone(segmenter)
    assert copy.get_params()["classifier"] == "random_forest"
    assert not hasattr(copy, "classifier_")
    assert clone(segmenter).get_params() == segmenter.get_params()
    # Nothing of BaseEstimator's is overridden but the representation (which keeps the torch model out).
    assert set(vars(TrainableSegmenter)) & set(dir(BaseEstimator)) <= {"__init__", "__doc__", "__module__", "__repr__"}


def test_error_messages(two_phase):
    image, _, scribbles, _, _ = two_phase
    with pytest.raises(ValueError, match="classical, vit, classical\\+vit"):
        TrainableSegmenter(features="sift").fit(image, scribbles)
    with pytest.raises(ValueError, match="xgboost, random_forest"):
        TrainableSegmenter(classifier="svm").fit(image, scribbles)
    with pytest.raises(ValueError, match="shape"):
        TrainableSegmenter().fit(image, scribbles[:-1])
    with pytest.raises(ValueError, match="No labelled pixels"):
        TrainableSegmenter().fit(image, np.zeros_like(scribbles))
    with pytest.raises(ValueError, match="one class"):
        TrainableSegmenter().fit(image, (scribbles > 0).astype(int))
    with pytest.raises(ValueError, match="2 image"):
        TrainableSegmenter().fit([image, image], [scribbles])
    with pytest.raises(ValueError, match="model"):
        TrainableSegmenter(features="classical+vit").fit(image, scribbles)
    with pytest.raises(NotFittedError, match="not fitted"):
        TrainableSegmenter().predict(image)


@pytest.mark.skipif(HAS_CRF, reason="pydensecrf is installed")
def test_crf_without_pydensecrf_says_how_to_install(two_phase):
    image, _, scribbles, _, _ = two_phase
    with pytest.raises(ImportError, match="pip install"):
        TrainableSegmenter(crf=True).fit(image, scribbles)


@pytest.mark.skipif(not HAS_CRF, reason="pydensecrf is not installed")
def test_crf_keeps_a_clean_segmentation(two_phase):
    train_image, _, scribbles, test_image, test_truth = two_phase
    segmenter = TrainableSegmenter(crf=True, classifier_params={"n_estimators": 10}).fit(train_image, scribbles)
    assert mean_iou(segmenter.predict(test_image), test_truth, n_classes=2) >= 0.85


# ---------------------------------------------------------------- ViT channels
def test_pca_channels_are_scaled_ordered_and_padded():
    rng = np.random.default_rng(0)
    grid = rng.normal(size=(6, 8, 16))
    grid[:, :4, :] += 5.0  # left/right halves differ: the dominant component
    reduced = pca_reduce_patches(grid, n_components=9)
    assert reduced.shape == (6, 8, 9) and reduced.dtype == np.float32
    assert reduced.min() >= 0 and reduced.max() <= 1
    first = reduced[..., 0]
    assert abs(first[:, :4].mean() - first[:, 4:].mean()) > 0.5
    # Only 3 channels: 3 informative components, the rest zero (fixed channel count).
    few = pca_reduce_patches(rng.normal(size=(5, 5, 3)), n_components=9)
    assert np.all(few[..., 3:] == 0) and np.ptp(few[..., 0]) == pytest.approx(1.0)


def test_vit_channels_from_patches_cover_the_image():
    rng = np.random.default_rng(1)
    channels = vit_feature_channels_from_patches(rng.normal(size=(4, 5, 12)), (60, 75, 3), n_components=9)
    assert channels.shape == (60, 75, 9) and channels.dtype == np.float32
    assert channels.min() >= 0 and channels.max() <= 1
    aligned = vit_feature_channels_from_patches(rng.normal(size=(4, 5, 12)), (60, 75), patch_size=14)
    assert aligned.shape == (60, 75, 9)
    np.testing.assert_array_equal(aligned[56:], np.repeat(aligned[55:56], 4, axis=0))  # edge beyond 4 x 14


def test_tiled_extraction_stitches_to_the_untiled_grid():
    class Model:
        class config:
            patch_size = 4

    def patch_means(model, image, image_processor=None):
        """Stand-in extractor: per-patch mean and max (a purely local feature)."""
        h, w = image.shape[0] // 4, image.shape[1] // 4
        blocks = image[: h * 4, : w * 4].reshape(h, 4, w, 4)
        return np.stack([blocks.mean(axis=(1, 3)), blocks.max(axis=(1, 3))], axis=-1)

    image = np.random.default_rng(2).random((50, 70)).astype(np.float32)
    whole = patch_means(Model, image)
    tiled = extract_patch_features_tiled(Model, image, max_side=24, overlap=8, extractor=patch_means)
    assert tiled.shape == whole.shape == (12, 17, 2)
    np.testing.assert_allclose(tiled, whole, atol=1e-6)


def test_classical_plus_vit_segmenter_with_a_tiny_model(tmp_path, two_phase, tiny_vit):
    train_image, _, scribbles, test_image, _ = two_phase
    segmenter = TrainableSegmenter(
        features="classical+vit", model=tiny_vit, classifier_params={"n_estimators": 10}
    ).fit(train_image, scribbles)
    assert segmenter.n_features_in_ == n_features() + 9
    assert segmenter.feature_names_[-1] == "vit_pca9"
    mask = segmenter.predict(test_image)
    assert mask.shape == test_image.shape
    # The torch model is not saved: loading needs it back.
    path = tmp_path / "vit_segmenter.zip"
    segmenter.save(path)
    with pytest.raises(ValueError, match="pass it as model="):
        TrainableSegmenter.load(path)
    loaded = TrainableSegmenter.load(path, model=tiny_vit)
    np.testing.assert_array_equal(loaded.predict(test_image), mask)


def test_vit_tiles_bound_the_input_size(tiny_vit):
    image, _ = generate_microstructure((70, 98), seed=5)
    seen = []

    from alibi_dinov2.features.extraction import extract_patch_features

    def recording(model, tile, image_processor=None):
        seen.append(tile.shape)
        return extract_patch_features(model, tile, image_processor=image_processor)

    grid = extract_patch_features_tiled(tiny_vit, image, max_side=42, overlap=14, extractor=recording)
    assert grid.shape == (5, 7, 32)
    assert len(seen) > 1 and all(max(shape[:2]) <= 42 for shape in seen)


class _RunsCodeWhenUnpickled:
    """A pickle of this object creates `marker` when loaded with pickle.load."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_an_untrusted_pickle_is_refused_and_not_executed(tmp_path):
    import pickle
    import zipfile

    marker = tmp_path / "executed"
    planted = tmp_path / "segmenter.zip"
    planted.write_bytes(pickle.dumps(_RunsCodeWhenUnpickled(marker)))
    with pytest.raises(ValueError, match="pickles are refused"):
        TrainableSegmenter.load(planted)
    # The same payload inside an archive that looks like a saved segmenter.
    with zipfile.ZipFile(planted, "w") as archive:
        archive.writestr("settings.json", pickle.dumps(_RunsCodeWhenUnpickled(marker)))
        archive.writestr("classifier.json", pickle.dumps(_RunsCodeWhenUnpickled(marker)))
    with pytest.raises(ValueError, match="not a saved TrainableSegmenter"):
        TrainableSegmenter.load(planted)
    assert not marker.exists()


def test_a_saved_file_is_json_settings_and_an_xgboost_json_model(tmp_path, two_phase):
    import json
    import zipfile

    train_image, _, scribbles, _, _ = two_phase
    path = tmp_path / "segmenter.zip"
    TrainableSegmenter(classifier_params={"n_estimators": 5}).fit(train_image, scribbles).save(path)
    with zipfile.ZipFile(path) as archive:
        assert sorted(archive.namelist()) == ["classifier.json", "settings.json"]
        settings = json.loads(archive.read("settings.json"))
        assert "learner" in json.loads(archive.read("classifier.json"))
    assert settings["params"]["features"] == "classical" and settings["model_name"] is None
    assert settings["image_channels"] == 1 and settings["classes"] == [1, 2]


def test_an_image_with_another_channel_count_is_refused_after_loading(tmp_path, two_phase):
    train_image, _, scribbles, test_image, _ = two_phase
    path = tmp_path / "segmenter.zip"
    TrainableSegmenter(classifier_params={"n_estimators": 5}).fit(train_image, scribbles).save(path)
    loaded = TrainableSegmenter.load(path)
    rgb = np.repeat(np.asarray(test_image)[..., None], 3, axis=-1)
    with pytest.raises(ValueError, match=r"3 channel\(s\) but this segmenter was trained on images with 1"):
        loaded.predict(rgb)


# ---------------------------------------------------------------- feature cache
def test_the_feature_cache_drops_the_least_recently_used_and_shares_itself():
    import copy

    from alibi_dinov2.features.cache import FeatureCache, image_fingerprint

    cache = FeatureCache(max_bytes=3 * 800)  # three arrays of 100 float64
    for key in "abc":
        cache.get_or_compute(key, lambda: np.zeros(100))
    cache.get_or_compute("a", lambda: pytest.fail("recomputed a cached array"))  # "a" is now the most recent
    stored = cache.get_or_compute("d", lambda: np.ones(100))
    assert "b" not in cache and all(key in cache for key in "acd") and cache.nbytes == 2400
    with pytest.raises(ValueError, match="read-only"):
        stored[0] = 2.0
    assert cache.get_or_compute("huge", lambda: np.zeros(1000)).flags.writeable and "huge" not in cache
    assert copy.deepcopy(cache) is cache and clone(TrainableSegmenter(feature_cache=cache)).feature_cache is cache
    image = np.arange(12, dtype=np.uint16).reshape(3, 4)
    fingerprints = {
        image_fingerprint(other) for other in (image, image.reshape(4, 3), image.astype(np.int16), image + 1)
    }
    assert len(fingerprints) == 4 and image_fingerprint(image.copy()) in fingerprints


def test_a_cached_segmenter_computes_each_stack_once_and_predicts_as_without(two_phase, tiny_vit, monkeypatch):
    from alibi_dinov2.features.cache import FeatureCache
    from alibi_dinov2.segmentation import extractors

    train_image, _, scribbles, test_image, _ = two_phase
    computed = []
    classical = extractors.classical_features
    monkeypatch.setattr(extractors, "classical_features",
                        lambda image, **options: computed.append(image.shape) or classical(image, **options))
    settings = dict(features="classical+vit", model=tiny_vit, n_components=3, classifier_params={"n_estimators": 10})
    cache = FeatureCache()
    cached = TrainableSegmenter(**settings, feature_cache=cache)
    assert not cached.features_cached(train_image)
    cached.fit(train_image, scribbles)
    assert cached.features_cached(train_image) and len(cache) == 2  # the classical and the ViT stack, apart
    fewer = np.where(np.arange(scribbles.shape[1]) < 48, scribbles, 0)
    TrainableSegmenter(**settings, feature_cache=cache).fit(train_image, fewer).predict(train_image)
    assert computed == [train_image.shape]
    plain = TrainableSegmenter(**settings).fit(train_image, scribbles)
    np.testing.assert_array_equal(cached.predict(test_image), plain.predict(test_image))
    np.testing.assert_array_equal(cached.extract_features(test_image), plain.extract_features(test_image))
    assert "feature_cache=FeatureCache(4 arrays, " in repr(cached) and "feature_cache=None" in repr(plain)


def test_classical_plus_vit_segmenter_with_a_tiny_alibi_dinov3(two_phase):
    from conftest import tiny_alibi_model

    train_image, _, scribbles, test_image, test_truth = two_phase
    model = tiny_alibi_model("alibi_dinov3")
    segmenter = TrainableSegmenter(
        features="classical+vit", model=model, classifier_params={"n_estimators": 10}
    ).fit(train_image, scribbles)
    assert segmenter.n_features_in_ == n_features() + 9
    prediction = segmenter.predict(test_image)
    assert prediction.shape == test_truth.shape
    assert mean_iou(prediction, test_truth, n_classes=2) >= 0.8


def test_files_train_like_arrays_and_label_errors_name_the_files(tmp_path, two_phase):
    import re

    import tifffile
    from PIL import Image

    image, _, scribbles, test_image, _ = two_phase
    image = image.astype(np.float32)
    tifffile.imwrite(tmp_path / "train.tif", image)
    Image.fromarray(scribbles.astype(np.uint8)).save(tmp_path / "train_labels.png")
    settings = {"classifier_params": {"n_estimators": 30}, "n_jobs": 2}
    from_files = TrainableSegmenter(**settings).fit([str(tmp_path / "train.tif")], [tmp_path / "train_labels.png"])
    from_arrays = TrainableSegmenter(**settings).fit(image, scribbles)
    np.testing.assert_array_equal(from_files.predict(test_image), from_arrays.predict(test_image))

    image_file, missing = tmp_path / "train.tif", tmp_path / "train_label.png"
    with pytest.raises(FileNotFoundError, match=re.escape(f"label file not found: {missing} (the labels of "
                                                          f"{image_file})")):
        TrainableSegmenter().fit(image_file, missing)
    Image.fromarray(scribbles[:-2].astype(np.uint8)).save(tmp_path / "short.png")
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'short.png'} has shape (94, 96) but {image_file} is "
                                                   "(96, 96)")):
        TrainableSegmenter().fit([image_file], [tmp_path / "short.png"])
    with pytest.raises(ValueError, match=re.escape("label image 1 has shape (94, 96) but image 1 is (96, 96)")):
        TrainableSegmenter().fit([image, image], [scribbles, scribbles[:-2]])
