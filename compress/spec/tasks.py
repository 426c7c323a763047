"""Tasks: what a batch holds, how a model's output is read, the training loss, the
distillation loss and the metric. A task is a plug-in, registered once with
``@register_task`` like a stage; the training loop, the evaluator, the report, the control,
the fallback and search read every figure through it.

A task scores each test example as a row of numbers whose sum over any set of examples
gives the metric (top-1 and top-5 hits; per-class intersection and union pixels; a custom
metric's value times its batch size): the paired drop between two models then comes from
the same rows, exact McNemar for classification, a seeded paired bootstrap for the others.

Example:
    >>> task = get_task("segmentation")
    >>> rows = task.scores(model(images), masks)       # one row per image
    >>> task.summarize(rows)["mIoU"]
    >>> task.drop(baseline_rows, rows).interval        # 95 %, points of mIoU
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from compress.core import stats
from compress.core.errors import TaskError

TASKS: dict[str, type[Task]] = {}
# Segmentation masks mark pixels that count for nothing (borders, unlabelled) with this
# value, as Pascal VOC does.
IGNORE_INDEX = 255


def register_task(name: str):
    """Class decorator registering a :class:`Task` subclass as ``name``.

    Example:
        >>> @register_task("my_task")
        ... class MyTask(Task): ...
    """

    def add(cls: type[Task]) -> type[Task]:
        if name in TASKS:
            raise AssertionError(f"task {name!r} is registered twice")  # a code bug
        cls.name = name
        TASKS[name] = cls
        return cls

    return add


def get_task(task: str | Task | None) -> Task:
    """A task by name (``None``: classification), or the task itself.

    Example:
        >>> get_task("classification").metric
        'top-1'
    """
    if isinstance(task, Task):
        return task
    name = task or "classification"
    if name not in TASKS:
        raise TaskError(f"unknown task {name!r}; known: {', '.join(sorted(TASKS))}")
    return TASKS[name]()


class Task:
    """The contract every task keeps (classification's defaults, where it has one).

    ``metric`` names the headline figure, in ``unit``; ``higher_is_better`` orients its
    drop (a drop is always "worse by", positive when the model lost quality).
    """

    name = ""
    metric = ""
    unit = "%"
    higher_is_better = True
    interval_method = "paired bootstrap over test examples"
    dense = False  # targets are per-pixel masks that move with their images (augmentation)
    images = True  # inputs are images: train.augment (crop, flip, erase) applies
    augmentable = True  # False where augmenting would have to move the targets too (boxes)
    # Distilled by its own loss plus feature hints (a detector), not by the outputs' KL.
    own_distillation = False
    collate: Callable | None = None  # a DataLoader's collate_fn; None: torch's default

    def train_loss(self, model, inputs, targets, label_smoothing: float = 0.0):
        """A training batch's loss and the output the running metric scores (or None)."""
        output = self.output(model(inputs))
        return self.loss(output, targets, label_smoothing), output

    def split(self, batch) -> tuple[Any, Any, tuple]:
        """(inputs, targets, extra) of one batch as a DataLoader yields it."""
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise TaskError(
                f"task {self.name}: a batch must be (inputs, targets, ...); got"
                f" {type(batch).__name__}"
            )
        inputs, targets, *extra = batch
        return inputs, targets, tuple(extra)

    def output(self, raw) -> torch.Tensor:
        """The tensor the loss and metric read from a model's output: the tensor itself, a
        dict's ``"out"`` (torchvision's segmentation models) or a tuple's first item."""
        if isinstance(raw, dict):
            raw = raw.get("out", next(iter(raw.values()), None))
        elif isinstance(raw, (tuple, list)) and raw:
            raw = raw[0]
        if not isinstance(raw, torch.Tensor):
            raise TaskError(
                f"task {self.name}: the model returned {type(raw).__name__}; expected a"
                " tensor, a dict with 'out' or a tuple whose first item is a tensor"
            )
        return raw

    def loss(self, output: torch.Tensor, targets, label_smoothing: float = 0.0) -> torch.Tensor:
        raise NotImplementedError

    def difference(self, output, expected) -> float:
        """The largest absolute difference between two outputs (a runtime's and torch's)."""
        return (output.float() - expected.float()).abs().max().item()

    def distill_loss(
        self,
        student: torch.Tensor,
        teacher: torch.Tensor,
        targets,
        temperature: float,
        alpha: float,
    ) -> torch.Tensor:
        """``alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * loss(student)``, the KL
        over the class dimension (1), averaged over what the loss averages over."""
        soft = F.kl_div(
            F.log_softmax(student.float() / temperature, dim=1),
            F.log_softmax(teacher.float() / temperature, dim=1),
            reduction="none",
            log_target=True,
        ).sum(1)
        weight = self._kept(targets, soft)
        soft = (soft * weight).sum() / weight.sum().clamp(min=1)
        return alpha * temperature**2 * soft + (1 - alpha) * self.loss(student.float(), targets)

    def _kept(self, targets, per_position: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(per_position)

    def scores(self, output: torch.Tensor, targets) -> np.ndarray:
        """One row per example; summed over examples, the rows give the metric."""
        raise NotImplementedError

    def summarize(self, rows: np.ndarray) -> dict[str, float]:
        """The metric (first) and any secondary figures from per-example rows."""
        return self.from_totals(np.asarray(rows, np.float64).sum(0))

    def from_totals(self, totals: np.ndarray) -> dict[str, float]:
        raise NotImplementedError

    def drop(self, baseline: np.ndarray, model: np.ndarray, seed: int = 0) -> stats.Drop:
        """How much worse ``model`` is than ``baseline`` in points of the metric, paired
        example by example, with its 95 % interval (compress.core.stats.paired_bootstrap)."""
        drop = stats.paired_bootstrap(baseline, model, self._headline, self.higher_is_better, seed)
        return replace(drop, method=self.interval_method, metric=self.metric)

    def _headline(self, totals: np.ndarray) -> np.ndarray:
        """The metric of each row of ``totals`` (resamples x columns); a task overrides it
        with a vectorised form."""
        return np.array([next(iter(self.from_totals(t).values())) for t in totals])

    def check_targets(self, output: torch.Tensor, targets) -> None:
        """One clear line when targets cannot go with this output."""


@register_task("classification")
class Classification(Task):
    """One integer label per example; logits of shape (N, classes). Top-1 (and top-5)."""

    metric = "top-1"
    interval_method = "exact McNemar over test images"

    def loss(self, output, targets, label_smoothing=0.0):
        return F.cross_entropy(output, targets, label_smoothing=label_smoothing)

    def check_targets(self, output, targets):
        if output.ndim != 2 or not isinstance(targets, torch.Tensor) or targets.ndim != 1:
            raise TaskError(
                f"task classification: expected logits (N, classes) and labels (N,); got"
                f" output {tuple(output.shape)} and targets {_shape(targets)}"
            )
        if targets.dtype.is_floating_point:
            raise TaskError(f"task classification: labels must be integers; got {targets.dtype}")

    def scores(self, output, targets):
        """Per image: top-1 hit, top-5 hit, 1 (the count the sums divide by)."""
        self.check_targets(output, targets)
        best = output.float().topk(min(5, output.shape[1]), dim=1).indices
        top1 = best[:, 0] == targets
        top5 = (best == targets[:, None]).any(dim=1)
        return torch.stack([top1, top5, torch.ones_like(top1)], 1).cpu().numpy().astype(np.uint8)

    def from_totals(self, totals):
        images = max(float(totals[2]), 1.0)
        return {
            "top-1": float(100.0 * totals[0] / images),
            "top-5": float(100.0 * totals[1] / images),
        }

    def _headline(self, totals):
        return 100.0 * totals[:, 0] / np.maximum(totals[:, 2], 1)

    def drop(self, baseline, model, seed=0):
        """Exact McNemar on the images whose top-1 verdict flipped (compress.core.stats)."""
        drop = stats.paired_drop(
            np.asarray(baseline)[:, 0].astype(bool), np.asarray(model)[:, 0].astype(bool)
        )
        return replace(drop, metric=self.metric)


@register_task("segmentation")
class Segmentation(Task):
    """Per-pixel classes: logits (N, classes, H, W), masks (N, H, W) of class indices with
    :data:`IGNORE_INDEX` for pixels that count for nothing. mIoU over the classes present
    in the split (Pascal VOC's definition: intersection over union of all test pixels of a
    class), and pixel accuracy."""

    metric = "mIoU"
    dense = True

    def loss(self, output, targets, label_smoothing=0.0):
        return F.cross_entropy(
            output, targets, ignore_index=IGNORE_INDEX, label_smoothing=label_smoothing
        )

    def _kept(self, targets, per_position):
        return (targets != IGNORE_INDEX).to(per_position.dtype)

    def check_targets(self, output, targets):
        if output.ndim != 4 or not isinstance(targets, torch.Tensor) or targets.ndim != 3:
            raise TaskError(
                f"task segmentation: expected logits (N, classes, H, W) and masks (N, H, W);"
                f" got output {tuple(output.shape)} and targets {_shape(targets)}"
            )
        if output.shape[-2:] != targets.shape[-2:] or targets.dtype.is_floating_point:
            raise TaskError(
                f"task segmentation: masks must be integer class indices of the output's"
                f" size {tuple(output.shape[-2:])}; got {targets.dtype} {tuple(targets.shape)}"
            )

    def scores(self, output, targets):
        """Per image: each class's intersection and union pixels, then the correct and the
        counted pixels (2 * classes + 2 columns)."""
        self.check_targets(output, targets)
        classes = output.shape[1]
        predicted = output.argmax(1)
        valid = targets != IGNORE_INDEX
        rows = []
        for c in range(classes):
            mine, truth = (predicted == c) & valid, targets == c
            rows.append((mine & truth).sum((1, 2)))
            rows.append((mine | truth).sum((1, 2)))
        rows.append(((predicted == targets) & valid).sum((1, 2)))
        rows.append(valid.sum((1, 2)))
        return torch.stack(rows, 1).cpu().numpy().astype(np.int32)

    def from_totals(self, totals):
        miou, pixels = self._vector(np.asarray(totals, np.float64)[None])
        return {"mIoU": float(miou[0]), "pixel accuracy": float(pixels[0])}

    def _vector(self, totals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """mIoU and pixel accuracy (percent) of each row of ``totals``."""
        pairs = totals[:, :-2].reshape(len(totals), -1, 2)
        intersection, union = pairs[..., 0], pairs[..., 1]
        present = union > 0  # a class absent from truth and prediction does not count
        iou = np.where(present, intersection / np.maximum(union, 1), 0.0)
        miou = 100.0 * iou.sum(1) / np.maximum(present.sum(1), 1)
        return miou, 100.0 * totals[:, -2] / np.maximum(totals[:, -1], 1)

    def _headline(self, totals):
        return self._vector(totals)[0]


@register_task("custom")
class Custom(Task):
    """The user's own loss and metric: ``loss(output, targets) -> tensor`` and
    ``metric(output, targets) -> float`` (higher is better unless said). A metric that also
    gives per-example values (``metric.per_example(output, targets) -> array``) pairs
    examples; one without it is paired by batches, and the drop says so.

    Example:
        >>> task = Custom(loss=my_loss, metric=my_dice, name="Dice")
    """

    interval_method = "paired bootstrap over test batches (the metric gives no per-example values)"

    def __init__(
        self,
        loss: Callable | None = None,
        metric: Callable | None = None,
        name: str = "metric",
        unit: str = "",
        higher_is_better: bool = True,
        output: Callable | None = None,
    ):
        self._loss, self._metric, self._output = loss, metric, output
        self.metric, self.unit, self.higher_is_better = name, unit, higher_is_better
        if metric is not None and hasattr(metric, "per_example"):
            self.interval_method = "paired bootstrap over test examples"

    def output(self, raw):
        return self._output(raw) if self._output is not None else super().output(raw)

    def loss(self, output, targets, label_smoothing=0.0):
        if self._loss is None:
            raise TaskError("task custom: this stage trains, and the task has no loss")
        return self._loss(output, targets)

    def scores(self, output, targets):
        """Rows of (value x weight, weight): the metric's mean over the rows' examples."""
        if self._metric is None:
            raise TaskError("task custom: evaluating needs a metric; the task has none")
        per_example = getattr(self._metric, "per_example", None)
        try:
            if per_example is not None:
                values = np.asarray(per_example(output, targets), np.float64).reshape(-1)
                rows = np.stack([values, np.ones_like(values)], 1)
            else:
                size = len(output)
                value = float(self._metric(output, targets))
                rows = np.array([[value * size, size]], np.float64)
        except TaskError:
            raise
        except Exception as error:  # noqa: BLE001 - the user's code: one line, whatever broke
            raise TaskError(
                f"task custom: the metric {self.metric!r} raised {type(error).__name__}: {error}"
            ) from None
        if not np.isfinite(rows).all():
            raise TaskError(f"task custom: the metric {self.metric!r} returned NaN or infinity")
        return rows

    def from_totals(self, totals):
        return {self.metric: float(totals[0] / max(totals[1], 1e-12))}

    def _headline(self, totals):
        return totals[:, 0] / np.maximum(totals[:, 1], 1e-12)


def _shape(value) -> str:
    return str(tuple(value.shape)) if isinstance(value, torch.Tensor) else type(value).__name__


# The other tasks, each in its own module, registered with this one.
from compress.spec import detection, language_model  # noqa: E402,F401
