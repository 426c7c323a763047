"""Fashion-MNIST, read from its idx files (Debian's `dataset-fashion-mnist` package, or a
folder the recipe names), and the Fashion-MNIST scenes built from it (scenes.py): garments
on a canvas, labelled per pixel in the VOC layout (voc.py) that any segmentation folder
uses, and boxed in the COCO layout (coco.py) that any detection folder uses.
"""

from __future__ import annotations

import functools
import gzip
from pathlib import Path

import numpy as np
import torch
import torchvision
from torch.utils.data import TensorDataset

from compress.core.errors import DataError
from compress.core.paths import cache_dir
from compress.core.registry import register_dataset
from compress.data.coco import BoxTransform, read_coco
from compress.data.datasets import normalised
from compress.data.scenes import SCENES_CLASSES, write_scenes
from compress.data.voc import PairTransform, read_voc
from compress.spec.recipe import DataConfig

# Debian's `dataset-fashion-mnist` package installs the four idx files here.
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
_FASHION_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# Scenes `make setup` writes (and a run writes where they are missing: ~30 s, from the local
# Fashion-MNIST files): 12,000 train scenes from train garments, 2,000 test scenes from test
# garments.
SCENES_COUNTS = {"train": 12_000, "test": 2_000}


@register_dataset(
    "fashion_mnist", channels=1, train_images=60_000, size=28, mean=(0.2860,), std=(0.3530,)
)
def fashion_mnist(config: DataConfig, mean: list[float], std: list[float], seed: int):
    """Fashion-MNIST: 28x28 grey garments, 10 classes (Debian's dataset-fashion-mnist)."""
    folder = fashion_mnist_folder(config.root, config.download)
    splits = []
    for split in ("train", "test"):
        pixels, classes = fashion_mnist_split(folder, split)
        images = torch.from_numpy(pixels.copy()).unsqueeze(1)
        labels = torch.from_numpy(classes.astype(np.int64))
        if config.image_size and config.image_size != images.shape[-1]:
            images = torch.nn.functional.interpolate(
                images.float(), size=config.image_size, mode="bilinear", antialias=True
            )
        splits.append(TensorDataset(normalised(images, mean, std), labels))
    return splits[0], splits[1], 10


@register_dataset(
    "fashion_mnist_scenes",
    channels=1,
    train_images=SCENES_COUNTS["train"],
    size=64,
    mean=(0.1009,),  # measured on its train scenes
    std=(0.2516,),
    task="segmentation",
)
def scenes(config: DataConfig, mean: list[float], std: list[float], seed: int):
    """Fashion-MNIST scenes: 1-3 garments on a 64x64 canvas, 11 classes per pixel (make setup)."""
    train, test, classes = read_voc(
        fashion_mnist_scenes(config.root, config.download), SCENES_CLASSES
    )
    for split in (train, test):
        split.transform = PairTransform(mean, std, config.image_size)
    return train, test, classes


@register_dataset(
    "fashion_mnist_boxes",
    channels=1,
    train_images=SCENES_COUNTS["train"],
    size=64,
    mean=(0.1009,),  # the scenes' own: the same images
    std=(0.2516,),
    task="detection",
)
def boxes(config: DataConfig, mean: list[float], std: list[float], seed: int):
    """Fashion-MNIST scenes boxed: a box per visible garment, 10 classes + background."""
    train, test, num_classes = read_coco(
        fashion_mnist_scenes(config.root, config.download), config.image_size
    )
    for split in (train, test):
        split.transform = BoxTransform(mean, std, config.image_size)
    return train, test, num_classes


def scenes_root() -> Path:
    """Where Fashion-MNIST scenes live unless data.root says otherwise (the cache folder)."""
    return cache_dir() / "fashion_mnist_scenes"


