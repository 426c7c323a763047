"""The distill stage: a student learns from a teacher's logits (Hinton et al., 2015).

The student is the model from the previous stage (a pruned model, say), or a fresh model
the recipe names; the teacher is the run's baseline unless the recipe names one. Training
goes through the shared loop with the knowledge-distillation loss below.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn import functional as F

from compress.data import Data
from compress.recipe import DistillConfig, parse_stage_options


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    alpha: float,
) -> torch.Tensor:
    """``alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(student, labels)``.

    The T^2 factor keeps the soft term's gradients on the scale of the hard term's.

    Example:
        >>> loss = kd_loss(student(x), teacher(x), y, temperature=4.0, alpha=0.9)
    """
    soft = F.kl_div(
        F.log_softmax(student_logits / temperature, dim=1),
        F.log_softmax(teacher_logits / temperature, dim=1),
        log_target=True,
        reduction="batchmean",
    )
    hard = F.cross_entropy(student_logits, labels)
    return alpha * temperature**2 * soft + (1 - alpha) * hard


def distill(
    model: nn.Module,
    data: Data,
    config: DistillConfig | None = None,
    teacher: nn.Module | None = None,
    **options,
) -> nn.Module:
    """Train a student (a copy of ``model``, or ``config.student``) against ``teacher``.

    Example:
        >>> student = distill(pruned, data, teacher=baseline, train={"epochs": 2})
    """
    from compress.models import build_model
    from compress.train import train

    if config is None:
        config = parse_stage_options("distill", options)
    elif options:
        raise TypeError("pass either a DistillConfig or keyword options, not both")
    if config.teacher is not None:
        teacher = build_model(config.teacher, data.num_classes, data.input_shape[0])
    if teacher is None:
        raise ValueError(
            "distill needs a teacher: the run's baseline, teacher= in Python, or distill.teacher"
        )
    if config.student is not None:
        student = build_model(config.student, data.num_classes, data.input_shape[0])
    else:
        student = copy.deepcopy(model)
    teacher = teacher.eval()

    def loss_fn(student_model, images, labels):
        with torch.no_grad():  # the teacher only gives targets
            targets = teacher(images).float()
        logits = student_model(images)
        return kd_loss(logits, targets, labels, config.temperature, config.alpha), logits

    return train(student, data, config.train, loss_fn=loss_fn, desc="distill")
