"""Object-detection data in the COCO layout: ``root/annotations/instances_<split>.json``
and the images they name.

The train file is the one whose split holds "train", the test file the one holding "test",
else "val" (COCO 2017's ``instances_train2017.json`` and ``instances_val2017.json``). The
images of ``instances_<S>.json`` are its ``file_name`` s under the first folder of
``root/<S>``, ``root/images/<S>``, ``root/images``, ``root/JPEGImages`` and ``root`` that
exists. Every read is bounded: an annotation file by its size, an image by the size its
header announces. Annotations are checked once, when a split is read (no image decoded):
a bad entry is a one-line DataError naming the file and the entry.

Example:
    >>> train, test, num_classes = read_coco("data/coco2017")
    >>> image, target = train[0]  # target: boxes (G, 4) x1 y1 x2 y2, labels, iscrowd (G,)
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from compress.core.errors import DataError
from compress.data.voc import MAX_IMAGE_SIDE, _open, _pixels

MAX_ANNOTATION_BYTES = 1 << 30  # COCO 2017's train annotations are 448 MB
# A box may reach this many pixels past the image's edge (rounding in the tools that drew
# it), and is clipped to the image; beyond, the annotation is wrong.
BOX_TOLERANCE = 1.0
_FOLDERS = ("{split}", "images/{split}", "images", "JPEGImages", ".")

# One image's entry: (id, file_name, width, height).
ImageEntry = tuple[int, str, int, int]


def read_coco(
    root: str | Path, size: int | None = None
) -> tuple[CocoDetection, CocoDetection, int]:
    """The train split and the test split of a COCO-layout folder, and the number of
    classes: the categories (ids in increasing order as labels 1 to K) + the background,
    label 0 for torchvision's detectors. ``size`` resizes images to size x size, boxes
    with them; the data module's transform (:class:`BoxTransform`) also normalises.

    Example:
        >>> train, test, num_classes = read_coco("data/coco2017", size=320)
    """
    root = Path(root).expanduser()
    train_file, test_file = _split_files(root)
    train, test = _split(root, train_file, size), _split(root, test_file, size)
    train_ids = [key for key, _ in train.categories]
    test_ids = [key for key, _ in test.categories]
    if train_ids != test_ids:  # else a label would name one class in train, another in test
        only_train = sorted(set(train_ids) - set(test_ids))
        only_test = sorted(set(test_ids) - set(train_ids))
        raise DataError(
            f"{test_file}: must list the same category ids as {train_file.name}"
            f" (only in train: {only_train[:5] or 'none'}; only in test: {only_test[:5] or 'none'})"
        )
    return train, test, len(train_ids) + 1


def _split_files(root: Path) -> tuple[Path, Path]:
    folder = root / "annotations"
    files = sorted(folder.glob("instances_*.json")) if folder.is_dir() else []
    train = [f for f in files if "train" in _split_name(f).lower()]
    rest = [f for f in files if f not in train]
    test = [f for f in rest if "test" in _split_name(f).lower()]
    test = test or [f for f in rest if "val" in _split_name(f).lower()]
    found = ", ".join(f.name for f in files) or "none"
    if not train or not test:
        raise DataError(
            f"data.root={str(root)!r} is not in the COCO layout: it needs"
            " annotations/instances_<split>.json, one <split> holding 'train' and one 'test'"
            f" or 'val' (found: {found}), and the images they name"
        )
    if len(train) > 1 or len(test) > 1:
        raise DataError(
            f"{folder}: more than one train or test file ({found}); keep one of each there"
        )
    return train[0], test[0]


def _split_name(file: Path) -> str:
    return file.stem.removeprefix("instances_")


def _split(root: Path, file: Path, size: int | None) -> CocoDetection:
    """One annotation file read, checked and kept as per-image arrays."""
    data = _load(file)
    categories = _categories(file, data["categories"])
    images = _images(file, data["images"])
    boxes, labels, crowd, offsets = _annotations(file, data["annotations"], images, categories)
    split = _split_name(file)
    folders = [root / pattern.format(split=split) for pattern in _FOLDERS]
    folder = next(f for f in folders if f.is_dir())  # root itself, at worst
    dataset = CocoDetection(folder, file, images, (boxes, labels, crowd, offsets), categories)
    dataset.transform = BoxTransform(None, None, size)
    return dataset


def _load(file: Path) -> dict:
    """The annotation file's JSON, its size checked before it is read."""
    size = file.stat().st_size
    if size <= MAX_ANNOTATION_BYTES:
        with file.open("rb") as f:
            text = f.read(MAX_ANNOTATION_BYTES + 1)  # the file may grow after its stat
        size = len(text)
    if size > MAX_ANNOTATION_BYTES:
        raise DataError(
            f"{file}: {size} bytes; annotation files of at most {MAX_ANNOTATION_BYTES} are"
            " read (COCO 2017's train file is 448 MB)"
        )
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as error:  # UnicodeDecodeError is a ValueError
        raise DataError(f"{file}: not JSON ({str(error)[:200]})") from None
    keys = ("images", "annotations", "categories")
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in keys):
        raise DataError(
            f"{file}: not COCO instances: an object with 'images', 'annotations' and"
            " 'categories' lists"
        )
    return data


