"""Datasets and splits: Fashion-MNIST (embedded default), CIFAR-10, ImageFolder, synthetic.

Every dataset yields three splits: ``train``, ``calibration`` (a held-out slice of the
training set, never the test split) and ``test``. Nothing is downloaded unless the recipe
says ``download: true``.
"""

from __future__ import annotations

import functools
import gzip
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torchvision
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    DistributedSampler,
    Subset,
    TensorDataset,
)
from torchvision import transforms

from compress import distributed
from compress.architectures import import_factory
from compress.errors import DataError
from compress.paths import cache_dir
from compress.recipe import DataConfig, section
from compress.tasks import Task
from compress.voc import SCENES_CLASSES, read_voc, write_scenes

# Debian's `dataset-fashion-mnist` package installs the four idx files here.
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
_FASHION_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# Per-dataset normalisation (mean, std per channel), measured on each training set.
_NORMALISATION = {
    "fashion_mnist": ([0.2860], [0.3530]),
    "cifar10": ([0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]),
    "imagefolder": ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),  # ImageNet statistics
    "synthetic": ([0.0], [1.0]),
    "fashion_mnist_scenes": ([0.1009], [0.2516]),  # measured on its train scenes
    "voc": ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
}
DATASETS = tuple(_NORMALISATION)
# The task of each dataset (compress.tasks); the others are classification.
DATASET_TASKS = {"fashion_mnist_scenes": "segmentation", "voc": "segmentation"}
# Scenes `make setup` writes (and a run writes where they are missing: ~30 s, from the local
# Fashion-MNIST files): 12,000 train scenes from train garments, 2,000 test scenes from test
# garments.
SCENES_COUNTS = {"train": 12_000, "test": 2_000}


def scenes_root() -> Path:
    """Where Fashion-MNIST scenes live unless data.root says otherwise (the cache folder)."""
    return cache_dir() / "fashion_mnist_scenes"


