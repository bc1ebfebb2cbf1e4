"""The positional probe a distillation run reports: how much of the held-out images' patch positions a linear probe
recovers from the student (and the teacher), and which teacher channels are the most positional.

:class:`DistillationProbe` is what `train_distill.py` hands to :func:`alibi_dinov2.training.distillation.train`
(the training library does not import the evaluation package):

    result = distillation.train(args, monitor=DistillationProbe())
"""

from __future__ import annotations

import logging
import math
from typing import Sequence

import numpy as np

from alibi_dinov2.features.extraction import extract_patch_features
from evaluation import positional_probe


logger = logging.getLogger(__name__)

# `--blank_channels auto` ranks channels by their best per-channel R^2 over these ramps.
CHANNEL_PROBE_RAMPS = ("lr", "ud", "radial")
# Positional probe protocol (paper Tables 1-2): step 6, random sampling, Ridge alpha 1, R^2 over all patches;
# 6 samplings per image, with fixed seeds so that successive evaluations differ only through the model.
PROBE_RAMP = "lr+ud"
PROBE_STEP = 6
PROBE_REPEATS = 6
MIN_SAMPLES = 8


class DistillationProbe:
    """The positional probe of a distillation run, on `(H, W, 3)` float images in [0, 1]."""

    def check_grid(self, image_size: int, patch_size: int) -> None:
        """Warn when `image_size` px images give too few sampled patches for a meaningful R^2."""
        grid = image_size // patch_size
        sampled = grid * grid // PROBE_STEP**2
        if sampled < MIN_SAMPLES:
            logger.warning(
                "--probe_image_size %d gives a %d x %d grid: the probe samples only %d patches (step %d), too few "
                "for a meaningful R^2; use at least %d px.",
                image_size, grid, grid, sampled, PROBE_STEP, math.ceil(math.sqrt(MIN_SAMPLES) * PROBE_STEP) * patch_size,
            )  # fmt: skip

    def channel_scores(self, model, images: Sequence[np.ndarray]) -> np.ndarray:
        """`(C,)`: per output channel of `model`, the best per-channel probe R^2 over :data:`CHANNEL_PROBE_RAMPS`,
        averaged over `images`."""
        scores = []
        for index, image in enumerate(images):
            features = extract_patch_features(model, image)  # (h, w, C)
            per_ramp = [
                positional_probe.per_channel_probe(
                    features, ramp, step=PROBE_STEP, sampling="random", alpha=1.0, holdout=False, seed=index
                )
                for ramp in CHANNEL_PROBE_RAMPS
            ]
            scores.append(np.max(per_ramp, axis=0))
        return np.mean(scores, axis=0)

    def most_positional_channels(self, scores: np.ndarray, count: int) -> list[int]:
        """The `count` highest-scoring channels, in index order."""
        return sorted(int(channel) for channel in positional_probe.most_positional_channels(scores, count))

    def r2(self, model, images: Sequence[np.ndarray]) -> float:
        """Mean lr+ud positional-probe R^2 of `model`'s patch features over `images` and :data:`PROBE_REPEATS`
        fixed samplings each."""
        scores = []
        for index, image in enumerate(images):
            features = extract_patch_features(model, image)
            for repeat in range(PROBE_REPEATS):
                seed = index * PROBE_REPEATS + repeat
                scores.append(
                    positional_probe.linear_probe(
                        features, ramp=PROBE_RAMP, step=PROBE_STEP, sampling="random", alpha=1.0, holdout=False,
                        seed=seed,
                    )
                )
        return float(np.mean(scores))
