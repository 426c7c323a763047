"""Data: the real Fashion-MNIST files, splits, user folders and clear errors."""

import sys

import numpy as np
import pytest
import torch

from compress.core.errors import DataError, RecipeError
from compress.data import build_data
from compress.spec.recipe import DataConfig


def test_fashion_mnist_is_real_and_split(fmnist):
    full = build_data(DataConfig(calibration_size=1000), seed=0)
    assert (len(full.train), len(full.calibration), len(full.test)) == (59000, 1000, 10000)
    assert full.input_shape == (1, 28, 28) and full.num_classes == 10
    # the calibration slice comes out of train, never test, and the two do not overlap
    assert set(full.train.indices).isdisjoint(full.calibration.indices)
    labels = torch.stack([full.test[i][1] for i in range(0, 10000, 7)])
    assert set(labels.tolist()) == set(range(10))  # all ten classes, real labels
    images = torch.stack([full.test[i][0] for i in range(256)])
    assert abs(images.mean().item()) < 0.2 and 0.7 < images.std().item() < 1.3  # normalised


def test_subsets_and_seeded_calibration():
    a = build_data(DataConfig(train_subset=100, test_subset=50, calibration_size=20), seed=1)
    b = build_data(DataConfig(train_subset=100, test_subset=50, calibration_size=20), seed=1)
    assert (len(a.train), len(a.calibration), len(a.test)) == (100, 20, 50)
    assert a.calibration.indices == b.calibration.indices


def test_missing_data_names_places_and_fix(tmp_path, monkeypatch):
    import compress.data.fashion_mnist as data_module

    monkeypatch.setattr(data_module, "DEBIAN_FASHION_MNIST", tmp_path / "nowhere")
    with pytest.raises(DataError) as info:
        build_data(DataConfig(root=str(tmp_path / "mine")))
    message = str(info.value)
    assert str(tmp_path / "mine") in message and str(tmp_path / "nowhere") in message
    assert "apt-get install dataset-fashion-mnist" in message and "download: true" in message


def test_imagefolder_from_a_local_root(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(6):
                pixels = rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / split / cls / f"{i}.png")
    data = build_data(
        DataConfig(name="imagefolder", root=str(tmp_path), image_size=8, calibration_size=2)
    )
    assert data.num_classes == 2 and data.input_shape == (3, 8, 8)
    assert (len(data.train), len(data.calibration), len(data.test)) == (10, 2, 12)
    images, labels = next(iter(data.loader("test", batch_size=4)))
    assert images.shape == (4, 3, 8, 8)


def test_folder_datasets_need_a_root():
    with pytest.raises(DataError, match="data.root is required"):
        build_data(DataConfig(name="cifar10"))


def test_cifar10_missing_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="cifar10 not readable"):
        build_data(DataConfig(name="cifar10", root=str(tmp_path)))


def test_synthetic_shapes(synthetic):
    images, labels = next(iter(synthetic.loader("test")))
    assert images.shape == (32, 1, 28, 28) and labels.max() < 10


def test_an_idx_file_is_read_once_and_again_when_it_changes(tmp_path):
    import os

    from compress.data.fashion_mnist import _read_idx

    path = tmp_path / "labels-idx1-ubyte"
    path.write_bytes(b"\x00\x00\x08\x01" + (3).to_bytes(4, "big") + bytes([1, 2, 3]))
    first = _read_idx(path)
    assert first.tolist() == [1, 2, 3] and _read_idx(path) is first  # inflated once
    assert not first.flags.writeable  # callers copy; nobody edits the kept array
    path.write_bytes(b"\x00\x00\x08\x01" + (3).to_bytes(4, "big") + bytes([7, 8, 9]))
    os.utime(path, ns=(1, 1))  # another modification time, as a rewrite gives
    assert _read_idx(path).tolist() == [7, 8, 9]