def fashion_mnist_scenes(
    root: str | Path | None = None, download: bool = False, counts: dict | None = None
) -> Path:
    """The Fashion-MNIST scenes folder (VOC layout, and COCO boxes), written first where it
    is missing (the boxes alone where only they are); ``counts`` scenes per split (default
    :data:`SCENES_COUNTS`).

    Example:
        >>> train, test, classes = read_voc(fashion_mnist_scenes())
    """
    folder = fashion_mnist_folder(None, download)
    splits = {
        split: (*fashion_mnist_split(folder, split), count)
        for split, count in (counts or SCENES_COUNTS).items()
    }
    return write_scenes(Path(root).expanduser() if root else scenes_root(), splits)


def fashion_mnist_split(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """The images (N, 28, 28) and labels (N,) of Fashion-MNIST's ``split`` as uint8 arrays."""
    found = [_find_idx(folder, stem) for stem in _FASHION_FILES[split]]
    if found[0] is None or found[1] is None:
        raise DataError(f"{folder}: Fashion-MNIST's {split} files are not all there")
    return _read_idx(found[0]), _read_idx(found[1])


# Fashion-MNIST's training images are 47 MB; an idx file announcing more than this is not
# one this toolkit reads whole into memory.
MAX_IDX_BYTES = 1 << 31


def _read_idx(path: Path) -> np.ndarray:
    """Read an idx file (optionally gzipped): big-endian header, then uint8 data (a
    read-only array, kept for the process while the file's size and time are unchanged:
    inflating the training images takes ~0.4 s, and a run builds its data more than once).

    The header is checked before the body is read, and no more bytes than it announces
    are read (or inflated): a small gzip file cannot make this read gigabytes.
    """
    try:
        stat = path.stat()
    except OSError as error:
        raise DataError(f"{path}: unreadable ({error})") from None
    return _read_idx_once(path, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=4)  # Fashion-MNIST's four files
def _read_idx_once(path: Path, size: int, modified_ns: int) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            magic = f.read(4)
            if len(magic) != 4 or magic[:3] != b"\x00\x00\x08" or not 1 <= magic[3] <= 4:
                raise DataError(f"{path}: not an idx file of bytes (header {magic.hex()})")
            header = f.read(4 * magic[3])
            shape = tuple(
                int.from_bytes(header[i : i + 4], "big") for i in range(0, len(header), 4)
            )
            count = int(np.prod(shape)) if len(shape) == magic[3] else -1
            if not 0 < count <= MAX_IDX_BYTES:
                raise DataError(f"{path}: header shape {shape} is not a dataset's")
            body = f.read(count + 1)
    except (OSError, EOFError) as error:  # a truncated or corrupt gzip stream
        raise DataError(f"{path}: unreadable ({error})") from None
    if len(body) != count:
        raise DataError(f"{path}: header announces {count} bytes, the file holds {len(body)}")
    return np.frombuffer(body, dtype=np.uint8).reshape(shape)


def _find_idx(folder: Path, stem: str) -> Path | None:
    for candidate in (
        folder / stem,
        folder / f"{stem}.gz",
        folder / "FashionMNIST" / "raw" / stem,
        folder / "FashionMNIST" / "raw" / f"{stem}.gz",
    ):
        if candidate.is_file():
            return candidate
    return None


def fashion_mnist_folder(root: str | None, download: bool = False) -> Path:
    """The first folder holding all four Fashion-MNIST idx files.

    Looks in the recipe's ``root``, then Debian's package folder, then (only with
    ``download``) lets torchvision fetch the files into ``root``.
    """
    searched = [Path(root).expanduser()] if root else []
    searched.append(DEBIAN_FASHION_MNIST)
    for folder in searched:
        if all(_find_idx(folder, stem) for pair in _FASHION_FILES.values() for stem in pair):
            return folder
    if download:
        target = Path(root or ".cache/data").expanduser()
        torchvision.datasets.FashionMNIST(str(target), train=True, download=True)
        torchvision.datasets.FashionMNIST(str(target), train=False, download=True)
        return target
    places = ", ".join(str(p) for p in searched)
    raise DataError(
        f"Fashion-MNIST not found (searched: {places}). Fix: `apt-get install dataset-fashion-mnist`"
        " (what `make setup` does), point data.root at a folder with the four idx files, or set"
        " data.download: true to let torchvision fetch them."
    )
