"""Datasets read from a folder the recipe's ``data.root`` names: CIFAR-10 (its Python
batches), ImageFolder (one sub-folder per class), Pascal VOC segmentation (voc.py) and COCO
detection (coco.py). Nothing is fetched unless ``data.download: true`` (CIFAR-10 only)."""

from __future__ import annotations

from pathlib import Path

import torchvision
from torchvision import transforms

from compress.core.errors import DataError
from compress.core.registry import register_dataset
from compress.data.coco import BoxTransform, read_coco
from compress.data.voc import PairTransform, read_voc
from compress.spec.recipe import DataConfig

_IMAGENET = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}


@register_dataset(
    "cifar10",
    channels=3,
    train_images=50_000,
    size=32,
    mean=(0.4914, 0.4822, 0.4465),
    std=(0.2470, 0.2435, 0.2616),
)
def cifar10(config: DataConfig, mean: list[float], std: list[float], seed: int):
    """CIFAR-10 under data.root: 32x32 colour images, 10 classes."""
    root, transform = _root(config), _transform(config, mean, std)
    try:
        train = torchvision.datasets.CIFAR10(str(root), True, transform, download=config.download)
        test = torchvision.datasets.CIFAR10(str(root), False, transform, download=config.download)
    except RuntimeError as error:  # torchvision's "Dataset not found or corrupted"
        raise DataError(
            f"cifar10 not readable under data.root={str(root)!r}: {error}."
            " Fix the path, or set data.download: true"
        ) from None
    return train, test, 10


@register_dataset("imagefolder", channels=3, **_IMAGENET)  # ImageNet's statistics
def imagefolder(config: DataConfig, mean: list[float], std: list[float], seed: int):
    """Images under data.root/train/<class>/ and data.root/test/ (or val/)."""
    root, transform = _root(config), _transform(config, mean, std)
    test_dir = next((root / d for d in ("test", "val") if (root / d).is_dir()), None)
    if not (root / "train").is_dir() or test_dir is None:
        raise DataError(
            f"data.root={str(root)!r} must hold train/ and test/ (or val/) folders"
            " with one sub-folder per class"
        )
    try:
        train = torchvision.datasets.ImageFolder(str(root / "train"), transform)
        test = torchvision.datasets.ImageFolder(str(test_dir), transform)
    except (RuntimeError, FileNotFoundError) as error:  # e.g. a class folder with no image
        raise DataError(
            f"imagefolder not readable under data.root={str(root)!r}: {error}"
        ) from None
    if test.classes != train.classes:  # else labels would be numbered differently
        only_train = sorted(set(train.classes) - set(test.classes))
        only_test = sorted(set(test.classes) - set(train.classes))
        raise DataError(
            f"data.root={str(root)!r}: {test_dir.name}/ and train/ must hold the same class"
            f" folders (only in train/: {only_train[:5] or 'none'};"
            f" only in {test_dir.name}/: {only_test[:5] or 'none'})"
        )
    return train, test, len(train.classes)


@register_dataset("voc", task="segmentation", **_IMAGENET)  # grey or colour: from the images
def voc(config: DataConfig, mean: list[float], std: list[float], seed: int):
    """Pascal VOC layout under data.root: JPEGImages/, SegmentationClass/ PNG masks, splits."""
    train, test, classes = read_voc(_root(config), config.classes)
    for split in (train, test):
        split.transform = PairTransform(mean, std, config.image_size)
    return train, test, classes


@register_dataset("coco", task="detection", **_IMAGENET)  # grey photos made RGB: BoxTransform
def coco(config: DataConfig, mean: list[float], std: list[float], seed: int):
    """COCO layout under data.root: annotations/instances_<split>.json and their images."""
    train, test, num_classes = read_coco(_root(config), config.image_size)
    for split in (train, test):
        split.transform = BoxTransform(mean, std, config.image_size)
    return train, test, num_classes


def _root(config: DataConfig) -> Path:
    if not config.root:
        raise DataError(
            f"data.root is required for data.name={config.name!r}: "
            "the folder that holds the dataset"
        )
    return Path(config.root).expanduser()


def _transform(config: DataConfig, mean: list[float], std: list[float]):
    """Resized and centre-cropped to data.image_size where set, then normalised."""
    steps = [transforms.Resize(config.image_size)] if config.image_size else []
    if config.image_size:
        steps.append(transforms.CenterCrop(config.image_size))
    return transforms.Compose([*steps, transforms.ToTensor(), transforms.Normalize(mean, std)])
