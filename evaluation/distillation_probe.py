"""The positional probe a distillation run reports: how much of the held-out images' patch positions a linear probe
recovers from the student (and the teacher), and which teacher channels are the most positional.

:class:`DistillationProbe` is what `train_distill.py` hands to :func:`alibi_dinov2.training.distillation.train`
(the training library does not import the evaluation package):

    result = distillation.train(args, monitor=DistillationProbe())

Its R^2 is the one `alibi-probe` computes on the same images (the project's :data:`PROBE_PROTOCOL`: same samplings,
same minimum sample count).
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np

from alibi_dinov2.features.extraction import extract_patch_features
from evaluation.positional_probe import PROBE_PROTOCOL, ProbeProtocol, most_positional_channels


logger = logging.getLogger(__name__)

# `--blank_channels auto` ranks channels by their best per-channel R^2 over these ramps.
CHANNEL_PROBE_RAMPS = ("lr", "ud", "radial")
PROBE_RAMP = "lr+ud"


class DistillationProbe:
    """The positional probe of a distillation run, on `(H, W, 3)` float images in [0, 1].

    Args:
        protocol: how each image is probed (default: the project's, as `alibi-probe` uses).
    """

    def __init__(self, protocol: ProbeProtocol = PROBE_PROTOCOL):
        self.protocol = protocol

    def check_grid(self, image_size: int, patch_size: int) -> None:
        """Warn when `image_size` px images give too few sampled patches for a meaningful R^2."""
        grid = image_size // patch_size
        if not self.protocol.can_probe(grid, grid):
            logger.warning(
                "--probe_image_size %d gives a %d x %d grid: the probe samples only %d patches (step %d, fewer than "
                "%d), too few for a meaningful R^2; use at least %d px.",
                image_size, grid, grid, self.protocol.n_samples(grid, grid), self.protocol.step,
                self.protocol.min_samples, self.protocol.min_grid_side() * patch_size,
            )  # fmt: skip

    def channel_scores(self, model, images: Sequence[np.ndarray]) -> np.ndarray:
        """`(C,)`: per output channel of `model`, the best per-channel probe R^2 over :data:`CHANNEL_PROBE_RAMPS`
        (the first sampling of each image), averaged over `images`."""
        scores = []
        for index, image in enumerate(images):
            features = extract_patch_features(model, image)  # (h, w, C)
            per_ramp = [self.protocol.per_channel_probe(features, ramp, index, 0) for ramp in CHANNEL_PROBE_RAMPS]
            scores.append(np.max(per_ramp, axis=0))
        return np.mean(scores, axis=0)

    def most_positional_channels(self, scores: np.ndarray, count: int) -> list[int]:
        """The `count` highest-scoring channels, in index order."""
        return sorted(int(channel) for channel in most_positional_channels(scores, count))

    def r2(self, model, images: Sequence[np.ndarray]) -> float:
        """Mean lr+ud positional-probe R^2 of `model`'s patch features over `images` x the protocol's samplings
        (images with too small a grid left out, NaN when none is left)."""
        scores = []
        for index, image in enumerate(images):
            features = extract_patch_features(model, image)
            if not self.protocol.can_probe(*features.shape[:2]):
                continue
            for repeat in range(self.protocol.repeats):
                scores.append(self.protocol.linear_probe(features, PROBE_RAMP, index, repeat))
        return float(np.mean(scores)) if scores else float("nan")
