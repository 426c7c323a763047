"""Per-batch augmentation of the train split: random crops of padded images, flips and
random erasing, drawn from a seeded generator so that a resumed epoch draws the same;
per-pixel masks move with their images.
"""

from __future__ import annotations

import math

import torch
from torch import nn

# Random erasing (Zhong et al., 2020): half the images lose a rectangle of 2-33 % of their
# area, aspect 0.3-3.3, filled with 0 (the normalized data's mean), torchvision's defaults.
ERASE_PROBABILITY = 0.5


ERASE_AREA = (0.02, 0.33)


ERASE_ASPECT = (0.3, 3.3)


def augment(
    images: torch.Tensor,
    kind: str,
    padding: int = 4,
    generator: torch.Generator | None = None,
    masks: torch.Tensor | None = None,
):
    """A batch (N, C, H, W) augmented per image: ``kind`` is none or a ``_``-joined subset of
    crop, flip and erase, in that order (``crop_flip_erase``). Given per-pixel ``masks``
    (N, H, W), they are cropped and flipped with their images (not erased: an erased
    garment is still there) and ``(images, masks)`` is returned.

    Example:
        >>> augment(torch.rand(8, 1, 28, 28), "crop_flip_erase", padding=4).shape
        torch.Size([8, 1, 28, 28])
    """
    if kind == "none":
        return images if masks is None else (images, masks)
    if masks is not None:  # one more channel: moved exactly as the image's (exact in float)
        images = torch.cat([images, masks[:, None].to(images.dtype)], 1)
    n, channels, height, width = images.shape
    if "crop" in kind:
        padded = nn.functional.pad(images, (padding,) * 4, mode="replicate")
        shift_y, shift_x = torch.randint(0, 2 * padding + 1, (2, n, 1), generator=generator)
        rows = (shift_y + torch.arange(height))[:, None, :, None]
        columns = (shift_x + torch.arange(width))[:, None, None, :]
        images = padded[
            torch.arange(n)[:, None, None, None],
            torch.arange(channels)[:, None, None],
            rows,
            columns,
        ]
    if "flip" in kind:
        flipped = torch.rand(n, generator=generator) < 0.5
        images = torch.where(flipped[:, None, None, None], images.flip(3), images)
    if masks is not None:
        images, masks = images[:, :-1], images[:, -1].round().to(masks.dtype)
    if "erase" in kind:
        images = images.masked_fill(_erased(n, height, width, generator)[:, None], 0.0)
    return images if masks is None else (images, masks)


def _erased(n: int, height: int, width: int, generator: torch.Generator | None) -> torch.Tensor:
    """A (N, H, W) mask, True inside each image's erased rectangle (none in about half)."""
    chosen = torch.rand(n, generator=generator) < ERASE_PROBABILITY
    low, high = ERASE_AREA
    area = (low + (high - low) * torch.rand(n, generator=generator)) * height * width
    log_low, log_high = math.log(ERASE_ASPECT[0]), math.log(ERASE_ASPECT[1])
    aspect = torch.exp(log_low + (log_high - log_low) * torch.rand(n, generator=generator))
    rows = (area * aspect).sqrt().round().clamp(1, height)
    columns = (area / aspect).sqrt().round().clamp(1, width)
    top = (torch.rand(n, generator=generator) * (height - rows + 1)).floor()
    left = (torch.rand(n, generator=generator) * (width - columns + 1)).floor()
    y = torch.arange(height)[None, :, None]
    x = torch.arange(width)[None, None, :]
    inside_rows = (y >= top[:, None, None]) & (y < (top + rows)[:, None, None])
    inside_columns = (x >= left[:, None, None]) & (x < (left + columns)[:, None, None])
    return inside_rows & inside_columns & chosen[:, None, None]