def test_a_new_dataset_is_one_module(tmp_path, monkeypatch, capsys):
    """A module that registers a dataset makes it a recipe's data.name: checked before any
    file is read (channels, calibration size), split by build_data, named by `compress list`."""
    from compress.core.registry import DATASETS
    from compress.spec.recipe import parse_recipe
    from compress.workflow.cli import main

    (tmp_path / "stripes_data.py").write_text(
        "import torch\n"
        "from torch.utils.data import TensorDataset\n"
        "from compress.core.registry import register_dataset\n\n"
        "@register_dataset('stripes', channels=1, train_images=300, size=8, mean=(0.5,), std=(0.5,))\n"
        "def stripes(config, mean, std, seed):\n"
        "    '''Striped squares, labelled by orientation.'''\n"
        "    def split(n):\n"
        "        labels = torch.arange(n) % 2\n"
        "        rows = (torch.arange(8) % 2).float().view(8, 1).expand(8, 8)\n"
        "        images = torch.stack([rows if k == 0 else rows.T for k in labels.tolist()])\n"
        "        return TensorDataset(((images - mean[0]) / std[0]).unsqueeze(1), labels)\n"
        "    return split(300), split(100), 2\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    importlib.import_module("stripes_data")
    try:
        data = build_data({"name": "stripes", "calibration_size": 50})
        assert (len(data.train), len(data.calibration), len(data.test)) == (250, 50, 100)
        assert data.input_shape == (1, 8, 8) and data.num_classes == 2
        assert data.test[0][0].min() == -1.0  # normalised with the registered mean and std
        with pytest.raises(RecipeError, match=r"data\.mean.*1 channel"):
            parse_recipe({"data": {"name": "stripes", "mean": [0.1, 0.2, 0.3]}})
        with pytest.raises(RecipeError, match=r"data\.calibration_size.*stripes has 300"):
            parse_recipe({"data": {"name": "stripes", "calibration_size": 300}})
        assert main(["list"]) == 0
        assert "stripes (classification): Striped squares" in capsys.readouterr().out
    finally:
        sys.modules.pop("stripes_data", None)
        DATASETS.pop("stripes", None)


# ---------------------------------------------------------------------- the text dataset


def _corpus(root, files: dict[str, str]):
    for name, content in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(content, encoding="utf-8")
    return root


def test_text_folder_splits_whole_files_by_character(tmp_path):
    root = _corpus(tmp_path, {f"{c}.txt": c * 900 + "\n" for c in "abcdefghij"})
    data = build_data({"name": "text", "root": str(root), "context": 16, "calibration_size": 2})
    assert data.task == "language_model" and data.num_classes == 11  # a..j and the newline
    train_ids = torch.cat([b[0].flatten() for b in data.loader("train")])
    test_ids = torch.cat([b[0].flatten() for b in data.loader("test")])
    # 90 % of the characters: files a..i train, j alone tests; no file in both
    assert set(test_ids.tolist()) <= {0, 10} and 10 not in set(train_ids.tolist())  # "\n" is 0
    inputs, targets = data.test[0]
    assert torch.equal(inputs[1:], targets[:-1])  # next-character targets


def test_text_honours_train_and_test_folders_and_cuts_one_file_at_a_line(tmp_path):
    from compress.data.text import text_splits

    root = _corpus(tmp_path / "split", {"train/x.txt": "train text", "test/y.txt": "test text"})
    assert text_splits(root) == ("train text", "test text")
    single = tmp_path / "one.txt"
    single.write_text("".join(f"line {i}\n" for i in range(100)))
    train, test = text_splits(single)
    assert train + test == single.read_text() and train.endswith("\n")
    assert 0.85 < len(train) / len(single.read_text()) <= 0.9


def test_text_with_a_local_tokenizer_encodes_as_the_tokenizer_does(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    words = ["to", "be", "or", "not", "that", "is", "the", "question", "[UNK]"]
    model = tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]")
    tokenizer = tokenizers.Tokenizer(model)
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    line = "to be or not to be that is the question "
    root = _corpus(tmp_path / "corpus", {"a.txt": line * 40, "b.txt": line * 4})
    config = {"name": "text", "root": str(root), "tokenizer": str(tmp_path), "context": 8}
    data = build_data({**config, "calibration_size": 2})
    assert data.num_classes == len(words)
    expected = tokenizer.encode((line * 4).replace("\r\n", "\n")).ids
    got = torch.cat([b[0] for b in data.loader("test")], 0)
    assert got[0].tolist() == expected[:8]


def test_bad_text_inputs_are_one_line_errors(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9\n" * 10)
    with pytest.raises(DataError, match="not UTF-8 text"):
        build_data({"name": "text", "root": str(tmp_path / "bad.txt"), "context": 4})
    (tmp_path / "good.txt").write_text("hello world\n" * 50)
    with pytest.raises(DataError, match="data.tokenizer: .* holds no tokenizer.json"):
        build_data(
            {
                "name": "text",
                "root": str(tmp_path / "good.txt"),
                "tokenizer": str(tmp_path / "none"),
            }
        )
    with pytest.raises(DataError, match="data.root"):
        build_data({"name": "text", "context": 4})
