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


def brightness_data(count: int = 160, size: int = 8) -> dict:
    """A user's data factory (``data.name: tests.tiny:brightness_data``): images and their
    mean brightness, as a mapping of Datasets."""
    import torch
    from torch.utils.data import TensorDataset

    generator = torch.Generator().manual_seed(0)
    images = torch.rand(count, 1, size, size, generator=generator)
    targets = images.mean((1, 2, 3))
    third = count // 4
    return {
        "train": TensorDataset(images[: 2 * third], targets[: 2 * third]),
        "calibration": TensorDataset(images[2 * third : 3 * third], targets[2 * third : 3 * third]),
        "test": TensorDataset(images[3 * third :], targets[3 * third :]),
    }


def mae_task():
    """A user's task factory (``data.task: tests.tiny:mae_task``): squared-error loss,
    mean absolute error per example (so the drop pairs examples), lower is better."""
    from torch.nn import functional as F

    from compress.spec.tasks import Custom

    def mae(output, target):
        return (output - target).abs().mean().item()

    mae.per_example = lambda output, target: (output - target).abs().detach().cpu().numpy()
    return Custom(loss=F.mse_loss, metric=mae, name="MAE", unit="", higher_is_better=False)


def tiny_regressor(num_classes: int = 1, in_channels: int = 1) -> nn.Module:
    """One number per image (``num_classes`` is what compress hands every factory)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 1),
        nn.Flatten(0),
    )
