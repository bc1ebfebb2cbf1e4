"""Classical (Weka-style) feature stack: layout, known responses, backends, input checks."""

import numpy as np
import pytest

from alibi_dinov2.features.classical import (
    DEFAULT_SIGMAS,
    classical_features,
    feature_names,
    membrane_kernels,
    n_features,
)


NAMES = feature_names()


def channel(features, name):
    return features[..., NAMES.index(name)]


def test_default_stack_has_58_named_channels_in_documented_order():
    assert n_features() == 58
    assert len(NAMES) == 58 and len(set(NAMES)) == 58
    assert NAMES[:7] == [
        "gaussian_s0",
        "gradient_s0",
        "hessian_modulus_s0",
        "hessian_trace_s0",
        "hessian_determinant_s0",
        "hessian_eigenvalue1_s0",
        "hessian_eigenvalue2_s0",
    ]
    assert NAMES[7] == "gaussian_s1" and NAMES[41] == "hessian_eigenvalue2_s16"
    # DoG between every pair of the true blurs (sigma > 0): C(5, 2) = 10.
    assert NAMES[42:52] == [
        "dog_s1_s2", "dog_s1_s4", "dog_s1_s8", "dog_s1_s16", "dog_s2_s4",
        "dog_s2_s8", "dog_s2_s16", "dog_s4_s8", "dog_s4_s16", "dog_s8_s16",
    ]
    assert NAMES[52:] == [f"membrane_{s}" for s in ("mean", "max", "min", "sum", "std", "median")]


def test_channel_count_follows_sigmas():
    # 7 per sigma + 1 DoG (1, 2) + 6 membrane.
    assert n_features((0, 1, 2)) == 7 * 3 + 1 + 6
    assert len(feature_names((0, 1, 2))) == 28


def test_output_shape_dtype_and_first_channel_is_scaled_image():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(37, 53), dtype=np.uint8)
    features = classical_features(image)
    assert features.shape == (37, 53, 58)
    assert features.dtype == np.float32
    np.testing.assert_allclose(channel(features, "gaussian_s0"), image / 255.0, atol=1e-6)
    np.testing.assert_allclose(
        channel(features, "dog_s1_s4"),
        channel(features, "gaussian_s1") - channel(features, "gaussian_s4"),
        atol=1e-6,
    )


def test_constant_image_gives_zero_gradients_hessians_and_dogs():
    features = classical_features(np.full((40, 30), 0.3, dtype=np.float32))
    derivative = [i for i, n in enumerate(NAMES) if n.startswith(("gradient", "hessian", "dog"))]
    assert len(derivative) == 6 + 30 + 10
    assert np.abs(features[..., derivative]).max() < 1e-6
    for sigma in DEFAULT_SIGMAS:
        np.testing.assert_allclose(channel(features, f"gaussian_s{sigma:g}"), 0.3, atol=1e-6)
    np.testing.assert_allclose(channel(features, "membrane_mean"), 0.3, atol=1e-5)
    np.testing.assert_allclose(channel(features, "membrane_sum"), 30 * 0.3, atol=1e-4)
    assert channel(features, "membrane_std").max() < 1e-5


def test_step_edge_lights_gradient_only_near_the_edge():
    image = np.zeros((32, 64), dtype=np.float32)
    image[:, 32:] = 1.0
    features = classical_features(image)
    gradient = channel(features, "gradient_s0")
    # Central differences see the unit step on the two columns next to it (slope 1/2 each).
    np.testing.assert_allclose(gradient[:, 31:33], 0.5, atol=1e-6)
    assert np.all(gradient[:, :30] == 0) and np.all(gradient[:, 34:] == 0)
    blurred = channel(features, "gradient_s2")
    assert set(np.argmax(blurred, axis=1)) <= {31, 32}
    assert blurred[:, 31:33].min() > 10 * blurred[:, :16].max()


