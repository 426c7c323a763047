"""A tiny CNN for fast tests, reachable from recipes as ``tests.tiny:tiny_cnn``."""

from torch import nn


def tiny_cnn(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    """Two conv blocks and a linear head: ~60k parameters, trains in seconds on 28x28."""
    return nn.Sequential(
        nn.Conv2d(in_channels, 32, 3, padding=1, bias=False),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1, bias=False),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3, padding=1, bias=False),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, num_classes),
    )


def tiny_segmenter(num_classes: int = 11, in_channels: int = 1) -> nn.Module:
    """Per-pixel logits at the input's size: three strided or dilated conv blocks (a
    garment-sized receptive field), a 1x1 classifier and an upsampling; ~60k parameters."""
    return nn.Sequential(
        nn.Conv2d(in_channels, 32, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.Conv2d(32, 64, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.Conv2d(64, 64, 3, padding=2, dilation=2, bias=False),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.Conv2d(64, num_classes, 1),
        nn.Upsample(scale_factor=4, mode="bilinear", align_corners=False),
    )
