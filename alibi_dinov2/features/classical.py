"""Weka-style classical feature stack for trainable segmentation.

The stack follows the defaults of the Trainable Weka Segmentation plugin, computed on the grayscale
image scaled to [0, 1] (colour images are reduced to luma first, see :func:`prepare_image`).

Channel order for the default ``sigmas = (0, 1, 2, 4, 8, 16)`` (58 channels):

1. For each sigma in ``sigmas`` (sigma 0 = the image itself), 7 channels (6 x 7 = 42):
   ``gaussian_s{sigma}``            the Gaussian blur,
   ``gradient_s{sigma}``            Sobel gradient magnitude of that blur,
   ``hessian_modulus_s{sigma}``     Frobenius norm sqrt(dxx^2 + 2 dxy^2 + dyy^2) of the Hessian,
   ``hessian_trace_s{sigma}``       dxx + dyy,
   ``hessian_determinant_s{sigma}`` dxx dyy - dxy^2,
   ``hessian_eigenvalue1_s{sigma}`` the larger eigenvalue,
   ``hessian_eigenvalue2_s{sigma}`` the smaller eigenvalue.
2. Differences of Gaussians ``dog_s{a}_s{b}`` = blur(a) - blur(b) for every pair a before b of the
   *non-zero* sigmas (the true blurs; as in Weka, the unblurred image does not take part), in the order
   (1,2), (1,4), ..., (8,16): 10 channels.
3. Membrane projections: a 15 x 15 kernel holding a 1-pixel line through its centre, rotated in 6 degree
   steps over 180 degrees (30 orientations), each convolved with the image; then across the 30 responses
   ``membrane_mean``, ``membrane_max``, ``membrane_min``, ``membrane_sum``, ``membrane_std`` (population
   std) and ``membrane_median``: 6 channels.

Total: ``7 * len(sigmas) + n_pos * (n_pos - 1) / 2 + 6`` with ``n_pos`` the number of non-zero sigmas,
i.e. 42 + 10 + 6 = 58 by default (the count of the reference implementation).

Derivatives are finite differences on the blurred image: Sobel ([1, 2, 1] smoothing x [-1, 0, 1] / 8,
i.e. an estimate of the per-pixel slope), second derivatives [1, -2, 1] and the mixed derivative as the
product of two central differences. Borders use mirror-reflection (scipy ``mode="reflect"``), so a
constant image gives exactly zero gradients, Hessians and DoGs. The membrane kernels are normalised
to sum 1, so their responses are mean intensities along a line and stay in [0, 1].

Two backends give the same numbers (up to float32 rounding): ``"numpy"`` (scipy filters; the membrane
convolutions share one FFT of the image) and ``"torch"`` (batched convolutions; used by ``"auto"`` when
a CUDA device is available).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import fft as scipy_fft
from scipy import ndimage

from alibi_dinov2.io.images import to_float01, to_grayscale


DEFAULT_SIGMAS: tuple[float, ...] = (0.0, 1.0, 2.0, 4.0, 8.0, 16.0)
MEMBRANE_KERNEL_SIZE = 15
MEMBRANE_ANGLE_STEP_DEG = 6.0
PER_SIGMA_FEATURES = (
    "gaussian",
    "gradient",
    "hessian_modulus",
    "hessian_trace",
    "hessian_determinant",
    "hessian_eigenvalue1",
    "hessian_eigenvalue2",
)
MEMBRANE_STATISTICS = ("mean", "max", "min", "sum", "std", "median")
GAUSSIAN_TRUNCATE = 4.0  # kernel radius = int(4 sigma + 0.5), as scipy.ndimage.gaussian_filter

_SMOOTH = np.array([1.0, 2.0, 1.0]) / 4.0
_CENTRAL_DIFF = np.array([-0.5, 0.0, 0.5])
_SECOND_DIFF = np.array([1.0, -2.0, 1.0])


# --------------------------------------------------------------------------------------------------
# Names, counts, kernels
# --------------------------------------------------------------------------------------------------
def _check_sigmas(sigmas: Sequence[float]) -> tuple[float, ...]:
    sigmas = tuple(float(s) for s in sigmas)
    if not sigmas:
        raise ValueError("sigmas must hold at least one value")
    if any(not np.isfinite(s) or s < 0 for s in sigmas):
        raise ValueError(f"sigmas must be finite and >= 0, got {sigmas}")
    if len(set(sigmas)) != len(sigmas):
        raise ValueError(f"sigmas must be distinct, got {sigmas}")
    return sigmas


def _dog_pairs(sigmas: Sequence[float]) -> list[tuple[float, float]]:
    positive = [s for s in sigmas if s > 0]
    return [(a, b) for i, a in enumerate(positive) for b in positive[i + 1 :]]


def feature_names(sigmas: Sequence[float] = DEFAULT_SIGMAS) -> list[str]:
    """Channel names, in the order of the last axis of :func:`classical_features`."""
    sigmas = _check_sigmas(sigmas)
    names = [f"{feature}_s{sigma:g}" for sigma in sigmas for feature in PER_SIGMA_FEATURES]
    names += [f"dog_s{a:g}_s{b:g}" for a, b in _dog_pairs(sigmas)]
    names += [f"membrane_{statistic}" for statistic in MEMBRANE_STATISTICS]
    return names


def n_features(sigmas: Sequence[float] = DEFAULT_SIGMAS) -> int:
    """Number of channels (58 for the default sigmas)."""
    return len(feature_names(sigmas))


def membrane_kernels(
    size: int = MEMBRANE_KERNEL_SIZE, angle_step_deg: float = MEMBRANE_ANGLE_STEP_DEG
) -> np.ndarray:
    """Line kernels for the membrane projections.

    A 1-pixel-wide line through the kernel centre (vertical at angle 0), rotated by ``angle_step_deg``
    steps over 180 degrees. Pixels are weighted by their overlap with the line (linear falloff with the
    perpendicular distance, so oblique lines stay 1 pixel thick) and each kernel sums to 1.

    Returns:
        float32 array (n_orientations, size, size); 30 x 15 x 15 by default.
    """
    if size < 1 or size % 2 == 0:
        raise ValueError(f"Kernel size must be a positive odd number, got {size}")
    n_orientations = int(round(180.0 / angle_step_deg))
    radius = size // 2
    offsets = np.arange(-radius, radius + 1, dtype=np.float64)
    dy, dx = np.meshgrid(offsets, offsets, indexing="ij")
    kernels = np.empty((n_orientations, size, size), dtype=np.float32)
    for index in range(n_orientations):
        angle = np.deg2rad(index * angle_step_deg)
        direction_y, direction_x = np.cos(angle), np.sin(angle)  # angle 0: vertical line
        along = dy * direction_y + dx * direction_x
        across = -dy * direction_x + dx * direction_y
        weight = np.clip(1.0 - np.abs(across), 0.0, None) * (np.abs(along) <= radius + 0.5)
        kernels[index] = weight / weight.sum()
    return kernels


def gaussian_kernel1d(sigma: float, truncate: float = GAUSSIAN_TRUNCATE) -> np.ndarray:
    """Normalised 1-D Gaussian, radius ``int(truncate * sigma + 0.5)`` (scipy's convention)."""
    radius = int(truncate * sigma + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-0.5 * (x / sigma) ** 2)
    return kernel / kernel.sum()


# --------------------------------------------------------------------------------------------------
# Input handling
# --------------------------------------------------------------------------------------------------
def prepare_image(image: np.ndarray, scaling: str = "range") -> np.ndarray:
    """Turn (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) input into a float32 grayscale image in [0, 1].

    Args:
        image: integer or float image, scaled by the project's intensity rule (see :func:`to_float01`: uint8 / 255,
            12-bit data in uint16 / 4095, floats in [0, 1] kept, other values min-max scaled).
        scaling: ``"range"`` (that rule), ``"dtype"`` (uint16 / 65535) or ``"minmax"`` (always min-max scale).

    Returns:
        float32 array (H, W).
    """
    image = np.asarray(image)
    if image.ndim not in (2, 3):
        raise ValueError(
            f"Expected a 2-D grayscale (H, W) or colour (H, W, C) image, got shape {image.shape}"
        )
    if image.size == 0 or image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"Image is empty (shape {image.shape})")
    if image.ndim == 3 and image.shape[-1] not in (1, 3, 4):
        raise ValueError(
            f"Expected 1, 3 or 4 channels in the last axis, got {image.shape[-1]} (shape {image.shape}); "
            "pass a single image, not a stack"
        )
    gray = to_grayscale(to_float01(image, method=scaling))
    return np.ascontiguousarray(gray, dtype=np.float32)


