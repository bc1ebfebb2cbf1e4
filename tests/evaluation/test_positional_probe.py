"""Positional linear probe: ramp definitions, sampling, the one protocol, and agreement with scikit-learn."""

import dataclasses
import json

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.linear_model import Ridge
from sklearn.metrics import r2_score
from sklearn.preprocessing import StandardScaler

from evaluation.positional_probe import (
    MIN_PROBE_SAMPLES,
    PROBE_PROTOCOL,
    SAMPLINGS,
    PositionalProbe,
    ProbeProtocol,
    expand_ramps,
    layer_fingerprint,
    linear_probe,
    make_ramp,
    most_positional_channels,
    n_random_samples,
    n_samples,
    per_channel_probe,
    r2_scores,
    ramp_targets,
    sample_positions,
    stack_probe,
)


def noise_features(h, w, c, seed=0):
    return np.random.default_rng(seed).normal(size=(h, w, c))


def sklearn_reference(features, ramp, step, sampling, alpha, holdout, seed, channels=None):
    """StandardScaler + Ridge fitted on the sampled patches; mean R^2 over ramps."""
    h, w, c = features.shape
    flat = features.reshape(-1, c).astype(np.float64)
    if channels is not None:
        flat = flat[:, channels]
    index = sample_positions(h, w, step, sampling, seed)
    targets = ramp_targets(ramp, h, w, seed)
    evaluated = np.setdiff1d(np.arange(h * w), index) if holdout else np.arange(h * w)
    scaler = StandardScaler().fit(flat[index])
    ridge = Ridge(alpha=alpha).fit(scaler.transform(flat[index]), targets[index])
    prediction = ridge.predict(scaler.transform(flat)).reshape(h * w, -1)
    return np.mean([r2_score(targets[evaluated, t], prediction[evaluated, t]) for t in range(targets.shape[1])])


# --------------------------------------------------------------------------------------------------
# Ramps
# --------------------------------------------------------------------------------------------------
def test_lr_and_ud_ramps_hand_computed():
    np.testing.assert_allclose(make_ramp("lr", 2, 3), [[0, 0.5, 1], [0, 0.5, 1]])
    np.testing.assert_allclose(make_ramp("ud", 3, 2), [[0, 0], [0.5, 0.5], [1, 1]])


def test_diag_ramp_uses_one_axis_cut_to_size():
    # a = linspace(0, 1, 3) = [0, .5, 1]; diag[y, x] = (a[y] + a[x]) / 2
    np.testing.assert_allclose(make_ramp("diag", 2, 3), [[0, 0.25, 0.5], [0.25, 0.5, 0.75]])
    # Tall grid: the shared axis runs along y, x only reaches a[1].
    np.testing.assert_allclose(make_ramp("diag", 3, 2), [[0, 0.25], [0.25, 0.5], [0.5, 0.75]])


def test_radial_ramp_hand_computed():
    edge = 1 - 1 / np.sqrt(2)
    np.testing.assert_allclose(make_ramp("radial", 3, 3), [[0, edge, 0], [edge, 1, edge], [0, edge, 0]])
    # 2 x 4 grid about (1, 2): the farthest patch (0, 0) is sqrt(5) away.
    radial = make_ramp("radial", 2, 4)
    assert radial[1, 2] == 1.0 and radial[0, 0] == 0.0
    np.testing.assert_allclose(radial[1, 0], 1 - 2 / np.sqrt(5))
    assert make_ramp("radial", 1, 1).tolist() == [[1.0]]


def test_raster_ramp_is_row_major_index_over_count():
    np.testing.assert_allclose(make_ramp("raster", 2, 3), np.array([[0, 1, 2], [3, 4, 5]]) / 6)


def test_compound_and_random_ramps():
    both = make_ramp("lr+ud", 4, 5)
    assert both.shape == (4, 5, 2)
    np.testing.assert_array_equal(both[..., 0], make_ramp("lr", 4, 5))
    np.testing.assert_array_equal(both[..., 1], make_ramp("ud", 4, 5))
    noise = make_ramp("random", 6, 7, seed=3)
    assert noise.shape == (6, 7) and noise.min() >= 0 and noise.max() < 1
    np.testing.assert_array_equal(noise, make_ramp("random", 6, 7, seed=3))
    assert not np.array_equal(noise, make_ramp("random", 6, 7, seed=4))
    assert expand_ramps(["lr+ud", "radial"]) == ("lr", "ud", "radial")
    with pytest.raises(ValueError, match="Unknown ramp"):
        make_ramp("spiral", 3, 3)


