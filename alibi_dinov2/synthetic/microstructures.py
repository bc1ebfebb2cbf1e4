"""Generated multi-phase microstructures with ground truth.

The images stand in for homogeneous micrographs (e.g. SEM of two- or three-phase alloys) so that the
segmentation tools and benchmarks run anywhere without data. Construction:

1. Phases: one smoothed white-noise field per phase (periodic Gaussian smoothing with standard deviation
   ``grain_size / 3`` pixels, so domains are roughly ``grain_size`` pixels across); every pixel takes
   the phase whose field is largest. Every phase can touch every other and the area fractions are
   about equal. The fields are statistically stationary, so the labels carry no positional trend.
2. Appearance: phase ``k`` gets its own mean intensity (evenly spaced in [0.2, 0.8], assigned in a
   seed-dependent order) and its own texture: fine speckle, coarse mottling, oriented lamellae or
   smooth, cycling through these for more phases.
3. Optional imaging artefacts, applied in the order of the physics: a focus gradient (``blur``: the
   Gaussian blur grows linearly from 0 to ``blur`` pixels across the image in a random direction), an
   illumination gradient (``illumination``: intensity multiplied by ``1 + illumination * g`` with ``g``
   a linear ramp from -0.5 to 0.5 in a random direction), then additive Gaussian noise of std ``noise``.
4. The result is clipped to [0, 1].
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


TEXTURES = ("speckle", "mottled", "lamellar", "smooth")


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Zero-mean, unit-std stationary random field (periodic smoothing keeps it homogeneous)."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma, mode="wrap")
    std = field.std()
    return (field - field.mean()) / (std if std > 0 else 1.0)


def _texture(
    rng: np.random.Generator, shape: tuple[int, int], kind: str, grain_size: float, angle: float
) -> np.ndarray:
    """Zero-mean texture of roughly unit amplitude (``angle`` orients the lamellae)."""
    if kind == "speckle":
        return _smooth_field(rng, shape, 0.7)
    if kind == "mottled":
        return _smooth_field(rng, shape, max(1.5, grain_size / 6.0))
    if kind == "lamellar":
        period = max(4.0, grain_size / 3.0)
        yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float64)
        phase = (xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / period
        return np.sin(phase + 0.5 * _smooth_field(rng, shape, period))
    if kind == "smooth":
        return np.zeros(shape)
    raise ValueError(f"Unknown texture {kind!r}; expected one of {TEXTURES}")


def _linear_ramp(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Linear ramp from 0 to 1 across the image along a random direction."""
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float64)
    ramp = xx * np.cos(angle) + yy * np.sin(angle)
    span = ramp.max() - ramp.min()
    return (ramp - ramp.min()) / (span if span > 0 else 1.0)


def _focus_gradient(image: np.ndarray, ramp: np.ndarray, max_sigma: float, n_levels: int = 8) -> np.ndarray:
    """Blur growing from 0 to ``max_sigma`` along ``ramp``: interpolate between a few blur levels."""
    sigmas = np.linspace(0.0, max_sigma, n_levels)
    levels = np.stack(
        [image if s == 0 else ndimage.gaussian_filter(image, s, mode="reflect") for s in sigmas]
    )
    position = ramp * (n_levels - 1)
    lower = np.clip(np.floor(position).astype(int), 0, n_levels - 2)
    weight = position - lower
    rows, cols = np.indices(image.shape)
    return (1 - weight) * levels[lower, rows, cols] + weight * levels[lower + 1, rows, cols]


def _check_size(size) -> tuple[int, int]:
    if np.isscalar(size):
        size = (size, size)
    size = tuple(int(s) for s in size)
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"size must be (height, width) with positive entries, got {size}")
    return size


def _check_arguments(size, n_phases, noise, blur, grain_size) -> tuple[int, int]:
    size = _check_size(size)
    if n_phases < 1:
        raise ValueError(f"n_phases must be >= 1, got {n_phases}")
    if grain_size <= 0:
        raise ValueError(f"grain_size must be > 0, got {grain_size}")
    if noise < 0 or blur < 0:
        raise ValueError("noise and blur must be >= 0")
    return size


