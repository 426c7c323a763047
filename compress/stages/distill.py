"""The distill stage: a student learns from a teacher (Hinton et al., 2015), optionally
through intermediate layers too: hint losses with 1x1 adapters (FitNets, Romero et al.,
2015) and attention transfer (Zagoruyko & Komodakis, 2017).

The student is the model from the previous stage (a pruned model, say), or a fresh model
the recipe names; the teacher is the run's baseline unless the recipe names one. Training
goes through the shared loop with the losses below; the output distillation loss is the
task's (compress.spec.tasks: KL over classes, per image or per pixel).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import Dataset

from compress.core.errors import RecipeError
from compress.core.registry import StageContext, register_stage
from compress.core.schema import Config, option
from compress.core.traits import set_traits
from compress.data import Data, dataset_length
from compress.models.build import build_model
from compress.spec.recipe import ModelConfig, TrainConfig
from compress.spec.tasks import get_task
from compress.training.train import train

log = logging.getLogger("compress")
# The teacher's outputs are cached for the whole train split only up to this size: a
# segmenter's per-pixel logits for 60,000 scenes would take tens of GiB.
MAX_CACHED_TEACHER_BYTES = 1 << 30


@dataclass
class LayerPair(Config):
    """A student layer matched with a teacher layer (dotted module names), for the feature
    and attention losses."""

    student: str  # a dotted module name of the student
    teacher: str  # a dotted module name of the teacher
    weight: float = option(1.0, min=0.0)  # this pair's loss weight


@dataclass
class DistillConfig(Config):
    """`stages: - distill: {...}`: knowledge distillation through the shared training loop."""

    method: Literal["kd"] = "kd"  # Hinton's logit distillation, plus the losses below
    teacher: ModelConfig | None = None  # a model spec (model keys); default: the run's baseline
    # A model spec to distill into a fresh model; default: the previous stage's model.
    student: ModelConfig | None = None
    temperature: float = option(4.0, min=1.0)  # softens both distributions
    # Weight of the soft (teacher) term; the hard-label term gets 1 - alpha.
    alpha: float = option(0.9, min=0.0, max=1.0)
    # Hint losses (FitNets): MSE between a student layer's output, through a 1x1 adapter
    # where channel counts differ, and a teacher layer's output.
    features: list[LayerPair] = option(default_factory=list)
    # Attention transfer (Zagoruyko & Komodakis, 2017): match the normalised spatial maps
    # of squared activations; the paper weighs each pair by about 1000.
    attention: list[LayerPair] = option(default_factory=list)
    # Compute the teacher's logits once, before training, instead of every step: without
    # random augmentation (train.augment none) they never change. Logit distillation only;
    # with augmentation, or outputs over 1 GiB for the split (a segmenter's), the teacher
    # sees each batch, whatever this says.
    cache_teacher: bool = True
    train: TrainConfig = option(default_factory=TrainConfig)  # the student's training settings


def attention_map(features: torch.Tensor) -> torch.Tensor:
    """Zagoruyko & Komodakis' spatial attention: mean of squares over channels, flattened
    and L2-normalised per image.

    Example:
        >>> attention_map(torch.ones(2, 8, 4, 4)).shape
        torch.Size([2, 16])
    """
    return F.normalize(features.float().pow(2).mean(1).flatten(1), dim=1)


@register_stage("distill", DistillConfig)
def distill(
    model: nn.Module,
    data: Data,
    config: DistillConfig,
    *,
    teacher: nn.Module | None = None,
    context: StageContext,
) -> nn.Module:
    """Train a student (a copy of ``model``, or ``config.student``) against ``teacher``
    (default: ``config.teacher``, else the run's baseline, ``context.baseline``).

    Example:
        >>> student = distill(pruned, data, teacher=baseline, train={"epochs": 2})
        >>> student = distill(small, data, teacher=baseline,
        ...                   features=[{"student": "layer3", "teacher": "layer3"}])
    """
    teacher = teacher if teacher is not None else context.baseline
    if config.teacher is not None:
        teacher = build_model(config.teacher, data=data)
    if teacher is None:
        raise ValueError(
            "distill needs a teacher: the run's baseline, teacher= in Python, or distill.teacher"
        )
    if config.student is not None:
        # Seeded: the same student starts from the same weights, whatever ran before.
        with torch.random.fork_rng():
            torch.manual_seed(context.seed)
            student = build_model(config.student, data=data)
    else:
        student = copy.deepcopy(model)
        # The previous stage's remarks describe that stage, not this one's result.
        set_traits(student, notes=[], stage_details={})
    device = context.device
    teacher = teacher.to(device).eval()  # runs under no_grad below; its weights untouched
    task = get_task(data.task)
    hints = config.features or (_detector_hints(student, teacher) if task.own_distillation else [])
    pairs = [("features", p) for p in hints] + [("attention", p) for p in config.attention]
    example = data.example_input(2)
    wrapped = _StudentWithAdapters(student, teacher, pairs, example, device)
    cached = False
    if not task.own_distillation:
        with torch.inference_mode():
            output_bytes = task.output(teacher(example.to(device)))[0].numel() * 4
        cached = output_bytes * dataset_length(data.train) <= MAX_CACHED_TEACHER_BYTES

    def kd(output, teacher_output, targets):
        return task.distill_loss(output, teacher_output, targets, config.temperature, config.alpha)

    def from_cache(net, inputs, targets, teacher_output):
        output = task.output(net(inputs))
        return kd(output, teacher_output, targets), output

    def from_teacher(net, inputs, targets, *_):  # extra tensors a split yields: unused
        with torch.no_grad():  # the teacher only gives targets
            teacher_output = task.output(teacher(inputs))
        output = task.output(net(inputs))
        return kd(output, teacher_output, targets) + wrapped.layer_loss(), output

    def hinted(net, inputs, targets, *_):  # a detector: its own loss and the hints
        with torch.no_grad():
            teacher(inputs)  # records the teacher's paired layers
        loss, output = task.train_loss(net, inputs, targets)
        return loss + wrapped.layer_loss(), output

    loss_fn: Callable[..., Any] = hinted if task.own_distillation else from_teacher
    if not pairs and config.cache_teacher and config.train.augment == "none" and cached:
        # The teacher's outputs, once: every later epoch costs the student alone.
        data = dataclasses.replace(
            data, train=_WithTargets(data.train, _teacher_outputs(teacher, data, device))
        )
        loss_fn = from_cache

    try:
        train(wrapped, data, config.train, loss_fn=loss_fn, desc="distill", context=context)
    finally:  # the teacher (often the caller's baseline) keeps no hooks of ours
        wrapped.remove_hooks()
    return student.eval()


def _detector_hints(student: nn.Module, teacher: nn.Module) -> list[LayerPair]:
    """A detector's default hints: each feature map its backbone gives the head (the
    backbone's stages and extra layers of an SSD), where both models have it."""
    mine, theirs = dict(student.named_modules()), dict(teacher.named_modules())
    names = [
        f"backbone.{group}.{child}"
        for group in ("features", "extra")
        for child, _ in getattr(
            getattr(teacher, "backbone", None), group, nn.Sequential()
        ).named_children()
    ]
    return [LayerPair(student=n, teacher=n) for n in names if n in mine and n in theirs]


class _StudentWithAdapters(nn.Module):
    """The student plus one adapter per feature pair, trained together (the adapters are
    dropped afterwards). Forward hooks record the paired layers' outputs."""

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        pairs: list[tuple[str, LayerPair]],
        example: torch.Tensor,
        device: str,
    ):
        super().__init__()
        self.student = student
        self.pairs = pairs
        self.adapters = nn.ModuleDict()
        self._captured: dict[str, dict[int, torch.Tensor]] = {"student": {}, "teacher": {}}
        self._hooks = []
        for side, net in (("student", student), ("teacher", teacher)):
            modules = dict(net.named_modules())
            for i, (kind, pair) in enumerate(pairs):
                name = getattr(pair, side)
                if name not in modules or not name:
                    raise RecipeError(
                        f"distill.{kind}[{i}].{side}: no module {name!r} in the {side};"
                        f" its top-level modules: {', '.join(n for n in modules if n and '.' not in n)}"
                    )
                self._hooks.append(modules[name].register_forward_hook(self._recorder(side, i)))
        if not pairs:
            return
        with torch.no_grad():
            student.to(device).eval()(example.to(device))
            teacher(example.to(device))
        for i, (kind, _) in enumerate(pairs):
            s, t = self._captured["student"][i], self._captured["teacher"][i]
            if kind == "features" and s.shape[1] != t.shape[1]:
                conv = s.ndim == 4
                self.adapters[str(i)] = (
                    nn.Conv2d(s.shape[1], t.shape[1], 1, bias=False)
                    if conv
                    else nn.Linear(s.shape[1], t.shape[1], bias=False)
                )
                log.info(
                    "distill: 1x1 adapter %d -> %d channels for %s",
                    s.shape[1],
                    t.shape[1],
                    pairs[i][1].student,
                )
        self.adapters.to(device)

    def _recorder(self, side: str, index: int):
        def hook(_module, _inputs, output):
            self._captured[side][index] = output

        return hook

    def forward(self, *inputs):  # a detector in training takes (images, targets)
        return self.student(*inputs)

    def layer_loss(self) -> torch.Tensor | float:
        """The weighted hint and attention losses of the last forward pass."""
        total: torch.Tensor | float = 0.0
        for i, (kind, pair) in enumerate(self.pairs):
            s, t = self._captured["student"][i], self._captured["teacher"][i].float()
            if str(i) in self.adapters:
                s = self.adapters[str(i)](s)
            if s.ndim == 4 and s.shape[-2:] != t.shape[-2:]:  # compare at the smaller size
                size = (min(s.shape[-2], t.shape[-2]), min(s.shape[-1], t.shape[-1]))
                s, t = F.adaptive_avg_pool2d(s, size), F.adaptive_avg_pool2d(t, size)
            if kind == "features":
                total = total + pair.weight * F.mse_loss(s.float(), t)
            else:
                total = total + pair.weight * (attention_map(s) - attention_map(t)).pow(2).mean()
        return total

    def remove_hooks(self) -> None:
        for hook in self._hooks:
            hook.remove()


class _WithTargets(Dataset):
    """A split whose items carry one more tensor: the teacher's logits for that image."""

    def __init__(self, base: Dataset, targets: torch.Tensor):
        self.base, self.targets = base, targets

    def __len__(self) -> int:
        return dataset_length(self.base)

    def __getitem__(self, index: int):
        return (*self.base[index], self.targets[index])


def _teacher_outputs(teacher: nn.Module, data: Data, device: str) -> torch.Tensor:
    """The teacher's outputs (logits) for every training example, in the split's order."""
    task = get_task(data.task)
    with torch.inference_mode():
        return torch.cat(
            [
                task.output(teacher(task.split(batch)[0].to(device))).float().cpu()
                for batch in data.loader("train")
            ]
        )