# --------------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------------
def test_grid_sampling_picks_every_step_th_row_and_column():
    index = sample_positions(13, 8, step=6, sampling="grid")
    rows, cols = np.divmod(index, 8)
    assert sorted(set(rows.tolist())) == [0, 6, 12]
    assert sorted(set(cols.tolist())) == [0, 6]
    np.testing.assert_array_equal(index, [0, 6, 48, 54, 96, 102])


def test_random_sampling_count_uniqueness_and_seed():
    index = sample_positions(37, 37, step=6, sampling="random", seed=1)
    assert len(index) == n_random_samples(37, 37, 6) == 1369 // 36
    assert len(np.unique(index)) == len(index) and index.min() >= 0 and index.max() < 1369
    np.testing.assert_array_equal(index, sample_positions(37, 37, 6, "random", seed=1))
    assert not np.array_equal(index, sample_positions(37, 37, 6, "random", seed=2))
    with pytest.raises(ValueError, match="no sample"):
        sample_positions(4, 4, step=6, sampling="random")


def test_fit_ignores_features_of_unsampled_patches():
    features = noise_features(20, 20, 8)
    probe = PositionalProbe("lr", step=4, sampling="grid").fit(features)
    changed = features.copy()
    mask = np.ones(400, dtype=bool)
    mask[probe.sample_index_] = False
    changed.reshape(400, 8)[mask] += 100.0
    refit = PositionalProbe("lr", step=4, sampling="grid").fit(changed)
    np.testing.assert_allclose(refit.coef_, probe.coef_)
    np.testing.assert_allclose(refit.mean_, features.reshape(400, 8)[probe.sample_index_].mean(axis=0))


# --------------------------------------------------------------------------------------------------
# Scores on planted signals
# --------------------------------------------------------------------------------------------------
def test_ramp_plus_small_noise_scores_near_one():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(37, 37, 16)) * 0.05
    features[..., 0] += make_ramp("lr", 37, 37)
    features[..., 1] += make_ramp("ud", 37, 37)
    assert linear_probe(features, "lr+ud", seed=0) > 0.95
    assert linear_probe(features, "lr", sampling="grid") > 0.95
    assert linear_probe(features, "diag", seed=0) > 0.95  # diag is a linear mix of lr and ud here


@pytest.mark.parametrize("ramp", ["lr+ud", "radial"])
def test_pure_noise_scores_about_zero_or_below(ramp):
    scores = [linear_probe(noise_features(37, 37, 64, seed), ramp, seed=seed) for seed in range(4)]
    assert np.mean(scores) < 0.1


def test_random_ramp_control_is_not_predictable_from_positional_features():
    features = noise_features(37, 37, 16) * 0.05
    features[..., 0] += make_ramp("lr", 37, 37)
    scores = [linear_probe(features, "random", seed=seed) for seed in range(4)]
    assert np.mean(scores) < 0.1


@pytest.mark.parametrize("ramp", ["lr", "ud", "radial"])
def test_per_channel_probe_finds_the_single_positional_channel(ramp):
    features = noise_features(30, 34, 48, seed=1)
    features[..., 29] = make_ramp(ramp, 30, 34) + 0.03 * features[..., 29]
    scores = per_channel_probe(features, ramp, seed=0)
    assert scores.shape == (48,)
    assert int(np.argmax(scores)) == 29 and scores[29] > 0.9
    assert np.delete(scores, 29).max() < 0.2
    assert most_positional_channels(scores, k=1).tolist() == [29]


# --------------------------------------------------------------------------------------------------
# Agreement with scikit-learn
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sampling", ["random", "grid"])
@pytest.mark.parametrize("holdout", [False, True])
@pytest.mark.parametrize("ramp", ["lr", "lr+ud", "radial", "random"])
def test_linear_probe_equals_scaler_plus_ridge(sampling, holdout, ramp):
    features = noise_features(19, 23, 40, seed=2)
    features[..., 3] += 2 * make_ramp("lr", 19, 23)
    features[..., 7] = 5.0  # constant channel: StandardScaler's scale 1
    ours = linear_probe(features, ramp, step=3, sampling=sampling, alpha=1.0, holdout=holdout, seed=11)
    reference = sklearn_reference(features, ramp, 3, sampling, 1.0, holdout, 11)
    assert abs(ours - reference) < 1e-6