def fashion_mnist_scenes(
    root: str | Path | None = None, download: bool = False, counts: dict | None = None
) -> Path:
    """The Fashion-MNIST scenes folder (VOC layout), written first where it is missing;
    ``counts`` scenes per split (default :data:`SCENES_COUNTS`).

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
    image_stem, label_stem = _FASHION_FILES[split]
    return _read_idx(_find_idx(folder, image_stem)), _read_idx(_find_idx(folder, label_stem))


@dataclass
class Data:
    """The three splits of one dataset, plus what a model needs to know about it.

    Example:
        >>> data = build_data(DataConfig(name="synthetic", synthetic_size=64))
        >>> images, labels = next(iter(data.loader("test")))
    """

    train: Dataset
    calibration: Dataset
    test: Dataset
    num_classes: int
    input_shape: tuple[int, int, int]  # channels, height, width of one image
    config: DataConfig = field(default_factory=DataConfig)
    # What a batch's targets are and how models are scored (compress.tasks): a name or a
    # Task, such as Custom(loss=..., metric=...).
    task: str | Task = "classification"

    @classmethod
    def of(
        cls,
        test: Dataset,
        calibration: Dataset,
        train: Dataset | None = None,
        task: str | Task = "classification",
        num_classes: int | None = None,
        batch_size: int = 128,
        eval_batch_size: int = 50,
    ) -> Data:
        """The user's own datasets, each item ``(input, target)``, as compress's data: the
        test split scores models, the calibration split (never the test split) calibrates
        and validates, ``train`` is needed only by stages that train. A metric paired by
        batches gets one example per ``eval_batch_size`` test items.

        Example:
            >>> data = Data.of(my_test, my_calibration, my_train, task="segmentation")
            >>> compress.evaluate(model, data)
        """
        config = DataConfig(
            name="synthetic", batch_size=batch_size, eval_batch_size=eval_batch_size
        )
        shape = tuple(test[0][0].shape)
        train = train if train is not None else Subset(calibration, [])
        return cls(train, calibration, test, num_classes or 0, shape, config, task)

    def loader(
        self,
        split: str,
        batch_size: int | None = None,
        shuffle: bool = False,
        seed: int = 0,
        epoch: int = 0,
        shard: bool = False,
    ) -> DataLoader:
        """A DataLoader over one split; the batch size defaults to the recipe's.

        ``shuffle`` draws a new seeded order each ``epoch``; under torchrun each rank reads
        its share of it (a DistributedSampler, padded to equal lengths, as training needs).
        ``shard`` gives an evaluation share instead: strided, no padded duplicates.
        """
        dataset = getattr(self, split)
        if batch_size is None:
            batch_size = self.config.batch_size if split == "train" else self.config.eval_batch_size
        if shard and not shuffle and distributed.world_size() > 1:
            dataset = Subset(dataset, distributed.shard(len(dataset)))
        batches = None
        if shuffle:
            # With one process this is the order a seeded RandomSampler gives: randperm
            # seeded with seed + epoch.
            sampler = DistributedSampler(
                dataset,
                num_replicas=distributed.world_size(),
                rank=distributed.rank(),
                shuffle=True,
                seed=seed,
            )
            sampler.set_epoch(epoch)
            # A training order never ends in a batch of one image: BatchNorm cannot
            # normalise it in training mode (one value per channel at 1x1).
            batches = _NoLoneBatch(sampler, batch_size, drop_last=False)
        return DataLoader(
            dataset,
            batch_size=1
            if batches is not None
            else batch_size,  # DataLoader's default with a batch_sampler
            batch_sampler=batches,
            # Workers' base seed comes from this generator, not from the global RNG.
            generator=torch.Generator().manual_seed(seed + epoch),
            num_workers=self.config.workers,
        )

    def example_input(self, batch_size: int = 1) -> torch.Tensor:
        """A batch of real test images, for tracing, export and latency measurement."""
        images = torch.stack([self.test[i][0] for i in range(min(batch_size, len(self.test)))])
        if images.shape[0] < batch_size:  # a tiny test split: repeat to the batch size asked
            images = images.repeat((batch_size + images.shape[0] - 1) // images.shape[0], 1, 1, 1)
        return images[:batch_size]


class _NoLoneBatch(BatchSampler):
    """The sampler's order in batches, leaving out a last batch of one image (one image of
    an epoch; a split of one image stays whole)."""

    def _lone(self) -> bool:
        count = len(self.sampler)
        return count > 1 and count % self.batch_size == 1

    def __iter__(self):
        batches = super().__iter__()
        for _ in range(len(self)):
            yield next(batches)

    def __len__(self) -> int:
        return super().__len__() - self._lone()


def build_data(config: DataConfig | dict | None = None, seed: int = 0) -> Data:
    """Load the dataset a recipe's ``data`` section names (a DataConfig or the same as a
    mapping; default Fashion-MNIST) and split it.

    Example:
        >>> data = build_data(DataConfig())  # Fashion-MNIST from the Debian package
        >>> len(data.test)
        10000
    """
    config = section("data", config or {})
    if ":" in config.name:
        return _from_factory(config, seed)
    mean, std = (
        config.mean or _NORMALISATION[config.name][0],
        config.std or _NORMALISATION[config.name][1],
    )
    if config.name == "fashion_mnist":
        train, test, num_classes = _fashion_mnist(config, mean, std)
    elif config.name in DATASET_TASKS:
        train, test, num_classes = _segmentation_folder(config, mean, std)
    elif config.name == "synthetic":
        train, test, num_classes = _synthetic(config, seed)
    else:
        train, test, num_classes = _torchvision_folder(config, mean, std)
    train, calibration = _hold_out(train, config.calibration_size, seed)
    train = _first(train, config.train_subset)
    test = _first(test, config.test_subset)
    input_shape = tuple(test[0][0].shape)
    task = dataset_task(config)
    return Data(train, calibration, test, num_classes, input_shape, config, task)


def dataset_task(config: DataConfig) -> str | Task:
    """The recipe's data.task (a name, or a factory's Task), else the dataset's own."""
    if config.task is None:
        return DATASET_TASKS.get(config.name, "classification")
    if ":" not in config.task:
        return config.task
    task = import_factory(config.task, "data.task")()
    if not isinstance(task, Task):
        raise DataError(f"data.task: {config.task!r} returned {type(task).__name__}, not a Task")
    return task


def _from_factory(config: DataConfig, seed: int) -> Data:
    """The user's data: ``factory(**data.kwargs)`` returns a mapping with "train" and
    "test" Datasets, and optionally "calibration" (else held out of train as for every
    dataset), "num_classes" and "task"."""
    made = import_factory(config.name, "data.name")(**config.kwargs)
    if not isinstance(made, dict) or not {"train", "test"} <= set(made):
        raise DataError(
            f"data.name: {config.name!r} must return a mapping with 'train' and 'test' Datasets"
            f" (and optionally 'calibration', 'num_classes', 'task'); got {type(made).__name__}"
        )
    train, test = made["train"], made["test"]
    if made.get("calibration") is not None:
        calibration = made["calibration"]
    else:
        train, calibration = _hold_out(train, config.calibration_size, seed)
    train, test = _first(train, config.train_subset), _first(test, config.test_subset)
    task = made.get("task") or dataset_task(config)
    shape = tuple(test[0][0].shape)
    return Data(train, calibration, test, int(made.get("num_classes") or 0), shape, config, task)


