"""Positional linear probe: how well do patch features predict where a patch sits in the image?

Protocol (paper Tables 1-2, Figs 2-3): over an ``h x w`` grid of patch features, pick a sparse set of
patches (``floor(h * w / step**2)`` at random, or every ``step``-th row and column), standardise the
features with the mean / std of those patches only, fit a Ridge regression (alpha = 1, with intercept)
from features to a positional ramp (left-right, up-down, ...) and report the R^2 of the prediction over
**all** ``h * w`` patches. Features with no positional information score about 0 or below; features
that encode position score close to 1.

Everything is closed-form numpy in float64 and matches a scikit-learn ``StandardScaler`` +
``Ridge(alpha)`` pipeline; :func:`per_channel_probe` fits every channel alone in one vectorised pass.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Sequence, Union

import numpy as np
from sklearn.base import BaseEstimator


SINGLE_RAMPS: tuple[str, ...] = ("lr", "ud", "diag", "radial", "random", "raster")
COMPOUND_RAMPS: dict[str, tuple[str, ...]] = {"lr+ud": ("lr", "ud")}
RAMPS: tuple[str, ...] = ("lr", "ud", "lr+ud", "diag", "radial", "random", "raster")
SAMPLINGS: tuple[str, ...] = ("random", "grid")

SeedLike = Union[None, int, np.random.Generator]

# Extra entropy word that separates the stream of the "random" ramp from the sampling stream, so that
# one integer seed gives independent sample positions and random targets.
_RAMP_STREAM = 0x52414D50


# Fewer sampled patches than this leave the Ridge fit underdetermined: the R^2 is noise (-3 +- 13 on small grids).
MIN_PROBE_SAMPLES = 10


# --------------------------------------------------------------------------------------------------
# The protocol
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ProbeProtocol:
    """How every positional R^2 of the project is measured: one object, so that the R^2 a distillation run logs,
    the one `alibi-probe` prints and the ones of reports and model cards are the same number.

    Attributes:
        step: about one patch in ``step**2`` is sampled for the fit (6 in the paper).
        sampling: ``"random"`` (the paper's) or ``"grid"`` (every ``step``-th row and column).
        alpha: Ridge penalty.
        holdout: score the patches left out of the fit only (default: all patches, the paper's R^2).
        repeats: samplings per image; the R^2 of an image set is the mean over images x repeats.
        seed: base seed of the samplings; image `i`'s repeat `r` uses :meth:`sampling_seed`, which depends on
            neither the model nor the other images, so that every model is probed on the same positions.
        min_samples: images whose grid gives fewer sampled patches are left out (their R^2 would be noise).
    """

    step: int = 6
    sampling: str = "random"
    alpha: float = 1.0
    holdout: bool = False
    repeats: int = 6
    seed: int = 0
    min_samples: int = MIN_PROBE_SAMPLES

    def __post_init__(self):
        if self.sampling not in SAMPLINGS:
            raise ValueError(f"sampling must be one of {SAMPLINGS}, got {self.sampling!r}")
        for name, low in (("step", 1), ("repeats", 1), ("min_samples", 1), ("alpha", 0)):
            if getattr(self, name) < low:
                raise ValueError(f"{name} must be >= {low}, got {getattr(self, name)}")

    def sampling_seed(self, image_index: int, repeat: int) -> int:
        """Seed of the `repeat`-th sampling of the `image_index`-th image of a set."""
        return int(np.random.SeedSequence([self.seed, image_index, repeat]).generate_state(1)[0])

    def n_samples(self, h: int, w: int) -> int:
        """Patches sampled from an ``h x w`` grid."""
        return n_samples(h, w, self.step, self.sampling)

    def can_probe(self, h: int, w: int) -> bool:
        """Whether an ``h x w`` grid gives at least :attr:`min_samples` sampled patches."""
        return self.n_samples(h, w) >= self.min_samples

    def min_grid_side(self) -> int:
        """Side of the smallest square grid that :meth:`can_probe`."""
        if self.sampling == "grid":
            return math.isqrt(self.min_samples - 1) * self.step + 1
        return math.isqrt(self.min_samples * self.step**2 - 1) + 1

    @property
    def score_name(self) -> str:
        return "R^2 over held-out patches" if self.holdout else "R^2 over all patches"

    def estimator(self, ramp: str, image_index: int = 0, repeat: int = 0) -> "PositionalProbe":
        """An unfitted :class:`PositionalProbe` of `ramp` for one sampling of the protocol."""
        seed = self.sampling_seed(image_index, repeat)
        return PositionalProbe(ramp, self.step, self.sampling, self.alpha, self.holdout, seed)

    def linear_probe(self, features: np.ndarray, ramp: str, image_index: int, repeat: int) -> float:
        """:func:`linear_probe` of one image's (h, w, C) features for one sampling of the protocol."""
        seed = self.sampling_seed(image_index, repeat)
        return linear_probe(features, ramp, self.step, self.sampling, self.alpha, self.holdout, seed)

    def per_channel_probe(self, features: np.ndarray, ramp: str, image_index: int, repeat: int) -> np.ndarray:
        """:func:`per_channel_probe` of one image's (h, w, C) features for one sampling of the protocol, (C,)."""
        seed = self.sampling_seed(image_index, repeat)
        return per_channel_probe(features, ramp, self.step, self.sampling, self.alpha, self.holdout, seed)

    def to_dict(self) -> dict:
        """JSON-ready fields (what results files record as their ``protocol``)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "ProbeProtocol":
        """The protocol a results file recorded (keys that are not fields, such as ``ramps``, are ignored)."""
        names = {field.name for field in fields(cls)}
        return cls(**{key: value for key, value in values.items() if key in names})


# The project's protocol: paper Tables 1-2 with 6 fixed samplings per image.
PROBE_PROTOCOL = ProbeProtocol()


# --------------------------------------------------------------------------------------------------
# Ramps and sampling
# --------------------------------------------------------------------------------------------------
def expand_ramps(ramps: Union[str, Sequence[str]]) -> tuple[str, ...]:
    """Ramp name(s) -> tuple of single ramp names (``"lr+ud"`` -> ``("lr", "ud")``)."""
    names = [ramps] if isinstance(ramps, str) else list(ramps)
    expanded: list[str] = []
    for name in names:
        if name in COMPOUND_RAMPS:
            expanded.extend(COMPOUND_RAMPS[name])
        elif name in SINGLE_RAMPS:
            expanded.append(name)
        else:
            raise ValueError(f"Unknown ramp {name!r}; choose from {', '.join(RAMPS)}")
    if not expanded:
        raise ValueError("No ramp given")
    return tuple(expanded)


def _ramp_rng(seed: SeedLike):
    """Random-ramp stream derived from `seed`, independent of the sampling stream of the same seed."""
    if seed is None or isinstance(seed, np.random.Generator):
        return seed
    return np.random.SeedSequence([int(seed), _RAMP_STREAM])


def _single_ramp(name: str, height: int, width: int, seed) -> np.ndarray:
    if name == "lr":
        return np.broadcast_to(np.linspace(0.0, 1.0, width)[None, :], (height, width)).copy()
    if name == "ud":
        return np.broadcast_to(np.linspace(0.0, 1.0, height)[:, None], (height, width)).copy()
    if name == "diag":
        # One shared axis so that a step costs the same along y and x on non-square grids.
        axis = np.linspace(0.0, 1.0, max(height, width))
        return (axis[:height, None] + axis[None, :width]) / 2.0
    if name == "radial":
        rows, cols = np.mgrid[0:height, 0:width]
        radius = np.hypot(rows - height // 2, cols - width // 2)
        r_max = radius.max()
        return 1.0 - radius / r_max if r_max > 0 else np.ones((height, width))
    if name == "random":
        return np.random.default_rng(seed).random((height, width))
    if name == "raster":
        return np.arange(height * width, dtype=np.float64).reshape(height, width) / (height * width)
    raise ValueError(f"Unknown ramp {name!r}; choose from {', '.join(RAMPS)}")


def make_ramp(name: str, h: int, w: int, seed: SeedLike = None) -> np.ndarray:
    """Positional target over an h x w patch grid, values in [0, 1].

    * ``lr``: ``linspace(0, 1, w)`` along x (constant down each column); ``ud``: likewise along y.
    * ``diag``: ``(a[y] + a[x]) / 2`` with ``a = linspace(0, 1, max(h, w))``.
    * ``radial``: ``1 - r / r_max``, r the distance to patch ``(h // 2, w // 2)``.
    * ``random``: uniform noise from ``numpy.random.default_rng(seed)`` (the control).
    * ``raster``: row-major index / (h * w).
    * ``lr+ud``: both ``lr`` and ``ud``.

    Returns:
        float64 array (h, w) for a single ramp, (h, w, 2) for ``"lr+ud"`` (lr first).
    """
    if h < 1 or w < 1:
        raise ValueError(f"Grid must be at least 1 x 1, got {h} x {w}")
    names = expand_ramps(name)
    if len(names) == 1:
        return _single_ramp(names[0], h, w, seed)
    rng = np.random.default_rng(seed) if "random" in names else None
    return np.stack([_single_ramp(single, h, w, rng) for single in names], axis=-1)


def ramp_targets(ramps: Union[str, Sequence[str]], h: int, w: int, seed: SeedLike = None) -> np.ndarray:
    """Targets of one or several ramps as an (h * w, T) matrix, in :func:`expand_ramps` order.

    `seed` is the probe's seed: the ``random`` ramp draws from a stream derived from it that is
    independent of :func:`sample_positions` with the same seed.
    """
    rng = np.random.default_rng(_ramp_rng(seed)) if seed is not None else None
    columns = [_single_ramp(name, h, w, rng).reshape(-1) for name in expand_ramps(ramps)]
    return np.stack(columns, axis=1)


# What an R^2 of the positional probe says, in the words every report and page uses.
R2_SCALE = (
    "R^2 of a linear probe that predicts each patch's position from its features: 1 = position fully "
    "recoverable, 0 = no better than always guessing the mean position, below 0 = worse than that"
)
R2_MEANING = (
    f"{R2_SCALE} (shown as 0 in headlines, raw value beside it). The random ramp is a control that every model "
    "scores at or below about 0."
)


def describe_r2(r2: float) -> str:
    """The verdict on a positional R^2: `"encode position"` (>= 0.5), `"partly encode position"` (>= 0.1) or
    `"do not encode position"`; `"cannot be probed"` for NaN (too few patches)."""
    if not np.isfinite(r2):
        return "cannot be probed (too few patches)"
    return "encode position" if r2 >= 0.5 else "partly encode position" if r2 >= 0.1 else "do not encode position"


def n_random_samples(h: int, w: int, step: int) -> int:
    """Number of randomly sampled patches: ``floor(h * w / step**2)``."""
    return (h * w) // (step * step)


def n_samples(h: int, w: int, step: int = PROBE_PROTOCOL.step, sampling: str = PROBE_PROTOCOL.sampling) -> int:
    """Number of patches the probe fits on for an ``h x w`` grid (see :func:`sample_positions`)."""
    if sampling == "grid":
        return -(-h // step) * -(-w // step)
    return n_random_samples(h, w, step)


def sample_positions(
    h: int, w: int, step: int = PROBE_PROTOCOL.step, sampling: str = PROBE_PROTOCOL.sampling, seed: SeedLike = None
) -> np.ndarray:
    """Flat (row-major) indices of the patches used to fit the probe.

    Args:
        h, w: grid size.
        step: 6 in the paper (about 1 patch in 36).
        sampling: ``"random"``: ``floor(h * w / step**2)`` positions drawn uniformly without
            replacement from ``numpy.random.default_rng(seed)``; ``"grid"``: rows ``0, step, 2 step, ...``
            crossed with the same columns.

    Returns:
        int64 array (n,), sorted.
    """
    if step < 1:
        raise ValueError(f"step must be >= 1, got {step}")
    if sampling == "random":
        count = n_random_samples(h, w, step)
        if count < 1:
            raise ValueError(f"A {h} x {w} grid gives no sample at step {step}; use a smaller step")
        rng = np.random.default_rng(seed)
        return np.sort(rng.choice(h * w, size=count, replace=False)).astype(np.int64)
    if sampling == "grid":
        rows = np.arange(0, h, step)
        cols = np.arange(0, w, step)
        return (rows[:, None] * w + cols[None, :]).reshape(-1).astype(np.int64)
    raise ValueError(f"sampling must be one of {SAMPLINGS}, got {sampling!r}")


# --------------------------------------------------------------------------------------------------
# Closed-form pieces (StandardScaler, Ridge, R^2 with scikit-learn's conventions)
# --------------------------------------------------------------------------------------------------
def _as_grid(features: np.ndarray) -> np.ndarray:
    features = np.asarray(features)
    if features.ndim != 3:
        raise ValueError(f"features must be an (h, w, C) grid, got shape {features.shape}")
    return features


def standardisation(samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and scale like ``StandardScaler``: population std, near-constant columns get scale 1.

    Args:
        samples: (n, C) float64.

    Returns:
        mean (C,), scale (C,).
    """
    n_samples = samples.shape[0]
    mean = samples.mean(axis=0)
    variance = samples.var(axis=0)
    # scikit-learn's bound on the rounding error of the two-pass variance: below it a column is constant.
    eps = np.finfo(np.float64).eps
    constant = variance <= n_samples * eps * variance + (n_samples * mean * eps) ** 2
    scale = np.sqrt(variance)
    scale[constant] = 1.0
    return mean, scale


def ridge_fit(
    design: np.ndarray, targets: np.ndarray, alpha: float = PROBE_PROTOCOL.alpha
) -> tuple[np.ndarray, np.ndarray]:
    """Ridge regression with an (unpenalised) intercept, closed form.

    Args:
        design: (n, C); targets: (n, T); alpha >= 0.

    Returns:
        coef (C, T), intercept (T,).
    """
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")
    design_mean = design.mean(axis=0)
    target_mean = targets.mean(axis=0)
    centred = design - design_mean
    centred_targets = targets - target_mean
    n_samples, n_features = centred.shape
    if alpha == 0:
        coef = np.linalg.lstsq(centred, centred_targets, rcond=None)[0]
    elif n_features <= n_samples:
        gram = centred.T @ centred
        gram[np.diag_indices_from(gram)] += alpha
        coef = np.linalg.solve(gram, centred.T @ centred_targets)
    else:
        # Fewer samples than channels (the usual case at step 6): the n x n dual system is smaller.
        kernel = centred @ centred.T
        kernel[np.diag_indices_from(kernel)] += alpha
        coef = centred.T @ np.linalg.solve(kernel, centred_targets)
    intercept = target_mean - design_mean @ coef
    return coef, intercept


def r2_scores(targets: np.ndarray, predictions: np.ndarray) -> np.ndarray:
    """Coefficient of determination along axis 0, like ``sklearn.metrics.r2_score``.

    A constant target scores 1 when predicted exactly and 0 otherwise (scikit-learn's force_finite).

    Args:
        targets: (n, ...) ; predictions: broadcastable to targets' shape.

    Returns:
        array of shape targets.shape[1:] (or the broadcast shape).
    """
    residual = ((targets - predictions) ** 2).sum(axis=0)
    total = ((targets - targets.mean(axis=0)) ** 2).sum(axis=0)
    total, residual = np.broadcast_arrays(total, residual)
    scores = np.zeros(residual.shape)
    defined = total != 0
    scores[defined] = 1.0 - residual[defined] / total[defined]
    scores[~defined & (residual == 0)] = 1.0
    return scores


def _evaluation_index(n_positions: int, sample_index: np.ndarray, holdout: bool) -> np.ndarray:
    if not holdout:
        return np.arange(n_positions)
    mask = np.ones(n_positions, dtype=bool)
    mask[sample_index] = False
    if not mask.any():
        raise ValueError("holdout=True but every patch was sampled for the fit")
    return np.flatnonzero(mask)


# --------------------------------------------------------------------------------------------------
# Estimator
# --------------------------------------------------------------------------------------------------
class PositionalProbe(BaseEstimator):
    """Ridge probe from patch features to positional ramps, scikit-learn style.

    Parameters:
        ramp: a name of :data:`RAMPS` or a sequence of names (fitted jointly, one output per ramp).
        step: sampling step (6 in the paper).
        sampling: ``"random"`` or ``"grid"``.
        alpha: Ridge penalty.
        holdout: score on the patches not used for the fit only (default: all patches, the paper's R^2).
        seed: seed of the sample positions (and, independently, of the ``random`` ramp).

    Attributes after :meth:`fit`:
        ramps_ (T names), grid_shape_ (h, w), sample_index_ (n,), mean_ (C,), scale_ (C,),
        coef_ (C, T), intercept_ (T,), targets_ (h * w, T).

    Example:
        >>> PositionalProbe("lr+ud", step=6).fit(features).score(features)  # features (h, w, C)
    """

    def __init__(
        self,
        ramp="lr+ud",
        step=PROBE_PROTOCOL.step,
        sampling=PROBE_PROTOCOL.sampling,
        alpha=PROBE_PROTOCOL.alpha,
        holdout=PROBE_PROTOCOL.holdout,
        seed=None,
    ):
        self.ramp = ramp
        self.step = step
        self.sampling = sampling
        self.alpha = alpha
        self.holdout = holdout
        self.seed = seed

    def fit(self, features: np.ndarray, y=None) -> "PositionalProbe":
        """Sample patches of an (h, w, C) grid, standardise on them and fit the Ridge. `y` is ignored."""
        grid = _as_grid(features)
        height, width, n_channels = grid.shape
        flat = np.asarray(grid.reshape(-1, n_channels), dtype=np.float64)
        self.ramps_ = expand_ramps(self.ramp)
        self.grid_shape_ = (height, width)
        # A shared Generator is consumed in a fixed order: sample positions first, then the ramp.
        self.sample_index_ = sample_positions(height, width, self.step, self.sampling, self.seed)
        self.targets_ = ramp_targets(self.ramps_, height, width, self.seed)
        samples = flat[self.sample_index_]
        self.mean_, self.scale_ = standardisation(samples)
        self.coef_, self.intercept_ = ridge_fit(
            (samples - self.mean_) / self.scale_, self.targets_[self.sample_index_], self.alpha
        )
        return self

    def _check_fitted(self) -> None:
        if not hasattr(self, "coef_"):
            raise RuntimeError("PositionalProbe is not fitted yet; call fit(features) first")

    def predict(self, features: np.ndarray) -> np.ndarray:
        """Predicted ramps, (h, w, T), for an (h, w, C) grid with the fitted channel count."""
        self._check_fitted()
        grid = _as_grid(features)
        flat = np.asarray(grid.reshape(-1, grid.shape[-1]), dtype=np.float64)
        # Standardisation folded into the weights: no (h * w, C) temporary.
        weights = self.coef_ / self.scale_[:, None]
        prediction = flat @ weights + (self.intercept_ - self.mean_ @ weights)
        return prediction.reshape(grid.shape[0], grid.shape[1], -1)

    def score_per_ramp(self, features: np.ndarray) -> np.ndarray:
        """R^2 of each ramp, (T,), over all patches (or the held-out ones with ``holdout=True``).

        `features` must be the fitted grid (same h, w): the sample positions and targets are reused.
        """
        self._check_fitted()
        grid = _as_grid(features)
        if grid.shape[:2] != self.grid_shape_:
            raise ValueError(f"Probe was fitted on a {self.grid_shape_} grid, got {grid.shape[:2]}")
        prediction = self.predict(grid).reshape(-1, len(self.ramps_))
        index = _evaluation_index(prediction.shape[0], self.sample_index_, self.holdout)
        return r2_scores(self.targets_[index], prediction[index])

    def score(self, features: np.ndarray, y=None) -> float:
        """Mean R^2 over the ramps (for ``"lr+ud"`` the mean of the two). `y` is ignored."""
        return float(np.mean(self.score_per_ramp(features)))


# --------------------------------------------------------------------------------------------------
# Functional entry points
# --------------------------------------------------------------------------------------------------
def linear_probe(
    features: np.ndarray,
    ramp: str = "lr+ud",
    step: int = PROBE_PROTOCOL.step,
    sampling: str = PROBE_PROTOCOL.sampling,
    alpha: float = PROBE_PROTOCOL.alpha,
    holdout: bool = PROBE_PROTOCOL.holdout,
    seed: SeedLike = None,
) -> float:
    """Positional R^2 of an (h, w, C) feature grid (the paper's table number for one sampling).

    For ``"lr+ud"`` the mean of the lr and ud R^2 (one Ridge with two outputs, identical to two fits).
    """
    probe = PositionalProbe(ramp=ramp, step=step, sampling=sampling, alpha=alpha, holdout=holdout, seed=seed)
    return probe.fit(features).score(features)


def stack_probe(
    features: np.ndarray,
    ramps: Sequence[str] = ("lr", "ud"),
    step: int = PROBE_PROTOCOL.step,
    sampling: str = PROBE_PROTOCOL.sampling,
    alpha: float = PROBE_PROTOCOL.alpha,
    holdout: bool = PROBE_PROTOCOL.holdout,
    seed: SeedLike = None,
) -> dict[str, float]:
    """Multi-output probe: one Ridge fitted to several ramps at once on the same sampled patches.

    Returns:
        {ramp name: R^2 for each single ramp (compound names expanded), "mean": their mean}.
    """
    probe = PositionalProbe(ramp=tuple(ramps), step=step, sampling=sampling, alpha=alpha, holdout=holdout, seed=seed)
    scores = probe.fit(features).score_per_ramp(features)
    result = {name: float(score) for name, score in zip(probe.ramps_, scores)}
    result["mean"] = float(np.mean(scores))
    return result


def per_channel_probe(
    features: np.ndarray,
    ramp: str = "lr",
    step: int = PROBE_PROTOCOL.step,
    sampling: str = PROBE_PROTOCOL.sampling,
    alpha: float = PROBE_PROTOCOL.alpha,
    holdout: bool = PROBE_PROTOCOL.holdout,
    seed: SeedLike = None,
) -> np.ndarray:
    """R^2 of the probe fitted on each channel alone, all channels at once.

    Same protocol as :func:`linear_probe` (same positions for a given seed); a compound ramp gives the
    mean over its ramps. Each one-feature Ridge has the closed form
    ``coef = sum(x_c y_c) / (sum(x_c**2) + alpha)`` on centred standardised samples.

    Returns:
        float64 array (C,).
    """
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")
    grid = _as_grid(features)
    height, width, n_channels = grid.shape
    flat = np.asarray(grid.reshape(-1, n_channels), dtype=np.float64)
    names = expand_ramps(ramp)
    sample_index = sample_positions(height, width, step, sampling, seed)
    targets = ramp_targets(names, height, width, seed)  # (N, T)

    mean, scale = standardisation(flat[sample_index])
    coef, intercept = _one_feature_ridges((flat[sample_index] - mean) / scale, targets[sample_index], alpha)
    index = _evaluation_index(flat.shape[0], sample_index, holdout)
    evaluated = flat if not holdout else flat[index]
    scores = _one_feature_r2(evaluated, targets[index], mean, scale, coef, intercept)
    return scores.mean(axis=1)


def _one_feature_ridges(design: np.ndarray, targets: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """Ridge with intercept of every target on every column of `design` alone.

    Args:
        design: (n, C) standardised samples; targets: (n, T).

    Returns:
        coef (C, T), intercept (C, T).
    """
    design_mean = design.mean(axis=0)  # ~0 after standardisation, kept for exactness
    centred = design - design_mean
    target_mean = targets.mean(axis=0)
    denominator = (centred**2).sum(axis=0) + alpha  # (C,)
    with np.errstate(invalid="ignore", divide="ignore"):
        coef = (centred.T @ (targets - target_mean)) / denominator[:, None]
    coef[~np.isfinite(coef)] = 0.0  # alpha == 0 on a constant channel: no slope, like lstsq
    intercept = target_mean[None, :] - design_mean[:, None] * coef
    return coef, intercept


def _one_feature_r2(
    evaluated: np.ndarray,
    targets: np.ndarray,
    mean: np.ndarray,
    scale: np.ndarray,
    coef: np.ndarray,
    intercept: np.ndarray,
) -> np.ndarray:
    """R^2 of each one-channel prediction ``a + b z``, z = (x - mean) / scale, over the evaluated patches.

    Computed from sufficient statistics instead of forming the (N', C, T) predictions. With E the
    evaluated patches, z' = z - mean_E(z) and y' = y - mean_E(y):
    ``SS_res = S_yy - 2 b S_zy + b^2 S_zz + |E| (mean_E(y) - a - b mean_E(z))^2`` and ``SS_tot = S_yy``,
    all sums over centred values, which keeps it as accurate as the direct formula.

    Args:
        evaluated: (N', C) raw features; targets: (N', T); mean, scale: (C,); coef, intercept: (C, T).

    Returns:
        (C, T) R^2, with scikit-learn's convention for constant targets.
    """
    n_evaluated = evaluated.shape[0]
    evaluated_mean = evaluated.mean(axis=0)
    centred = evaluated - evaluated_mean  # (N', C)
    target_mean = targets.mean(axis=0)  # (T,)
    centred_targets = targets - target_mean  # (N', T)
    s_zy = (centred.T @ centred_targets) / scale[:, None]  # (C, T)
    s_zz = np.einsum("ij,ij->j", centred, centred) / scale**2  # (C,)
    s_yy = (centred_targets**2).sum(axis=0)  # (T,)
    z_mean = (evaluated_mean - mean) / scale  # (C,)
    offset = target_mean[None, :] - intercept - coef * z_mean[:, None]  # (C, T)
    residual = s_yy[None, :] - 2.0 * coef * s_zy + coef**2 * s_zz[:, None] + n_evaluated * offset**2
    residual = np.maximum(residual, 0.0)  # rounding can dip an exact fit below zero

    scores = np.zeros_like(residual)
    defined = np.broadcast_to(s_yy[None, :] != 0, residual.shape)
    scores[defined] = 1.0 - (residual / np.where(s_yy == 0, 1.0, s_yy)[None, :])[defined]
    # A constant target (a one-patch-wide grid): 1 when predicted exactly, like scikit-learn.
    tolerance = (n_evaluated * np.finfo(np.float64).eps) ** 2 * max(1.0, float(np.abs(target_mean).max()) ** 2)
    scores[~defined & (residual <= tolerance)] = 1.0
    return scores


def layer_fingerprint(
    layer_features: Union[np.ndarray, Sequence[np.ndarray]],
    ramp: str = "lr",
    step: int = PROBE_PROTOCOL.step,
    sampling: str = PROBE_PROTOCOL.sampling,
    alpha: float = PROBE_PROTOCOL.alpha,
    holdout: bool = PROBE_PROTOCOL.holdout,
    seed: SeedLike = None,
) -> np.ndarray:
    """Per-channel R^2 of every layer: the channels x layers fingerprint of a model.

    Args:
        layer_features: (L, h, w, C) stack (e.g. ``extract_patch_features(..., layers="all")``), or a
            sequence of such stacks of several images (grids may differ), averaged over images.
        seed: the same positions are sampled in every layer of an image.

    Returns:
        float64 array (C, L).
    """
    stacks = [layer_features] if isinstance(layer_features, np.ndarray) else list(layer_features)
    if not stacks:
        raise ValueError("No layer features given")
    fingerprints = []
    for stack in stacks:
        stack = np.asarray(stack)
        if stack.ndim != 4:
            raise ValueError(f"layer features must be (L, h, w, C), got shape {stack.shape}")
        # One integer seed per image, reused in every layer, so that all layers see the same positions.
        layer_seed = seed if isinstance(seed, (int, np.integer)) else int(np.random.default_rng(seed).integers(2**63))
        fingerprints.append(
            np.stack(
                [per_channel_probe(layer, ramp, step, sampling, alpha, holdout, layer_seed) for layer in stack],
                axis=1,
            )
        )
    if len({fingerprint.shape for fingerprint in fingerprints}) != 1:
        raise ValueError("All images must have the same number of layers and channels")
    return np.mean(fingerprints, axis=0)


def most_positional_channels(channel_scores: np.ndarray, k: int = 4) -> np.ndarray:
    """Indices of the k channels with the highest per-channel R^2, highest first."""
    channel_scores = np.asarray(channel_scores)
    return np.argsort(-channel_scores, kind="stable")[:k]


__all__ = [
    "COMPOUND_RAMPS",
    "RAMPS",
    "MIN_PROBE_SAMPLES",
    "PROBE_PROTOCOL",
    "R2_MEANING",
    "R2_SCALE",
    "SAMPLINGS",
    "SINGLE_RAMPS",
    "PositionalProbe",
    "ProbeProtocol",
    "describe_r2",
    "expand_ramps",
    "layer_fingerprint",
    "linear_probe",
    "make_ramp",
    "most_positional_channels",
    "n_random_samples",
    "n_samples",
    "per_channel_probe",
    "r2_scores",
    "ramp_targets",
    "ridge_fit",
    "sample_positions",
    "stack_probe",
    "standardisation",
]
