"""A dataset's three splits (:class:`Data`), built from the dataset a recipe names.

Every dataset yields three splits: ``train``, ``calibration`` (a held-out slice of the
training set, never the test split) and ``test``. The datasets themselves are registered
with ``@register_dataset`` in their own modules of this package (fashion_mnist, folders,
synthetic); the user's own come from ``data.name: package.module:factory``. Nothing is
downloaded unless the recipe says ``download: true``.
"""

from __future__ import annotations

from collections.abc import Sized
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    DistributedSampler,
    Subset,
)

from compress.core import distributed
from compress.core.errors import DataError
from compress.core.registry import DATASETS, dataset_spec
from compress.spec.architectures import import_factory
from compress.spec.recipe import DataConfig, as_config
from compress.spec.tasks import Task, get_task


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
    # One input's shape: (channels, height, width) of an image, (T,) of a block of token ids.
    input_shape: tuple[int, ...]
    config: DataConfig = field(default_factory=DataConfig)
    # What a batch's targets are and how models are scored (compress.spec.tasks): a name or a
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
            sampler: DistributedSampler[Any] = DistributedSampler(
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
            collate_fn=get_task(self.task).collate,  # None: torch's default
        )

    def example_input(self, batch_size: int = 1) -> torch.Tensor:
        """A batch of real test inputs (images (N, C, H, W), or a language model's integer
        token ids (N, T)), for tracing, export and latency measurement.

        Example:
            >>> data.example_input(4).shape  # shakespeare_char, data.context 32
            torch.Size([4, 32])
        """
        inputs = torch.stack(
            [self.test[i][0] for i in range(min(batch_size, dataset_length(self.test)))]
        )
        if inputs.shape[0] < batch_size:  # a tiny test split: repeat to the batch size asked
            copies = (batch_size + inputs.shape[0] - 1) // inputs.shape[0]
            inputs = inputs.repeat(copies, *[1] * (inputs.ndim - 1))  # along the batch only
        return inputs[:batch_size]


class _NoLoneBatch(BatchSampler):
    """The sampler's order in batches, leaving out a last batch of one image (one image of
    an epoch; a split of one image stays whole)."""

    def _lone(self) -> bool:
        count = len(cast(Sized, self.sampler))
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
    settings: DataConfig = as_config("data", config or {})
    if ":" in settings.name:
        return _from_factory(settings, seed)
    spec = dataset_spec(settings.name)
    mean, std = settings.mean or spec.mean or [0.0], settings.std or spec.std or [1.0]
    train, test, num_classes = spec.load(settings, list(mean), list(std), seed)
    train, calibration = _hold_out(train, settings.calibration_size, seed)
    train = _first(train, settings.train_subset)
    test = _first(test, settings.test_subset)
    input_shape = tuple(test[0][0].shape)
    task = dataset_task(settings)
    return Data(train, calibration, test, num_classes, input_shape, settings, task)


def dataset_task(config: DataConfig) -> str | Task:
    """The recipe's data.task (a name, or a factory's Task), else the dataset's own."""
    if config.task is None:
        spec = DATASETS.get(config.name)
        return spec.task if spec is not None else "classification"
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


def _first(dataset: Dataset, count: int | None) -> Dataset:
    if count is None or count >= dataset_length(dataset):
        return dataset
    return Subset(dataset, range(count))


def _hold_out(train: Dataset, size: int, seed: int) -> tuple[Dataset, Dataset]:
    """Split a fixed, seeded calibration slice off the training set."""
    if size >= dataset_length(train):
        raise DataError(
            f"data.calibration_size={size} leaves no training images "
            f"(the training set has {dataset_length(train)}); lower it"
        )
    order = torch.randperm(
        dataset_length(train), generator=torch.Generator().manual_seed(seed)
    ).tolist()
    return Subset(train, order[size:]), Subset(train, order[:size])


def normalised(images: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    """uint8 images (N, C, H, W) as floats in [0, 1], less ``mean``, over ``std``."""
    images = images.float().div_(255.0)
    mean_t = torch.tensor(mean).view(1, -1, 1, 1)
    std_t = torch.tensor(std).view(1, -1, 1, 1)
    return images.sub_(mean_t).div_(std_t)


def dataset_length(dataset: Dataset) -> int:
    """A map-style dataset's size (torch's Dataset type does not declare ``__len__``)."""
    return len(cast(Sized, dataset))
