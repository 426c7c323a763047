"""*Fashion-MNIST scenes*: real Fashion-MNIST garments on a 64x64 canvas, written for two
tasks at once. Segmentation in the VOC layout (voc.py): each pixel of a garment labelled
with its class + 1, the rest background (0), 11 classes. Detection in the COCO layout
(coco.py): a box around each garment's pixels still visible once later garments cover it,
its category the class + 1 (1 to 10). Built deterministically from Fashion-MNIST's own
splits (test scenes only from test images).

Example:
    >>> write_scenes("/tmp/scenes", {"train": (images, labels, 64), "test": (t, l, 32)})
    >>> train, test, num_classes = read_coco("/tmp/scenes")
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from compress.core.errors import DataError
from compress.core.storage import write_atomic
from compress.data.voc import _ids, _open

SCENES_CLASSES = 11  # background + Fashion-MNIST's 10 garments
SCENES_SIZE = 64  # pixels on each side of a scene
# A garment's pixel belongs to it above this intensity (of 255): the rest is background.
GARMENT_THRESHOLD = 32
# A garment left with fewer visible pixels (later ones cover it) is not an object to find.
MIN_VISIBLE_PIXELS = 16
# Fashion-MNIST's class names, label 0 first: COCO category ids are label + 1.
GARMENT_NAMES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

# One placed garment still visible: (category id, [x, y, width, height], visible pixels).
SceneObject = tuple[int, list[int], int]


def write_scenes(
    root: str | Path, splits: dict[str, tuple[np.ndarray, np.ndarray, int]], seed: int = 0
) -> Path:
    """Write scenes under ``root``: for each split, ``count`` scenes made of its
    ``(garments (N, 28, 28) uint8, labels (N,))`` only, in the VOC layout (ids
    ``<split>_00000``) with COCO boxes in ``annotations/instances_<split>.json``; each
    split's list ``<split>.txt`` is written last. Returns ``root``; a finished folder is
    kept, and one finished without boxes gets them by replaying the same seeded draws.

    Example:
        >>> write_scenes("/tmp/scenes", {"train": (images, labels, 64), "test": (t, l, 32)})
    """
    root = Path(root)
    lists = root / "ImageSets" / "Segmentation"
    finished = all((lists / f"{split}.txt").is_file() for split in splits)
    if finished and all(_boxes_file(root, split).is_file() for split in splits):
        return root
    # Finished but without boxes (written before they were): the same draws give the same
    # scenes, so only the boxes are written and no PNG changes.
    replay = finished
    for sub in ("JPEGImages", "SegmentationClass"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    lists.mkdir(parents=True, exist_ok=True)
    generator = np.random.default_rng(seed)
    for split, (garments, labels, count) in splits.items():
        names = [f"{split}_{index:05d}" for index in range(count)]
        if replay:
            _check_list(lists / f"{split}.txt", names)
        scenes = []
        for index, name in enumerate(names):
            image, mask, objects = _scene(garments, labels, generator)
            if not replay:
                Image.fromarray(image).save(root / "JPEGImages" / f"{name}.png")
                Image.fromarray(mask).save(root / "SegmentationClass" / f"{name}.png")
            elif index in (0, count - 1):  # the first and last scenes: cheap, and telling
                _check_replay(root, name, mask)
            scenes.append(objects)
        write_atomic(_boxes_file(root, split), json.dumps(_coco(names, scenes)))
        if not replay:
            write_atomic(lists / f"{split}.txt", "\n".join(names) + "\n")
    return root


def _scene(
    garments: np.ndarray, labels: np.ndarray, generator
) -> tuple[np.ndarray, np.ndarray, list[SceneObject]]:
    """One canvas with 1 to 3 garments at random places; a later garment covers an
    earlier one where they overlap, in the image, in the mask and in the boxes (each box
    holds its garment's pixels still visible). The draws are the scenes' since they were
    first written: the images and masks stay byte for byte what they were."""
    image = np.zeros((SCENES_SIZE, SCENES_SIZE), np.uint8)
    mask = np.zeros((SCENES_SIZE, SCENES_SIZE), np.uint8)
    owner = np.full((SCENES_SIZE, SCENES_SIZE), -1, np.int8)  # which placed garment shows
    categories = []
    side = garments.shape[-1]
    for placed in range(int(generator.integers(1, 4))):
        pick = int(generator.integers(len(garments)))
        top, left = (int(v) for v in generator.integers(0, SCENES_SIZE - side + 1, 2))
        garment = garments[pick]
        on = garment > GARMENT_THRESHOLD
        window = (slice(top, top + side), slice(left, left + side))
        image[window] = np.where(on, garment, image[window])
        mask[window] = np.where(on, labels[pick] + 1, mask[window])
        owner[window] = np.where(on, placed, owner[window])
        categories.append(int(labels[pick]) + 1)
    objects = []
    for placed, category in enumerate(categories):
        visible = owner == placed
        area = int(visible.sum())
        if area < MIN_VISIBLE_PIXELS:
            continue
        rows, columns = np.flatnonzero(visible.any(1)), np.flatnonzero(visible.any(0))
        x, y = int(columns[0]), int(rows[0])
        box = [x, y, int(columns[-1]) + 1 - x, int(rows[-1]) + 1 - y]
        objects.append((category, box, area))
    return image, mask, objects


def _coco(names: list[str], scenes: list[list[SceneObject]]) -> dict:
    """One split's boxes as COCO instances: image ids from 1, annotation ids from 1 (0
    would read as "unmatched" in pycocotools' matching)."""
    images = [
        {"id": n + 1, "file_name": f"{name}.png", "width": SCENES_SIZE, "height": SCENES_SIZE}
        for n, name in enumerate(names)
    ]
    annotations: list[dict] = []
    for n, objects in enumerate(scenes):
        for category, box, area in objects:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": n + 1,
                    "category_id": category,
                    "bbox": box,
                    "area": area,
                    "iscrowd": 0,
                }
            )
    categories = [
        {"id": label + 1, "name": name, "supercategory": "garment"}
        for label, name in enumerate(GARMENT_NAMES)
    ]
    return {"images": images, "annotations": annotations, "categories": categories}


def _boxes_file(root: Path, split: str) -> Path:
    return root / "annotations" / f"instances_{split}.json"


def _check_list(file: Path, names: list[str]) -> None:
    """A replay writes boxes for the scenes it draws: the folder must list the same ones."""
    listed = _ids(file)
    if listed != names:
        raise DataError(
            f"{file}: lists {len(listed)} scenes, not the {len(names)} these counts draw; its"
            " boxes cannot be replayed: delete the folder to write it again"
        )


def _check_replay(root: Path, name: str, mask: np.ndarray) -> None:
    """The replayed scene is the one on disk (same garments, seed and counts), else its
    boxes would describe other pictures."""
    file = root / "SegmentationClass" / f"{name}.png"
    if not np.array_equal(np.asarray(_open(file)), mask):
        raise DataError(
            f"{file}: differs from the scene these garments, seed and counts draw; its boxes"
            " cannot be replayed: delete the folder to write it again"
        )