def _segmentation_folder(config: DataConfig, mean, std):
    if config.name == "fashion_mnist_scenes":
        root, classes = fashion_mnist_scenes(config.root, config.download), SCENES_CLASSES
    elif not config.root:
        raise DataError("data.root is required for data.name='voc': the VOC-layout folder")
    else:
        root, classes = config.root, config.classes
    train, test, classes = read_voc(root, classes)
    for split in (train, test):
        split.transform = _PairTransform(mean, std, config.image_size)
    return train, test, classes


class _PairTransform:
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


def _first(dataset: Dataset, count: int | None) -> Dataset:
    if count is None or count >= len(dataset):
        return dataset
    return Subset(dataset, range(count))


def _hold_out(train: Dataset, size: int, seed: int) -> tuple[Dataset, Dataset]:
    """Split a fixed, seeded calibration slice off the training set."""
    if size >= len(train):
        raise DataError(
            f"data.calibration_size={size} leaves no training images "
            f"(the training set has {len(train)}); lower it"
        )
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed)).tolist()
    return Subset(train, order[size:]), Subset(train, order[:size])


def _normalised(images: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    images = images.float().div_(255.0)
    mean_t = torch.tensor(mean).view(1, -1, 1, 1)
    std_t = torch.tensor(std).view(1, -1, 1, 1)
    return images.sub_(mean_t).div_(std_t)


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


def _fashion_mnist(config: DataConfig, mean, std):
    folder = fashion_mnist_folder(config.root, config.download)
    splits = []
    for split in ("train", "test"):
        images, labels = fashion_mnist_split(folder, split)
        images = torch.from_numpy(images.copy()).unsqueeze(1)
        labels = torch.from_numpy(labels.astype(np.int64))
        if config.image_size and config.image_size != images.shape[-1]:
            images = torch.nn.functional.interpolate(
                images.float(), size=config.image_size, mode="bilinear", antialias=True
            )
        splits.append(TensorDataset(_normalised(images, mean, std), labels))
    return splits[0], splits[1], 10


def _synthetic(config: DataConfig, seed: int):
    """Random images with random labels: for latency-only runs and tests, never accuracy."""
    generator = torch.Generator().manual_seed(seed)
    channels, size = config.synthetic_channels, config.image_size or 28
    splits = []
    for count in (config.synthetic_size + config.calibration_size, config.synthetic_size):
        images = torch.randn(count, channels, size, size, generator=generator)
        labels = torch.randint(0, config.synthetic_classes, (count,), generator=generator)
        splits.append(TensorDataset(images, labels))
    return splits[0], splits[1], config.synthetic_classes


def _torchvision_folder(config: DataConfig, mean, std):
    if not config.root:
        raise DataError(
            f"data.root is required for data.name={config.name!r}: "
            "the folder that holds the dataset"
        )
    root = Path(config.root).expanduser()
    steps = [transforms.Resize(config.image_size)] if config.image_size else []
    if config.image_size:
        steps.append(transforms.CenterCrop(config.image_size))
    transform = transforms.Compose([*steps, transforms.ToTensor(), transforms.Normalize(mean, std)])
    try:
        if config.name == "cifar10":
            train = torchvision.datasets.CIFAR10(
                str(root), True, transform, download=config.download
            )
            test = torchvision.datasets.CIFAR10(
                str(root), False, transform, download=config.download
            )
            return train, test, 10
        # imagefolder: root/train/<class>/*.jpg and root/test/<class>/*.jpg (or root/val)
        test_dir = next((root / d for d in ("test", "val") if (root / d).is_dir()), None)
        if not (root / "train").is_dir() or test_dir is None:
            raise DataError(
                f"data.root={str(root)!r} must hold train/ and test/ (or val/) folders"
                " with one sub-folder per class"
            )
        train = torchvision.datasets.ImageFolder(str(root / "train"), transform)
        test = torchvision.datasets.ImageFolder(str(test_dir), transform)
        if test.classes != train.classes:  # else labels would be numbered differently
            only_train = sorted(set(train.classes) - set(test.classes))
            only_test = sorted(set(test.classes) - set(train.classes))
            raise DataError(
                f"data.root={str(root)!r}: {test_dir.name}/ and train/ must hold the same class"
                f" folders (only in train/: {only_train[:5] or 'none'};"
                f" only in {test_dir.name}/: {only_test[:5] or 'none'})"
            )
        return train, test, len(train.classes)
    except RuntimeError as error:  # torchvision's "Dataset not found or corrupted"
        if isinstance(error, DataError):
            raise
        raise DataError(
            f"{config.name} not readable under data.root={str(root)!r}: {error}."
            " Fix the path, or set data.download: true"
        ) from None
