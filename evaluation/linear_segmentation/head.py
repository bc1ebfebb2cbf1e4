"""The probe head (BatchNorm + 1x1 linear classifier on patch features) and its loss.

Bilinear upsampling and the 1x1 classifier are both linear (the upsampling weights sum to one), so upsampling
the logits equals upsampling the features and then classifying: the head does the former, which needs
``num_classes`` instead of ``C`` channels at full resolution. BatchNorm statistics are taken over patch tokens.
Scores come from :mod:`evaluation.metrics` (classes 0 .. K-1, the ignore index unscored).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LinearSegmentationHead(nn.Module):
    """BatchNorm + 1x1 linear classifier on patch features; logits upsampled bilinearly to the label size."""

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        self.norm = nn.BatchNorm2d(in_channels)
        self.classifier = nn.Conv2d(in_channels, num_classes, kernel_size=1)

    def forward(self, features: torch.Tensor, output_size: tuple[int, int] | None = None) -> torch.Tensor:
        """(B, C, h, w) features -> (B, K, h, w) logits, or (B, K, *output_size) when given."""
        logits = self.classifier(self.norm(features.to(self.classifier.weight.dtype)))
        if output_size is not None and tuple(logits.shape[-2:]) != tuple(output_size):
            logits = F.interpolate(logits, size=tuple(output_size), mode="bilinear", align_corners=False)
        return logits


def make_segmentation_head(in_channels: int, num_classes: int, seed: int = 0) -> LinearSegmentationHead:
    """A head with small normal weights (std 0.01) and zero bias, drawn from its own seeded generator."""
    head = LinearSegmentationHead(in_channels, num_classes)
    generator = torch.Generator().manual_seed(int(seed))
    with torch.no_grad():
        head.classifier.weight.copy_(torch.randn(head.classifier.weight.shape, generator=generator) * 0.01)
        head.classifier.bias.zero_()
    return head


def segmentation_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    """Cross-entropy over labelled pixels; 0 (with gradient) for a batch without any."""
    labels = labels.long()
    if not bool((labels != ignore_index).any()):
        return logits.sum() * 0.0  # cross_entropy would return NaN for an empty mean
    return F.cross_entropy(logits.float(), labels, ignore_index=ignore_index)