def _generate(
    size: tuple[int, int],
    n_phases: int,
    appearance_rng: np.random.Generator,
    layout_rng: np.random.Generator,
    noise: float,
    illumination: float,
    blur: float,
    grain_size: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Phase appearance (intensities, lamella angles) from ``appearance_rng``; all else from ``layout_rng``."""
    means = np.linspace(0.2, 0.8, n_phases) if n_phases > 1 else np.array([0.5])
    means = means[appearance_rng.permutation(n_phases)]
    angles = appearance_rng.uniform(0, np.pi, n_phases)

    fields = np.stack([_smooth_field(layout_rng, size, grain_size / 3.0) for _ in range(n_phases)])
    labels = (np.argmax(fields, axis=0) + 1).astype(np.int32)

    # Keep textures weaker than the gap between phase intensities, so phases stay separable.
    texture_amplitude = 0.15 * 0.6 / max(n_phases - 1, 1)
    image = np.zeros(size, dtype=np.float64)
    for phase in range(n_phases):
        kind = TEXTURES[phase % len(TEXTURES)]
        texture = _texture(layout_rng, size, kind, grain_size, angles[phase])
        region = labels == phase + 1
        image[region] = means[phase] + texture_amplitude * texture[region]

    if blur > 0:
        image = _focus_gradient(image, _linear_ramp(layout_rng, size), blur)
    if illumination != 0:
        image = image * (1.0 + illumination * (_linear_ramp(layout_rng, size) - 0.5))
    if noise > 0:
        image = image + layout_rng.normal(0.0, noise, size)
    return np.clip(image, 0.0, 1.0).astype(np.float32), labels


def generate_microstructure(
    size: tuple[int, int] = (256, 256),
    n_phases: int = 2,
    seed: int = 0,
    noise: float = 0.05,
    illumination: float = 0.0,
    blur: float = 0.0,
    grain_size: float = 12.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Generate one multi-phase microstructure image and its ground-truth phase map.

    Args:
        size: (height, width) in pixels (an int gives a square).
        n_phases: number of phases (>= 1).
        seed: random seed; the same arguments always give the same image.
        noise: std of additive Gaussian noise (intensity units).
        illumination: strength of the multiplicative illumination gradient (0 = none; 0.5 = the
            intensity changes by +-25 % from one side to the other).
        blur: largest Gaussian blur (pixels) of the focus gradient (0 = everything in focus).
        grain_size: typical size of the phase domains in pixels.

    Returns:
        ``(image, labels)``: image float32 (H, W) in [0, 1]; labels int32 (H, W) with values
        1..n_phases (small images or large grains may miss a phase).
    """
    size = _check_arguments(size, n_phases, noise, blur, grain_size)
    appearance_rng = np.random.default_rng([seed, 0])
    layout_rng = np.random.default_rng([seed, 1])
    return _generate(size, n_phases, appearance_rng, layout_rng, noise, illumination, blur, grain_size)


def generate_microstructure_dataset(
    n_images: int,
    size: tuple[int, int] = (256, 256),
    n_phases: int = 2,
    seed: int = 0,
    noise: float = 0.05,
    illumination: float = 0.0,
    blur: float = 0.0,
    grain_size: float = 12.0,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Generate ``n_images`` micrographs of one material.

    All images share the phase appearance drawn from ``seed`` (intensities, lamella orientations), as
    micrographs of one sample would, while phase layouts, textures, artefact directions and noise
    differ from image to image. Other arguments as in :func:`generate_microstructure`.

    Returns:
        List of ``(image, labels)`` pairs: image float32 (H, W) in [0, 1], labels int32 (H, W) in
        1..n_phases.
    """
    if n_images < 0:
        raise ValueError(f"n_images must be >= 0, got {n_images}")
    size = _check_arguments(size, n_phases, noise, blur, grain_size)
    dataset = []
    for index in range(n_images):
        appearance_rng = np.random.default_rng([seed, 0])
        layout_rng = np.random.default_rng([seed, 2, index])
        dataset.append(
            _generate(size, n_phases, appearance_rng, layout_rng, noise, illumination, blur, grain_size)
        )
    return dataset