@pytest.mark.parametrize("sampling", ["random", "grid"])
@pytest.mark.parametrize("holdout", [False, True])
@pytest.mark.parametrize("ramp", ["lr", "lr+ud"])
def test_per_channel_probe_equals_loop_of_scaler_plus_ridge(sampling, holdout, ramp):
    features = noise_features(17, 21, 24, seed=3).astype(np.float32)
    features[..., 5] += make_ramp("ud", 17, 21).astype(np.float32)
    features[..., 9] = 1.5  # constant channel
    ours = per_channel_probe(features, ramp, step=3, sampling=sampling, alpha=2.5, holdout=holdout, seed=5)
    reference = [
        sklearn_reference(features, ramp, 3, sampling, 2.5, holdout, 5, channels=[channel]) for channel in range(24)
    ]
    np.testing.assert_allclose(ours, reference, rtol=0, atol=1e-6)


def test_few_samples_many_channels_uses_the_same_solution():
    # 38 samples for 384 channels (the paper's setting): the dual system must give sklearn's answer.
    features = noise_features(37, 37, 384, seed=4)
    ours = linear_probe(features, "lr+ud", seed=0)
    assert abs(ours - sklearn_reference(features, "lr+ud", 6, "random", 1.0, False, 0)) < 1e-6


def test_stack_probe_is_a_joint_fit_of_separate_ramps():
    features = noise_features(25, 25, 20, seed=5)
    features[..., 0] += make_ramp("lr", 25, 25)
    result = stack_probe(features, ramps=("lr", "ud", "radial"), step=4, seed=2)
    assert set(result) == {"lr", "ud", "radial", "mean"}
    for ramp in ("lr", "ud", "radial"):
        assert abs(result[ramp] - linear_probe(features, ramp, step=4, seed=2)) < 1e-10
    assert abs(result["mean"] - np.mean([result["lr"], result["ud"], result["radial"]])) < 1e-12
    both = linear_probe(features, "lr+ud", step=4, seed=2)
    assert abs(both - (result["lr"] + result["ud"]) / 2) < 1e-10


def test_r2_scores_follow_sklearn_conventions():
    targets = np.array([[1.0, 2.0], [2.0, 2.0], [3.0, 2.0]])
    predictions = np.array([[1.5, 2.0], [2.0, 2.0], [2.5, 2.0]])
    scores = r2_scores(targets, predictions)
    assert scores[0] == pytest.approx(r2_score(targets[:, 0], predictions[:, 0]))
    assert scores[1] == 1.0  # constant target predicted exactly
    assert r2_scores(targets[:, 1:], predictions[:, 1:] + 1)[0] == 0.0


# --------------------------------------------------------------------------------------------------
# Estimator and fingerprint
# --------------------------------------------------------------------------------------------------
def test_estimator_api():
    features = noise_features(20, 24, 12, seed=6)
    features[..., 2] += make_ramp("lr", 20, 24)
    probe = PositionalProbe(ramp="lr+ud", step=4, sampling="grid", alpha=1.0)
    assert clone(probe).get_params() == probe.get_params()
    with pytest.raises(RuntimeError, match="not fitted"):
        probe.predict(features)
    probe.fit(features)
    assert probe.predict(features).shape == (20, 24, 2)
    assert probe.coef_.shape == (12, 2) and probe.intercept_.shape == (2,)
    assert probe.score(features) == pytest.approx(linear_probe(features, "lr+ud", 4, "grid"))
    with pytest.raises(ValueError, match="fitted on"):
        probe.score(features[:10])


def test_seeds_reproduce_and_generators_are_accepted():
    features = noise_features(30, 30, 10, seed=7)
    assert linear_probe(features, "random", seed=3) == linear_probe(features, "random", seed=3)
    assert linear_probe(features, "lr", seed=3) != linear_probe(features, "lr", seed=4)
    first = linear_probe(features, "lr", seed=np.random.default_rng(0))
    assert first == linear_probe(features, "lr", seed=np.random.default_rng(0))


