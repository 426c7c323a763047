"""COCO detection data: a hand-made folder read back, bad annotations refused in one line,
and the Fashion-MNIST scenes boxed by the generator that draws them."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from compress.core.errors import DataError
from compress.data import build_data
from compress.data.coco import read_coco
from compress.data.scenes import GARMENT_NAMES, MIN_VISIBLE_PIXELS, SCENES_SIZE, write_scenes

# Category ids 3 and 7 become labels 1 and 2 (0 is the background).
CATEGORIES = [{"id": 7, "name": "dog"}, {"id": 3, "name": "cat"}]


def _instances(images: list, annotations: list) -> dict:
    return {"images": images, "annotations": annotations, "categories": CATEGORIES}


@pytest.fixture
def coco_root(tmp_path):
    """Three images under images/: a 8x6 colour one with two boxes (one crowd, one a
    little past the edges), a 5x4 grey one with a box, a 8x6 one with none."""
    rng = np.random.default_rng(0)
    (tmp_path / "images").mkdir()
    colour = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    Image.fromarray(colour).save(tmp_path / "images" / "a.png")
    Image.fromarray(rng.integers(0, 256, (4, 5), dtype=np.uint8)).save(tmp_path / "images/b.png")
    Image.fromarray(colour).save(tmp_path / "images" / "c.png")
    images = [
        {"id": 10, "file_name": "a.png", "width": 8, "height": 6},
        {"id": 20, "file_name": "b.png", "width": 5, "height": 4},
        {"id": 30, "file_name": "c.png", "width": 8, "height": 6},
    ]
    annotations = [
        {"id": 1, "image_id": 10, "category_id": 7, "bbox": [1, 1, 3, 2], "iscrowd": 1},
        {"id": 2, "image_id": 20, "category_id": 3, "bbox": [0, 0, 2, 2]},
        {"id": 3, "image_id": 10, "category_id": 3, "bbox": [-0.5, 0, 8.5, 6.5]},
    ]
    (tmp_path / "annotations").mkdir()
    for split in ("train", "test"):
        data = _instances(images, annotations)
        (tmp_path / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))
    return tmp_path, colour


def test_a_coco_folder_reads_back(coco_root):
    root, colour = coco_root
    train, test, num_classes = read_coco(root)
    assert num_classes == 3 and len(train) == len(test) == 3
    assert train.categories == [(3, "cat"), (7, "dog")]
    image, target = train[0]
    assert torch.equal(image, torch.from_numpy(colour).permute(2, 0, 1).float() / 255)
    # The second box reached half a pixel past the edges: clipped to the image.
    assert target["boxes"].tolist() == [[1, 1, 4, 3], [0, 0, 8, 6]]
    assert target["labels"].tolist() == [2, 1] and target["iscrowd"].tolist() == [1, 0]
    assert target["boxes"].dtype == torch.float32 and target["labels"].dtype == torch.int64
    grey, target = train[1]
    assert grey.shape == (1, 4, 5) and target["labels"].tolist() == [1]
    _, empty = train[2]
    assert empty["boxes"].shape == (0, 4) and empty["labels"].shape == (0,)
    assert empty["iscrowd"].dtype == torch.int64


def test_resizing_scales_the_boxes_and_the_dataset_normalises(coco_root):
    root, _ = coco_root
    train, _, _ = read_coco(root, size=16)
    image, target = train[0]
    assert image.shape == (3, 16, 16)
    assert torch.allclose(target["boxes"][0], torch.tensor([2, 16 / 6, 8, 16 / 2]))
    data = build_data({"name": "coco", "root": str(root), "image_size": 16, "calibration_size": 1})
    assert data.task == "detection" and data.num_classes == 3
    assert data.input_shape == (3, 16, 16)
    grey, target = data.test[1]  # a grey photo among colour ones: as RGB, then normalised
    assert grey.shape == (3, 16, 16) and torch.allclose(
        grey[0] * 0.229 + 0.485, grey[1] * 0.224 + 0.456, atol=1e-6
    )
    assert torch.allclose(target["boxes"], torch.tensor([[0.0, 0, 6.4, 8]]))


def _box_outside(data):
    data["annotations"][0]["bbox"] = [2, 1, 9, 2]


def _unknown_category(data):
    data["annotations"][0]["category_id"] = 5


def _negative_size(data):
    data["annotations"][0]["bbox"] = [4, 1, -2, 2]


def _escaping_file_name(data):
    data["images"][0]["file_name"] = "../a.png"


def _duplicate_image_id(data):
    data["images"][2]["id"] = 10


def _not_four_numbers(data):
    data["annotations"][2]["bbox"] = [0, 0, "8", 6]


@pytest.mark.parametrize(
    "damage, entry, says",
    [
        (_box_outside, "annotation 0 (id 1)", "reaches x=11, outside image 10's width 8"),
        (
            _unknown_category,
            "annotation 0 (id 1)",
            "category_id 5 is not a category of this file (ids 3, 7)",
        ),
        (_negative_size, "annotation 0 (id 1)", "negative size"),
        (_escaping_file_name, "image 0 (id 10)", "file_name '../a.png'"),
        (_duplicate_image_id, "image 2 (id 10)", "also names image 0"),
        (_not_four_numbers, "annotation 2 (id 3)", "not 4 finite numbers"),
    ],
)
def test_a_bad_annotation_is_named_in_one_line(coco_root, damage, entry, says):
    root, _ = coco_root
    file = root / "annotations" / "instances_test.json"
    data = json.loads(file.read_text())
    damage(data)
    file.write_text(json.dumps(data))
    with pytest.raises(DataError) as info:
        read_coco(root)
    message = str(info.value)
    assert f"{file}: {entry}: " in message and says in message and "\n" not in message


def test_layout_categories_sizes_and_bounds_are_checked(coco_root, monkeypatch):
    import compress.data.coco as coco

    root, _ = coco_root
    test_file = root / "annotations" / "instances_test.json"
    data = json.loads(test_file.read_text())
    test_file.rename(root / "annotations" / "instances_val2017.json")  # "val" serves as test
    assert len(read_coco(root)[1]) == 3
    (root / "annotations" / "instances_val2017.json").unlink()
    with pytest.raises(DataError, match=r"not in the COCO layout.*found: instances_train\.json"):
        read_coco(root)
    data["categories"] = data["categories"][:1]
    data["annotations"] = [a for a in data["annotations"] if a["category_id"] == 7]
    test_file.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"same category ids.*only in train: \[3\]"):
        read_coco(root)
    monkeypatch.setattr(coco, "MAX_ANNOTATION_BYTES", 100)
    with pytest.raises(DataError, match=r"instances_t\w+\.json: \d+ bytes"):
        read_coco(root)


def test_an_image_of_another_size_than_its_entry_is_refused(coco_root):
    root, _ = coco_root
    Image.new("RGB", (7, 6)).save(root / "images" / "c.png")
    train, _, _ = read_coco(root)
    with pytest.raises(
        DataError,
        match=r"c\.png: 7x6 pixels, but instances_train\.json gives image 2 \(id 30\) 8x6",
    ):
        train[2]


# ------------------------------------------------------------------- Fashion-MNIST scenes


@pytest.fixture(scope="module")
def garments():
    """Real Fashion-MNIST garments and labels per split (skipped where not installed)."""
    from compress.data.fashion_mnist import fashion_mnist_folder, fashion_mnist_split

    try:
        folder = fashion_mnist_folder(None)
    except DataError:
        pytest.skip("Fashion-MNIST is not installed (make setup)")
    return {split: fashion_mnist_split(folder, split) for split in ("train", "test")}


def _counts(garments, train: int = 40, test: int = 20) -> dict:
    return {"train": (*garments["train"], train), "test": (*garments["test"], test)}


def test_scenes_boxes_hold_their_garments(garments, tmp_path):
    root = write_scenes(tmp_path, _counts(garments))
    data = json.loads((root / "annotations" / "instances_train.json").read_text())
    assert [c["name"] for c in data["categories"]] == list(GARMENT_NAMES)
    assert [image["id"] for image in data["images"]] == list(range(1, 41))
    per_image = {image["id"]: 0 for image in data["images"]}
    for annotation in data["annotations"]:
        x, y, w, h = annotation["bbox"]
        assert 0 <= x < x + w <= SCENES_SIZE and 0 <= y < y + h <= SCENES_SIZE
        assert MIN_VISIBLE_PIXELS <= annotation["area"] <= w * h
        name = f"train_{annotation['image_id'] - 1:05d}.png"
        mask = np.asarray(Image.open(root / "SegmentationClass" / name))
        assert (mask[y : y + h, x : x + w] == annotation["category_id"]).any()
        per_image[annotation["image_id"]] += 1
    # The last garment placed is never covered: every scene has a box; some have several.
    assert min(per_image.values()) >= 1 and max(per_image.values()) >= 2


def test_boxes_are_replayed_into_a_folder_written_without_them(garments, tmp_path):
    root = write_scenes(tmp_path, _counts(garments))
    written = {f.name: f.read_bytes() for f in (root / "annotations").iterdir()}
    png = root / "JPEGImages" / "test_00019.png"
    before = png.stat().st_mtime_ns
    shutil.rmtree(root / "annotations")  # as the caches written before boxes were
    write_scenes(tmp_path, _counts(garments))
    assert {f.name: f.read_bytes() for f in (root / "annotations").iterdir()} == written
    assert png.stat().st_mtime_ns == before  # no PNG rewritten
    shutil.rmtree(root / "annotations")
    with pytest.raises(DataError, match=r"train\.txt: lists 40 scenes, not the 41"):
        write_scenes(tmp_path, _counts(garments, train=41))


def test_fashion_mnist_boxes_builds(garments, tmp_path):
    from compress.data import fashion_mnist_scenes

    root = fashion_mnist_scenes(tmp_path, counts={"train": 40, "test": 20})
    config = {"name": "fashion_mnist_boxes", "root": str(root), "test_subset": 8}
    data = build_data({**config, "calibration_size": 4})
    assert data.task == "detection" and data.num_classes == 11
    assert data.input_shape == (1, 64, 64) and len(data.test) == 8 and len(data.train) == 36
    image, target = data.test[0]
    assert abs(image.mean().item()) < 1.0  # normalised with the scenes' mean and std
    assert set(target) == {"boxes", "labels", "iscrowd"} and len(target["labels"]) >= 1
    assert 1 <= target["labels"].min() and target["labels"].max() <= 10
    assert (target["boxes"] >= 0).all() and (target["boxes"] <= 64).all()