def _keyed(file: Path, kind: str, n: int, entry: Any) -> tuple[int, str]:
    """An entry's integer id and how a message names it; one line if it has none."""
    key: Any = entry.get("id") if isinstance(entry, dict) else None
    where = f"{file}: {kind} {n} (id {_show(key)})"
    if not isinstance(entry, dict) or not _is_int(key):
        raise DataError(f"{where}: must be an object with an integer id")
    return key, where


def _categories(file: Path, entries: list) -> list[tuple[int, str]]:
    """(id, name) of each category, in increasing id order: label k + 1 is the k-th."""
    names: dict[int, str] = {}
    for n, entry in enumerate(entries):
        key, where = _keyed(file, "category", n, entry)
        if key in names:
            raise DataError(f"{where}: its id is listed twice")
        name = entry.get("name", str(key))
        if not isinstance(name, str):
            raise DataError(f"{where}: its name {_show(name)} is not text")
        names[key] = name
    if not names:
        raise DataError(f"{file}: lists no category")
    return sorted(names.items())


def _images(file: Path, entries: list) -> list[ImageEntry]:
    images: list[ImageEntry] = []
    seen: dict[int, int] = {}
    for n, entry in enumerate(entries):
        key, where = _keyed(file, "image", n, entry)
        if key in seen:
            raise DataError(f"{where}: its id also names image {seen[key]}")
        name: Any = entry.get("file_name")
        # A file_name is data: it names a file inside the images folder, never outside.
        if not _inside(name):
            raise DataError(
                f"{where}: file_name {_show(name)} must be a relative path inside the images"
                " folder (no '..', not absolute)"
            )
        width: Any = entry.get("width")
        height: Any = entry.get("height")
        if not all(_is_int(v) and 0 < v <= MAX_IMAGE_SIDE for v in (width, height)):
            raise DataError(
                f"{where}: width and height must be whole pixels from 1 to {MAX_IMAGE_SIDE};"
                f" got {_show(width)} x {_show(height)}"
            )
        seen[key] = n
        images.append((key, name, width, height))
    if not images:
        raise DataError(f"{file}: lists no image")
    return images


