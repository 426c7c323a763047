"""Random images with random labels: for latency-only runs and tests, never accuracy."""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset

from compress.core.registry import register_dataset
from compress.spec.recipe import DataConfig


@register_dataset("synthetic", mean=(0.0,), std=(1.0,))  # its shape is the recipe's
def synthetic(config: DataConfig, mean: list[float], std: list[float], seed: int):
    """Random images, random labels (latency only): data.synthetic_size per split."""
    generator = torch.Generator().manual_seed(seed)
    channels, size = config.synthetic_channels, config.image_size or 28
    splits = []
    for count in (config.synthetic_size + config.calibration_size, config.synthetic_size):
        images = torch.randn(count, channels, size, size, generator=generator)
        labels = torch.randint(0, config.synthetic_classes, (count,), generator=generator)
        splits.append(TensorDataset(images, labels))
    return splits[0], splits[1], config.synthetic_classes