# --------------------------------------------------------------------------------------------------
# NumPy / SciPy backend
# --------------------------------------------------------------------------------------------------
def _correlate_separable(image: np.ndarray, kernel_y: np.ndarray, kernel_x: np.ndarray) -> np.ndarray:
    tmp = ndimage.correlate1d(image, kernel_y, axis=0, mode="reflect")
    return ndimage.correlate1d(tmp, kernel_x, axis=1, mode="reflect")


def _derivative_features(blur: np.ndarray, out: np.ndarray) -> None:
    """Write gradient magnitude and the 5 Hessian features of ``blur`` into ``out`` (6, H, W)."""
    grad_x = _correlate_separable(blur, _SMOOTH, _CENTRAL_DIFF)
    grad_y = _correlate_separable(blur, _CENTRAL_DIFF, _SMOOTH)
    np.hypot(grad_x, grad_y, out=out[0])
    d_xx = ndimage.correlate1d(blur, _SECOND_DIFF, axis=1, mode="reflect")
    d_yy = ndimage.correlate1d(blur, _SECOND_DIFF, axis=0, mode="reflect")
    d_xy = _correlate_separable(blur, _CENTRAL_DIFF, _CENTRAL_DIFF)
    _hessian_features(d_xx, d_yy, d_xy, out[1:6], np)


