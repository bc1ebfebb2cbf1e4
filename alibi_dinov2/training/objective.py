"""TODO docstring for alibi_dinov2.training.objective."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


LOSSES = ("cosine", "mse")


def random_patch_shifts(batch_size: int, grid_size: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """`(B, 2)` int64 shifts `(dy, dx)` in whole patches, uniform over the grid."""
    height, width = grid_size
    dy = torch.randint(0, height, (batch_size,), generator=generator)
    dx = torch.randint(0, width, (batch_size,), generator=generator)
    return torch.stack((dy, dx), dim=1)


def roll_generator(seed: int, epoch: int, batch_index: int, process_index: int) -> torch.Generator:
    """A generator fixed by the position in training, so that a resumed run rolls exactly as an unbroken one."""
    entropy = np.random.SeedSequence([seed, epoch, batch_index, process_index]).generate_state(2)
    return torch.Generator().manual_seed(int(entropy[0]) << 32 | int(entropy[1]))


def roll_by_patches(
    pixel_values: torch.Tensor, targets: torch.Tensor, shifts: torch.Tensor, patch_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Roll each image and its target cyclically by the same whole number of patches.

    Args:
        pixel_values: `(B, 3, h * p, w * p)`.
        targets: `(B, h * w, C)` patch tokens in row-major order.
        shifts: `(B, 2)` `(dy, dx)` in patches.
    Returns:
        The rolled `(pixel_values, targets)`; the patch at grid position (y, x) moves to
        ((y + dy) mod h, (x + dx) mod w) in both.
    """
    batch_size, _, height, width = pixel_values.shape
    grid_height, grid_width = height // patch_size, width // patch_size
    if (grid_height * patch_size, grid_width * patch_size) != (height, width):
        raise ValueError(
            f"Rolling by patches needs image sides that are multiples of {patch_size}; got {height} x {width}."
        )
    grid_targets = targets.reshape(batch_size, grid_height, grid_width, -1)
    rolled_images, rolled_targets = [], []
    for i, (dy, dx) in enumerate(shifts.tolist()):
        rolled_images.append(torch.roll(pixel_values[i], (dy * patch_size, dx * patch_size), dims=(1, 2)))
        rolled_targets.append(torch.roll(grid_targets[i], (dy, dx), dims=(0, 1)))
    return torch.stack(rolled_images), torch.stack(rolled_targets).reshape_as(targets)


def distillation_loss(
    student_tokens: torch.Tensor,
    target_tokens: torch.Tensor,
    sample_mask: torch.Tensor | None = None,
    kind: str = "cosine",
) -> torch.Tensor:
    """Distillation loss between `(B, N, C)` token sets.

    `cosine`: 1 - cosine similarity over channels per token; `mse`: mean squared error over channels per token.
    Averaged over tokens, then over the images with `sample_mask` True (unreadable images weigh 0).
    """
    student_tokens, target_tokens = student_tokens.float(), target_tokens.float()
    if kind == "cosine":
        per_token = 1.0 - F.cosine_similarity(student_tokens, target_tokens, dim=-1, eps=1e-8)
    elif kind == "mse":
        per_token = (student_tokens - target_tokens).pow(2).mean(dim=-1)
    else:
        raise ValueError(f"Unknown loss {kind!r}; choose from {', '.join(LOSSES)}.")
    per_image = per_token.mean(dim=1)
    if sample_mask is None:
        return per_image.mean()
    weights = sample_mask.to(per_image.dtype)
    # With no readable image the loss is 0 but still depends on the parameters, so every process joins the
    # gradient all-reduce of a distributed step.
    return (per_image * weights).sum() / weights.sum().clamp_min(1.0)