def test_hessian_of_a_quadratic_surface():
    rows, cols = np.mgrid[0:30, 0:30].astype(np.float64)
    a, b = 0.0004, 0.0002  # f = a x^2 + b y^2  ->  dxx = 2a, dyy = 2b, dxy = 0
    image = (a * cols**2 + b * rows**2).astype(np.float32)
    features = classical_features(image, sigmas=(0,))
    inner = (slice(2, -2), slice(2, -2))
    names = feature_names((0,))

    def get(name):
        return features[..., names.index(name)][inner]

    np.testing.assert_allclose(get("hessian_trace_s0"), 2 * a + 2 * b, atol=1e-6)
    np.testing.assert_allclose(get("hessian_determinant_s0"), 4 * a * b, atol=1e-8)
    np.testing.assert_allclose(get("hessian_eigenvalue1_s0"), 2 * a, atol=1e-6)
    np.testing.assert_allclose(get("hessian_eigenvalue2_s0"), 2 * b, atol=1e-6)
    np.testing.assert_allclose(get("hessian_modulus_s0"), np.hypot(2 * a, 2 * b), atol=1e-6)


def test_membrane_kernels_are_rotated_unit_lines():
    kernels = membrane_kernels()
    assert kernels.shape == (30, 15, 15)
    np.testing.assert_allclose(kernels.sum(axis=(1, 2)), 1.0, atol=1e-6)
    vertical = np.zeros((15, 15))
    vertical[:, 7] = 1 / 15
    np.testing.assert_allclose(kernels[0], vertical, atol=1e-7)  # 0 degrees
    np.testing.assert_allclose(kernels[15], vertical.T, atol=1e-7)  # 90 degrees


def test_membrane_projections_respond_to_a_thin_line():
    image = np.zeros((41, 41), dtype=np.float32)
    image[:, 20] = 1.0  # a vertical membrane
    features = classical_features(image)
    on_line = (20, 20)
    # The vertical kernel lies on the line: the maximum is the full line value 1.
    assert channel(features, "membrane_max")[on_line] == pytest.approx(1.0, abs=1e-5)
    assert channel(features, "membrane_mean")[on_line] < 0.5
    assert channel(features, "membrane_std")[on_line] > 0.1
    assert channel(features, "membrane_max")[20, 2] < 0.1  # far from the line


def test_rgb_input_matches_its_grayscale():
    rng = np.random.default_rng(1)
    gray = rng.integers(0, 256, size=(24, 20), dtype=np.uint8)
    rgb = np.repeat(gray[..., None], 3, axis=-1)
    np.testing.assert_allclose(classical_features(rgb), classical_features(gray), atol=1e-5)


def test_torch_backend_matches_numpy_backend():
    pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    image = rng.random((45, 38)).astype(np.float32)
    numpy_features = classical_features(image, backend="numpy")
    torch_features = classical_features(image, backend="torch", device="cpu")
    np.testing.assert_allclose(torch_features, numpy_features, atol=2e-5)


@pytest.mark.parametrize(
    "bad, message",
    [
        (np.zeros(10), "2-D"),
        (np.zeros((4, 5, 6, 3)), "2-D"),
        (np.zeros((8, 8, 2)), "channels"),
        (np.zeros((0, 8)), "empty"),
        (np.zeros((8, 0, 3)), "empty"),
    ],
)
def test_bad_images_are_rejected_with_clear_errors(bad, message):
    with pytest.raises(ValueError, match=message):
        classical_features(bad)


def test_bad_values_and_sigmas_are_rejected():
    image = np.zeros((8, 8), dtype=np.float32)
    with pytest.raises(ValueError, match="NaN"):
        classical_features(np.full((8, 8), np.nan))
    with pytest.raises(ValueError, match="sigmas"):
        classical_features(image, sigmas=(0, -1))
    with pytest.raises(ValueError, match="distinct"):
        classical_features(image, sigmas=(1, 1))
    with pytest.raises(ValueError, match="backend"):
        classical_features(image, backend="opencl")