def _hessian_features(d_xx, d_yy, d_xy, out, xp) -> None:
    """Modulus, trace, determinant, larger and smaller eigenvalue (works for numpy and torch)."""
    d_xy_sq = d_xy * d_xy
    out[0] = xp.sqrt(d_xx * d_xx + 2.0 * d_xy_sq + d_yy * d_yy)
    trace = d_xx + d_yy
    out[1] = trace
    out[2] = d_xx * d_yy - d_xy_sq
    half_gap = xp.sqrt(0.25 * (d_xx - d_yy) ** 2 + d_xy_sq)
    out[3] = 0.5 * trace + half_gap
    out[4] = 0.5 * trace - half_gap


def _membrane_responses_numpy(gray: np.ndarray, kernels: np.ndarray, chunk: int = 6) -> np.ndarray:
    """Convolve ``gray`` with every kernel via one shared FFT of the image; (n_kernels, H, W) float32."""
    height, width = gray.shape
    radius = kernels.shape[-1] // 2
    padded = np.pad(gray, radius, mode="symmetric")  # symmetric == scipy's "reflect" border
    fft_shape = tuple(scipy_fft.next_fast_len(n, real=True) for n in padded.shape)
    image_spectrum = scipy_fft.rfft2(padded, s=fft_shape, workers=-1)
    # The kernels are symmetric under 180-degree rotation, so convolution equals correlation here.
    responses = np.empty((len(kernels), height, width), dtype=np.float32)
    for start in range(0, len(kernels), chunk):
        kernel_spectra = scipy_fft.rfft2(kernels[start : start + chunk], s=fft_shape, workers=-1)
        full = scipy_fft.irfft2(kernel_spectra * image_spectrum, s=fft_shape, workers=-1)
        responses[start : start + chunk] = full[:, 2 * radius : 2 * radius + height, 2 * radius : 2 * radius + width]
    return responses


