"""Segmentation data in the Pascal VOC layout (the Fashion-MNIST scenes are written in it:
scenes.py).

The layout: ``root/JPEGImages/<id>.jpg|png``, ``root/SegmentationClass/<id>.png`` (one class
index per pixel, 255 for pixels that count for nothing) and
``root/ImageSets/Segmentation/{train,val,test}.txt`` (one id per line). Every read is bounded:
a list file by its size, an image by the size its header announces, before it is decoded.

Example:
    >>> train, test, classes = read_voc("data/VOC2012")
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from compress.core.errors import DataError

MAX_IMAGE_SIDE = 4096  # pixels: a header announcing more is refused before decoding
MAX_LIST_BYTES = 64 << 20  # a split list of ids (VOC's are ~100 KB)
_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")


def read_voc(
    root: str | Path, classes: int | None = None
) -> tuple[VocSegmentation, VocSegmentation, int]:
    """The train split and the test split (``test.txt``, else ``val.txt``) of a VOC-layout
    folder, and the number of classes: ``classes``, else 1 + the largest index in the
    first 64 masks of each split (at least 2).

    Example:
        >>> train, test, classes = read_voc("data/VOC2012")
    """
    root = Path(root).expanduser()
    lists = root / "ImageSets" / "Segmentation"
    if not lists.is_dir():
        raise DataError(
            f"data.root={str(root)!r} is not in the VOC layout: it needs ImageSets/Segmentation/"
            "{train,test or val}.txt, JPEGImages/ and SegmentationClass/"
        )
    test_list = next(
        (lists / f"{n}.txt" for n in ("test", "val") if (lists / f"{n}.txt").is_file()), None
    )
    if not (lists / "train.txt").is_file() or test_list is None:
        raise DataError(f"{lists}: needs train.txt and test.txt (or val.txt)")
    train = VocSegmentation(root, _ids(lists / "train.txt"))
    test = VocSegmentation(root, _ids(test_list))
    if classes is None:
        classes = max(train.classes_seen(), test.classes_seen(), 2)
    return train, test, classes


def _ids(file: Path) -> list[str]:
    if file.stat().st_size > MAX_LIST_BYTES:
        raise DataError(f"{file}: {file.stat().st_size} bytes is not a list of image ids")
    ids = file.read_text(encoding="utf-8", errors="replace").split()
    bad = next((i for i in ids if not _ID.fullmatch(i)), None)
    if bad is not None:
        raise DataError(f"{file}: {bad[:80]!r} is not an image id (letters, digits, _ . -)")
    if not ids:
        raise DataError(f"{file}: lists no image")
    return ids


class VocSegmentation(Dataset):
    """Images and index masks by id, decoded on demand: ``(image (C, H, W) float in [0, 1],
    mask (H, W) int64)``; the data module normalises and resizes.

    Example:
        >>> image, mask = VocSegmentation("data/VOC2012", ["2007_000032"])[0]
    """

    def __init__(self, root: str | Path, ids: list[str]):
        self.root, self.ids = Path(root), ids
        # Set by the data module: (image, mask) -> (image, mask).
        self.transform: Callable[[torch.Tensor, torch.Tensor], tuple] | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int):
        name = self.ids[index]
        image = _open(self._image_file(name))
        mask = _open(self.root / "SegmentationClass" / f"{name}.png")
        if mask.mode not in ("P", "L") or mask.size != image.size:
            raise DataError(
                f"{self.root}/SegmentationClass/{name}.png: a mask must be one class index per"
                f" pixel (palette or grey) of its image's size {image.size}; got {mask.mode}"
                f" {mask.size}"
            )
        item = _pixels(image), torch.from_numpy(np.asarray(mask, np.int64).copy())
        return self.transform(*item) if self.transform is not None else item

    def _image_file(self, name: str) -> Path:
        for suffix in (".jpg", ".png", ".jpeg"):
            file = self.root / "JPEGImages" / f"{name}{suffix}"
            if file.is_file():
                return file
        raise DataError(f"{self.root}/JPEGImages: no image for id {name!r} (.jpg or .png)")

    def classes_seen(self, first: int = 64) -> int:
        """1 + the largest class index in the first masks (255, ignore, left out)."""
        largest = 0
        for name in self.ids[:first]:
            mask = np.asarray(_open(self.root / "SegmentationClass" / f"{name}.png"))
            kept = mask[mask != 255]
            largest = max(largest, int(kept.max()) if kept.size else 0)
        return largest + 1


class PairTransform:
    """An image normalised and a mask kept aligned with it: resized (bilinear for the
    image, nearest for the mask) when data.image_size is set."""

    def __init__(self, mean: list[float], std: list[float], size: int | None):
        self.mean = torch.tensor(mean).view(-1, 1, 1)
        self.std = torch.tensor(std).view(-1, 1, 1)
        self.size = size

    def __call__(self, image: torch.Tensor, mask: torch.Tensor):
        if image.shape[0] != self.mean.shape[0]:
            raise DataError(
                f"data.mean has {self.mean.shape[0]} values; the images have {image.shape[0]}"
                " channels"
            )
        if self.size and tuple(image.shape[-2:]) != (self.size, self.size):
            image = torch.nn.functional.interpolate(
                image[None], size=(self.size, self.size), mode="bilinear", antialias=True
            )[0]
            mask = torch.nn.functional.interpolate(
                mask[None, None].float(), size=(self.size, self.size), mode="nearest"
            )[0, 0].long()
        return (image - self.mean) / self.std, mask


def _pixels(image: Image.Image) -> torch.Tensor:
    """An image as floats (C, H, W) in [0, 1]: grey images keep one channel, others are RGB."""
    grey = image.mode in ("L", "1", "I;16")
    pixels = torch.from_numpy(np.asarray(image.convert("L" if grey else "RGB")).copy())
    pixels = pixels[None] if pixels.ndim == 2 else pixels.permute(2, 0, 1)
    return pixels.float().div_(255.0)


def _open(file: Path) -> Image.Image:
    """An image whose header is checked before its pixels are decoded."""
    try:
        image = Image.open(file)
    except (OSError, ValueError) as error:
        raise DataError(f"{file}: not a readable image ({error})") from None
    if max(image.size) > MAX_IMAGE_SIDE:
        raise DataError(
            f"{file}: its header announces {image.size[0]}x{image.size[1]} pixels; at most"
            f" {MAX_IMAGE_SIDE} a side are read"
        )
    try:
        image.load()
    except (OSError, ValueError) as error:
        raise DataError(f"{file}: not a readable image ({error})") from None
    return image
