"""The one training loop: baseline training now; fine-tunes, QAT and distillation reuse it."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from compress.artifact import write_atomic
from compress.data import Data
from compress.recipe import TrainConfig

log = logging.getLogger("compress")

# loss_fn(model, images, labels) -> (loss, logits); the default is cross-entropy.
LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a non-finite loss)."""


def train(
    model: nn.Module,
    data: Data,
    config: TrainConfig,
    seed: int = 0,
    device: str = "cpu",
    loss_fn: LossFn | None = None,
    desc: str = "train",
    checkpoint_dir: str | Path | None = None,
) -> nn.Module:
    """Train ``model`` in place on the train split and return it (in eval mode).

    With ``checkpoint_dir``, the state after every epoch (model, optimizer, scheduler,
    epoch, step, RNG) is written atomically to ``last.pt``, and a call that finds one there
    resumes from it: an interrupted run, called again, ends where an uninterrupted one would.

    Example:
        >>> model = train(model, data, TrainConfig(epochs=1), seed=0)
    """
    torch.manual_seed(seed)
    model.to(device).train()
    loader = data.loader("train", shuffle=True, seed=seed)
    steps_per_epoch = len(loader)
    total_steps = steps_per_epoch * config.epochs
    if config.max_steps is not None:  # with epochs 0: exactly max_steps, across epochs
        total_steps = config.max_steps if config.epochs == 0 else min(total_steps, config.max_steps)
    if total_steps == 0:
        return model.eval()
    optimizer = _optimizer(model, config)
    scheduler = _scheduler(optimizer, config, total_steps)
    criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    loss_fn = loss_fn or (lambda m, x, y: _cross_entropy(m, x, y, criterion))

    step = first_epoch = 0
    checkpoint = Path(checkpoint_dir) / "last.pt" if checkpoint_dir is not None else None
    if checkpoint is not None and checkpoint.is_file():
        first_epoch, step = _resume(checkpoint, model, optimizer, scheduler)
        log.info("%s: resumed from %s at epoch %d, step %d", desc, checkpoint, first_epoch, step)
    # disable=None: a bar on a terminal, silence in logs and CI.
    progress = tqdm(
        total=total_steps,
        initial=step,
        desc=desc,
        unit="step",
        dynamic_ncols=True,
        leave=False,
        disable=None,
    )
    correct = seen = 0
    for epoch in range(first_epoch, math.ceil(total_steps / steps_per_epoch)):
        loader = data.loader("train", shuffle=True, seed=seed + epoch)
        for images, labels in loader:
            images, labels = images.to(device), labels.to(device)
            loss, logits = loss_fn(model, images, labels)
            if not torch.isfinite(loss):
                progress.close()
                last_good = (
                    f"; last good checkpoint: {checkpoint}"
                    if checkpoint and checkpoint.is_file()
                    else ""
                )
                raise TrainingError(
                    f"non-finite loss ({loss.item()}) at epoch {epoch}, step {step};"
                    f" lower train.lr or set train.grad_clip{last_good}"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            scheduler.step()
            correct += (logits.argmax(1) == labels).sum().item()
            seen += labels.numel()
            step += 1
            progress.update()
            progress.set_postfix(
                epoch=epoch, loss=f"{loss.item():.3f}", acc=f"{100 * correct / seen:.1f}%"
            )
            if step >= total_steps:
                break
        log.info(
            "%s: epoch %d done, step %d/%d, last loss %.3f, train accuracy %.1f %%",
            desc,
            epoch,
            step,
            total_steps,
            loss.item(),
            100 * correct / max(seen, 1),
        )
        correct = seen = 0
        if checkpoint is not None:
            _save_checkpoint(checkpoint, model, optimizer, scheduler, epoch, step)
    progress.close()
    return model.eval()


def _save_checkpoint(path: Path, model, optimizer, scheduler, epoch: int, step: int) -> None:
    """Written atomically: a crash never leaves a half-written checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "epoch": epoch,
        "step": step,
        "rng": torch.get_rng_state(),
    }
    write_atomic(path, lambda tmp: torch.save(state, tmp))


def _resume(path: Path, model, optimizer, scheduler) -> tuple[int, int]:
    """Load a checkpoint (weights only: no code is unpickled); returns (next epoch, step)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    return state["epoch"] + 1, state["step"]


def _cross_entropy(model, images, labels, criterion):
    logits = model(images)
    return criterion(logits, labels), logits


def _optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    # No weight decay on biases and norm scales: decaying them only hurts accuracy.
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=True)
    return torch.optim.AdamW(groups, lr=config.lr)


def _scheduler(optimizer, config: TrainConfig, total_steps: int):
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