def _membrane_statistics_numpy(responses: np.ndarray, out: np.ndarray) -> None:
    """Write mean, max, min, sum, std and median across axis 0 of ``responses`` into ``out`` (6, H, W); the median
    reorders ``responses`` in place (no copy of the stack)."""
    np.mean(responses, axis=0, out=out[0])
    np.max(responses, axis=0, out=out[1])
    np.min(responses, axis=0, out=out[2])
    np.sum(responses, axis=0, out=out[3])
    # population std plane by plane: no stack-sized temporary
    squares = np.zeros(responses.shape[1:], dtype=np.float32)
    for plane in responses:
        deviation = plane - out[0]
        squares += deviation * deviation
    np.sqrt(squares / len(responses), out=out[4])
    out[5] = _median_axis0_numpy(responses)


def _median_axis0_numpy(stack: np.ndarray) -> np.ndarray:
    """Median over axis 0, partitioning ``stack`` in place."""
    count = stack.shape[0]
    upper = count // 2
    # Partition over a small leading axis: cheaper than a full sort.
    kth = [upper - 1, upper] if count % 2 == 0 else [upper]
    stack.partition(kth, axis=0)
    part = stack
    if count % 2:
        return part[upper]
    return 0.5 * (part[upper - 1] + part[upper])


def _classical_features_numpy(gray: np.ndarray, sigmas: tuple[float, ...]) -> np.ndarray:
    n_channels = n_features(sigmas)
    height, width = gray.shape
    features = np.empty((height, width, n_channels), dtype=np.float32)
    stack = np.moveaxis(features, -1, 0)  # channel planes written straight into the (H, W, C) result: no copy
    blurs: dict[float, np.ndarray] = {}
    channel = 0
    for sigma in sigmas:
        blur = gray if sigma == 0 else ndimage.gaussian_filter(
            gray, sigma, mode="reflect", truncate=GAUSSIAN_TRUNCATE
        )
        blurs[sigma] = blur
        stack[channel] = blur
        _derivative_features(blur, stack[channel + 1 : channel + 7])
        channel += len(PER_SIGMA_FEATURES)
    for a, b in _dog_pairs(sigmas):
        np.subtract(blurs[a], blurs[b], out=stack[channel])
        channel += 1
    responses = _membrane_responses_numpy(gray, membrane_kernels())
    _membrane_statistics_numpy(responses, stack[channel : channel + 6])
    return features


# --------------------------------------------------------------------------------------------------
# Torch backend (GPU when available)
# --------------------------------------------------------------------------------------------------
def _reflect_indices(length: int, pad: int) -> np.ndarray:
    """Indices implementing scipy's "reflect" (d c b a | a b c d | d c b a) padding of any width."""
    index = np.arange(-pad, length + pad) % (2 * length)
    return np.where(index >= length, 2 * length - 1 - index, index)


def _torch_pad(images, pad_y: int, pad_x: int):
    """Reflect-pad a (N, 1, H, W) tensor by any amount (torch's own reflect mode needs pad < size)."""
    import torch

    height, width = images.shape[-2:]
    rows = torch.as_tensor(_reflect_indices(height, pad_y), device=images.device)
    cols = torch.as_tensor(_reflect_indices(width, pad_x), device=images.device)
    return images.index_select(-2, rows).index_select(-1, cols)