def test_layer_fingerprint_shape_and_values():
    h, w, c = 24, 24, 16
    layers = noise_features(h, w, c * 3, seed=8).reshape(h, w, 3, c).transpose(2, 0, 1, 3).copy()
    layers[2, ..., 4] = make_ramp("lr", h, w)  # only the last layer's channel 4 is positional
    fingerprint = layer_fingerprint(layers, ramp="lr", step=4, seed=1)
    assert fingerprint.shape == (c, 3)
    np.testing.assert_allclose(fingerprint[:, 1], per_channel_probe(layers[1], "lr", 4, seed=1))
    assert np.unravel_index(np.argmax(fingerprint), fingerprint.shape) == (4, 2)
    averaged = layer_fingerprint([layers, layers], ramp="lr", step=4, seed=1)
    np.testing.assert_allclose(averaged, fingerprint)


# --------------------------------------------------------------------------------------------------
# The one protocol
# --------------------------------------------------------------------------------------------------
def test_the_project_protocol_is_the_papers_and_frozen():
    assert PROBE_PROTOCOL.to_dict() == {"step": 6, "sampling": "random", "alpha": 1.0, "holdout": False,
                                        "repeats": 6, "seed": 0, "min_samples": MIN_PROBE_SAMPLES}
    with pytest.raises(dataclasses.FrozenInstanceError):
        PROBE_PROTOCOL.step = 3
    restored = ProbeProtocol.from_dict(json.loads(json.dumps({"ramps": ["lr"], **PROBE_PROTOCOL.to_dict()})))
    assert restored == PROBE_PROTOCOL and hash(restored) == hash(PROBE_PROTOCOL)


@pytest.mark.parametrize(
    "change, message",
    [({"step": 0}, "step must be >= 1"), ({"repeats": 0}, "repeats must be >= 1"), ({"alpha": -1.0}, "alpha must"),
     ({"sampling": "every"}, "sampling must be one of"), ({"min_samples": 0}, "min_samples must be >= 1")],
)
def test_a_bad_protocol_is_refused(change, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(PROBE_PROTOCOL, **change)


def test_sampling_seeds_depend_on_the_base_seed_image_and_repeat_only():
    protocol = ProbeProtocol()
    seeds = {protocol.sampling_seed(image, repeat) for image in range(4) for repeat in range(6)}
    assert len(seeds) == 24
    assert protocol.sampling_seed(1, 2) == ProbeProtocol(step=3, alpha=0.5).sampling_seed(1, 2)
    assert protocol.sampling_seed(1, 2) != ProbeProtocol(seed=1).sampling_seed(1, 2)
    # Image 1's samplings do not move when image 0 leaves the set.
    assert protocol.sampling_seed(1, 0) == int(np.random.SeedSequence([0, 1, 0]).generate_state(1)[0])


@pytest.mark.parametrize("sampling", SAMPLINGS)
@pytest.mark.parametrize("step, min_samples", [(6, 10), (3, 16), (1, 1), (5, 7)])
def test_min_grid_side_is_the_smallest_square_grid_the_protocol_probes(sampling, step, min_samples):
    protocol = ProbeProtocol(step=step, sampling=sampling, min_samples=min_samples)
    side = protocol.min_grid_side()
    assert protocol.n_samples(side, side) == n_samples(side, side, step, sampling) >= min_samples
    assert protocol.can_probe(side, side) and not protocol.can_probe(side - 1, side - 1)


def test_a_protocol_sampling_is_the_functional_probe_with_that_seed():
    features = noise_features(19, 23, 12, seed=3)
    features[..., 0] += np.linspace(0, 1, 23)[None, :]
    protocol = ProbeProtocol(holdout=True, seed=7)
    seed = protocol.sampling_seed(2, 3)
    assert protocol.linear_probe(features, "lr+ud", 2, 3) == linear_probe(features, "lr+ud", 6, "random", 1.0,
                                                                           True, seed)
    assert protocol.estimator("lr+ud", 2, 3).fit(features).score(features) == protocol.linear_probe(
        features, "lr+ud", 2, 3
    )
    np.testing.assert_array_equal(protocol.per_channel_probe(features, "lr", 2, 3),
                                  per_channel_probe(features, "lr", 6, "random", 1.0, True, seed))
