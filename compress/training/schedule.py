"""What a training steps with: the optimizer (no weight decay on biases and norm scales),
the learning-rate schedule, and the cooldown phase that may follow it.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from compress.spec.recipe import TrainConfig


def cooldown_config(config: TrainConfig, steps_done: int = 0) -> TrainConfig | None:
    """The phase :func:`train` runs after ``config``'s schedule (``cooldown_epochs``), or None.

    ``max_steps`` bounds the whole training: the cooldown gets the steps the schedule
    (``steps_done`` of them) left, and none with ``epochs: 0``, whose schedule takes them all.

    Example:
        >>> cooldown_config(TrainConfig(epochs=60, cooldown_epochs=4)).augment
        'none'
    """
    if not config.cooldown_epochs:
        return None
    steps_left = None
    if config.max_steps is not None:
        steps_left = 0 if config.epochs == 0 else config.max_steps - steps_done
        if steps_left <= 0:
            return None
    return dataclasses.replace(
        config,
        epochs=config.cooldown_epochs,
        max_steps=steps_left,
        lr=config.cooldown_lr,
        schedule="cosine",
        augment="none",
        label_smoothing=0.0,
        cooldown_epochs=0,
    )


def optimizer_for(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    # No weight decay on biases and norm scales: decaying them only hurts accuracy.
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if config.optimizer == "sgd":
        # Nesterov needs a momentum: momentum 0 is plain SGD (torch refuses Nesterov there).
        nesterov = config.momentum > 0
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=nesterov)
    return torch.optim.AdamW(groups, lr=config.lr)


def scheduler_for(optimizer, config: TrainConfig, total_steps: int):
    if config.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=config.lr, total_steps=total_steps, pct_start=0.25
        )
    if config.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    if config.schedule == "step":  # divide by 10 at 50 % and 75 % of training
        milestones = [total_steps // 2, (3 * total_steps) // 4]
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.1)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