def _torch_correlate_separable(images, kernel_y: np.ndarray | None, kernel_x: np.ndarray | None):
    """Correlate (N, 1, H, W) with a separable kernel using reflect borders."""
    import torch
    import torch.nn.functional as F

    result = images
    if kernel_y is not None:
        k = torch.as_tensor(kernel_y, dtype=images.dtype, device=images.device).view(1, 1, -1, 1)
        result = F.conv2d(_torch_pad(result, len(kernel_y) // 2, 0), k)
    if kernel_x is not None:
        k = torch.as_tensor(kernel_x, dtype=images.dtype, device=images.device).view(1, 1, 1, -1)
        result = F.conv2d(_torch_pad(result, 0, len(kernel_x) // 2), k)
    return result


def _classical_features_torch(gray: np.ndarray, sigmas: tuple[float, ...], device) -> np.ndarray:
    import torch
    import torch.nn.functional as F

    with torch.no_grad():
        image = torch.as_tensor(gray, dtype=torch.float32, device=device)[None, None]
        channels = []
        blurs = {}
        for sigma in sigmas:
            if sigma == 0:
                blur = image
            else:
                kernel = gaussian_kernel1d(sigma)
                blur = _torch_correlate_separable(image, kernel, kernel)
            blurs[sigma] = blur
            grad_x = _torch_correlate_separable(blur, _SMOOTH, _CENTRAL_DIFF)
            grad_y = _torch_correlate_separable(blur, _CENTRAL_DIFF, _SMOOTH)
            d_xx = _torch_correlate_separable(blur, None, _SECOND_DIFF)
            d_yy = _torch_correlate_separable(blur, _SECOND_DIFF, None)
            d_xy = _torch_correlate_separable(blur, _CENTRAL_DIFF, _CENTRAL_DIFF)
            hessian = [None] * 5
            _hessian_features(d_xx, d_yy, d_xy, hessian, torch)
            channels += [blur, torch.hypot(grad_x, grad_y), *hessian]
        channels += [blurs[a] - blurs[b] for a, b in _dog_pairs(sigmas)]

        kernels = torch.as_tensor(membrane_kernels(), device=device)[:, None]
        radius = kernels.shape[-1] // 2
        responses = F.conv2d(_torch_pad(image, radius, radius), kernels)[0]  # (30, H, W)
        ordered = torch.sort(responses, dim=0).values
        count = responses.shape[0]
        median = ordered[count // 2] if count % 2 else 0.5 * (ordered[count // 2 - 1] + ordered[count // 2])
        channels += [
            responses.mean(0)[None, None],
            ordered[-1][None, None],
            ordered[0][None, None],
            responses.sum(0)[None, None],
            responses.std(0, unbiased=False)[None, None],
            median[None, None],
        ]
        stack = torch.cat([c.reshape(1, *gray.shape) for c in channels], dim=0)
        return stack.permute(1, 2, 0).contiguous().cpu().numpy()


# --------------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------------
def _resolve_backend(backend: str, device) -> tuple[str, object]:
    if backend not in ("auto", "numpy", "torch"):
        raise ValueError(f"backend must be one of 'auto', 'numpy', 'torch', got {backend!r}")
    if backend == "numpy":
        return "numpy", None
    try:
        import torch
    except ImportError:
        if backend == "torch":
            raise
        return "numpy", None
    if backend == "auto":
        if device is None and torch.cuda.is_available():
            return "torch", torch.device("cuda")
        if device is not None and torch.device(device).type != "cpu":
            return "torch", torch.device(device)
        return "numpy", None
    return "torch", torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))


def classical_features(
    image: np.ndarray,
    sigmas: Sequence[float] = DEFAULT_SIGMAS,
    backend: str = "auto",
    device=None,
    scaling: str = "range",
) -> np.ndarray:
    """Compute the classical feature stack of one image.

    Args:
        image: (H, W) grayscale or (H, W, 3|4) colour image (reduced to luma), any numeric dtype;
            scaled to [0, 1] as described in :func:`prepare_image`.
        sigmas: Gaussian scales; 0 means the unblurred image. See the module docstring for the layout.
        backend: ``"numpy"`` (scipy, CPU), ``"torch"`` (torch convolutions on ``device``, default CUDA
            when available else CPU) or ``"auto"`` (torch on a GPU when one is available or ``device``
            names one, else numpy).
        device: torch device for the torch backend.
        scaling: ``"range"``, ``"dtype"`` or ``"minmax"``, see :func:`prepare_image`.

    Returns:
        float32 array (H, W, C) with ``C = n_features(sigmas)`` (58 by default); channel ``i`` is
        ``feature_names(sigmas)[i]``.
    """
    sigmas = _check_sigmas(sigmas)
    gray = prepare_image(image, scaling=scaling)
    backend, torch_device = _resolve_backend(backend, device)
    if backend == "torch":
        return _classical_features_torch(gray, sigmas, torch_device)
    return _classical_features_numpy(gray, sigmas)