def _annotations(
    file: Path, entries: list, images: list[ImageEntry], categories: list[tuple[int, str]]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Every box checked, as arrays sorted by image: boxes (A, 4) x1 y1 x2 y2 in pixels,
    labels (A,), iscrowd (A,), and image i's rows offsets[i]:offsets[i + 1]."""
    labels = {key: rank + 1 for rank, (key, _) in enumerate(categories)}
    index = {image[0]: n for n, image in enumerate(images)}
    allowed = ", ".join(str(key) for key in list(labels)[:8]) + (", ..." if len(labels) > 8 else "")
    rows: list[tuple[int, float, float, float, float, int, int]] = []
    for n, entry in enumerate(entries):
        key: Any = entry.get("id") if isinstance(entry, dict) else None
        where = f"{file}: annotation {n} (id {_show(key)})"
        if not isinstance(entry, dict):
            raise DataError(f"{where}: not an object")
        image_id, category = entry.get("image_id"), entry.get("category_id")
        if not _is_int(image_id) or image_id not in index:
            raise DataError(f"{where}: image_id {_show(image_id)} is not an image of this file")
        if not _is_int(category) or category not in labels:
            raise DataError(
                f"{where}: category_id {_show(category)} is not a category of this file"
                f" (ids {allowed})"
            )
        crowd = entry.get("iscrowd", 0)
        if not _is_int(crowd) or crowd not in (0, 1):
            raise DataError(f"{where}: iscrowd {_show(crowd)} must be 0 or 1")
        box = _box(where, entry.get("bbox"), images[index[image_id]])
        if box is not None:
            rows.append((index[image_id], *box, labels[category], crowd))
    rows.sort(key=lambda row: row[0])  # stable: an image's boxes keep the file's order
    table = np.array([row[1:5] for row in rows], np.float32).reshape(-1, 4)
    owners = np.array([row[0] for row in rows], np.int64)
    offsets = np.searchsorted(owners, np.arange(len(images) + 1))
    return (
        table,
        np.array([row[5] for row in rows], np.int64),
        np.array([row[6] for row in rows], np.int64),
        offsets,
    )


def _box(where: str, bbox: Any, image: ImageEntry) -> tuple[float, float, float, float] | None:
    """A COCO box [x, y, width, height] as x1, y1, x2, y2 clipped to the image; None for a
    box of zero size (COCO 2017's train file has two, of height 0: no pixel to find, and
    torchvision's detectors refuse them in training) or one that clipping empties."""
    if not isinstance(bbox, list) or len(bbox) != 4 or not all(_finite(v) for v in bbox):
        raise DataError(f"{where}: bbox {_show(bbox)} is not 4 finite numbers [x, y, w, h]")
    x, y, w, h = (float(v) for v in bbox)
    if w < 0 or h < 0:
        raise DataError(
            f"{where}: box {_show(bbox)} has negative size ({w:g} x {h:g}); COCO boxes are"
            " [x, y, width, height]"
        )
    key, _, width, height = image
    for axis, values, limit, extent in (
        ("x", (x, x + w), width, "width"),
        ("y", (y, y + h), height, "height"),
    ):
        for value in values:
            if not -BOX_TOLERANCE <= value <= limit + BOX_TOLERANCE:
                raise DataError(
                    f"{where}: box {_show(bbox)} reaches {axis}={value:g}, outside image"
                    f" {key}'s {extent} {limit}"
                )
    x1, y1, x2, y2 = max(x, 0.0), max(y, 0.0), min(x + w, width), min(y + h, height)
    return (x1, y1, x2, y2) if x2 > x1 and y2 > y1 else None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _finite(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer too large for a float
        return False


def _inside(name: Any) -> bool:
    if not isinstance(name, str) or not name or "\x00" in name or len(name) > 1024:
        return False
    path = PurePosixPath(name)
    return not path.is_absolute() and ".." not in path.parts and not name.startswith("\\")


def _show(value: Any) -> str:
    """A value from the file as a message quotes it: its repr, cut short."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class CocoDetection(Dataset):
    """The images of one annotation file and their boxes, decoded on demand:
    ``(image (C, H, W) float, {"boxes": (G, 4) float32 x1 y1 x2 y2 pixels, "labels": (G,)
    int64 1..K, "iscrowd": (G,) int64})``; ``categories`` lists (id, name), label k the
    k-th.

    Example:
        >>> image, target = read_coco("data/coco2017")[1][0]
    """

    def __init__(
        self,
        folder: Path,
        file: Path,
        images: list[ImageEntry],
        targets: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
        categories: list[tuple[int, str]],
    ):
        self.folder, self.file, self.images = folder, file, images
        self.boxes, self.labels, self.iscrowd, self.offsets = targets
        self.categories = categories
        # Set by the data module: (image, target) -> (image, target).
        self.transform: Callable[[torch.Tensor, dict], tuple] | None = None

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        key, name, width, height = self.images[index]
        image = _open(self.folder / name)
        if image.size != (width, height):
            raise DataError(
                f"{self.folder / name}: {image.size[0]}x{image.size[1]} pixels, but"
                f" {self.file.name} gives image {index} (id {key}) {width}x{height}"
            )
        rows = slice(self.offsets[index], self.offsets[index + 1])
        target = {
            "boxes": torch.tensor(self.boxes[rows]),
            "labels": torch.tensor(self.labels[rows]),
            "iscrowd": torch.tensor(self.iscrowd[rows]),
        }
        item = _pixels(image), target
        return self.transform(*item) if self.transform is not None else item


class BoxTransform:
    """An image resized to size x size when ``size`` is set (bilinear, antialiased), its
    boxes scaled with it, then normalised when ``mean`` and ``std`` are given. A grey image
    among colour ones (COCO holds some) is repeated to the channels ``mean`` has."""

    def __init__(self, mean: list[float] | None, std: list[float] | None, size: int | None):
        self.mean = None if mean is None else torch.tensor(mean).view(-1, 1, 1)
        self.std = None if std is None else torch.tensor(std).view(-1, 1, 1)
        self.size = size

    def __call__(self, image: torch.Tensor, target: dict):
        if self.size and tuple(image.shape[-2:]) != (self.size, self.size):
            height, width = image.shape[-2:]
            image = torch.nn.functional.interpolate(
                image[None], size=(self.size, self.size), mode="bilinear", antialias=True
            )[0]
            scale = torch.tensor([self.size / width, self.size / height] * 2)
            target = {**target, "boxes": target["boxes"] * scale}
        if self.mean is None or self.std is None:
            return image, target
        channels = self.mean.shape[0]
        if image.shape[0] == 1 and channels > 1:
            image = image.expand(channels, -1, -1)
        if image.shape[0] != channels:
            raise DataError(
                f"data.mean has {channels} values; the images have {image.shape[0]} channels"
            )
        return (image - self.mean) / self.std, target
