"""The task's metric over a split: per-example score rows (what paired intervals resample)
and their summary, from the model's outputs on the test (or another) split.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from compress.core import distributed
from compress.data import Data, dataset_length
from compress.spec.tasks import get_task


def metrics(
    model: nn.Module, data: Data, device: str = "cpu", split: str = "test", shard: bool = True
) -> dict[str, float]:
    """The task's metric (first) and its other figures on a split (the test split by
    default): ``{"top-1": ..., "top-5": ...}`` for classification, ``{"mIoU": ...,
    "pixel accuracy": ...}`` for segmentation.

    Under torchrun each rank scores its own share and the shares are combined, so every
    example counts once whatever the number of processes; ``shard=False`` scores the whole
    split in this process alone (no collective).

    Example:
        >>> metrics(model, data)["top-1"]
    """
    return get_task(data.task).summarize(example_scores(model, data, device, split, shard))


def example_scores(
    model: nn.Module, data: Data, device: str = "cpu", split: str = "test", shard: bool = True
) -> np.ndarray:
    """The task's row for each example of ``split`` (in the split's order; for
    classification: top-1 hit, top-5 hit, 1): what a paired comparison of two models needs
    (compress.spec.tasks).

    Example:
        >>> rows = example_scores(model, data)
        >>> get_task(data.task).summarize(rows)
    """
    task = get_task(data.task)
    batches = []
    with torch.inference_mode():
        for batch in data.loader(split, shard=shard):
            inputs, targets, _ = task.split(batch)
            output = task.output(model(to_device(inputs, device)))
            if isinstance(output, torch.Tensor):  # a detector's are dicts of tensors
                output = output.float()
            batches.append(task.scores(output, to_device(targets, device)))
    rows = np.concatenate(batches)
    if shard:
        rows = distributed.gather_shards(rows, dataset_length(getattr(data, split)))
    return rows


def to_device(value, device: str):
    """Tensors (in a tuple, list or dict too) moved to ``device``.

    Example:
        >>> to_device([{"boxes": boxes}], "cuda")[0]["boxes"].device
        device(type='cuda', index=0)
    """
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    return value
