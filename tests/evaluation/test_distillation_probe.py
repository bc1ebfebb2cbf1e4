"""The distillation run's positional probe: the project's protocol, its small-grid warning and its NaN."""

import logging

import numpy as np

from evaluation import distillation_probe
from evaluation.distillation_probe import DistillationProbe
from evaluation.positional_probe import ProbeProtocol


def test_probe_images_below_the_protocols_minimum_are_warned_about_with_the_size_to_use(caplog):
    probe = DistillationProbe()
    with caplog.at_level(logging.WARNING, logger=distillation_probe.__name__):
        probe.check_grid(266, 14)  # 19 x 19 patches: 10 samples at step 6, the minimum
        assert caplog.records == []
        probe.check_grid(252, 14)  # 18 x 18 patches: 9 samples
    (record,) = caplog.records
    assert "252 gives a 18 x 18 grid" in record.getMessage() and "only 9 patches" in record.getMessage()
    assert "use at least 266 px" in record.getMessage()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=distillation_probe.__name__):
        DistillationProbe(ProbeProtocol(step=3)).check_grid(252, 14)  # 36 samples at step 3
    assert caplog.records == []


def test_the_r2_leaves_out_images_the_protocol_cannot_probe(monkeypatch):
    def ramp_features(model, image, image_processor=None, layers="last"):
        height, width = image.shape[0] // 14, image.shape[1] // 14
        y, x = np.mgrid[0:height, 0:width].astype(np.float64)
        noise = np.random.default_rng(height).normal(size=(height, width, 6))
        return np.concatenate([x[..., None], y[..., None], noise], axis=-1)

    monkeypatch.setattr(distillation_probe, "extract_patch_features", ramp_features)
    probe = DistillationProbe(ProbeProtocol(repeats=2))
    large, small = np.zeros((280, 280, 3)), np.zeros((112, 112, 3))  # 20 x 20 and 8 x 8 patches
    assert probe.r2(None, [large]) > 0.9  # the ramps are channels 0 and 1 (about 0.94 with the Ridge penalty)
    assert probe.r2(None, [large, small]) == probe.r2(None, [large])
    assert np.isnan(probe.r2(None, [small]))
