"""The one training loop: baseline training, pruning's fine-tunes, QAT and distillation.

Data-parallel under torchrun (DDP, a DistributedSampler with ``set_epoch``), mixed
precision on CUDA, a validation pass per epoch, and atomic ``last.pt`` / ``best.pt``
checkpoints from which an interrupted run resumes to the same result.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from compress.core import distributed
from compress.core.errors import TaskError, TrainingError
from compress.core.registry import StageContext
from compress.core.storage import write_atomic
from compress.data import Data
from compress.measure.scores import metrics, to_device
from compress.models.build import check_fits_data
from compress.spec.recipe import TrainConfig, as_config
from compress.spec.tasks import Task, get_task
from compress.training.augment import augment
from compress.training.checkpoint import cpu_state, resume, save_checkpoint
from compress.training.schedule import cooldown_config, optimizer_for, scheduler_for

log = logging.getLogger("compress")

# loss_fn(model, inputs, targets, *extra) -> (loss, output); the default is the task's loss.
# ``extra`` is whatever else the train split yields per sample (e.g. cached teacher logits).
LossFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]


# How DDP is built, as measured by scripts/bench_ddp.py (ResNet-18 on Fashion-MNIST, 2 gloo
# ranks x 1 thread on 2 cores, global batch 128): BatchNorm buffers are not broadcast before
# every forward (one collective per step fewer; rank 0's are broadcast once per epoch
# instead, which ends with the same model), and gradients live in the exchange buckets.
# bf16 gradient exchange, a static graph, larger buckets and gradient accumulation were
# slower here (README, "Several processes").
DDP_OPTIONS: dict = {"gradient_as_bucket_view": True, "broadcast_buffers": False}
DDP_BF16_GRADIENTS = False  # bf16 gradient exchange (halves the bytes sent)


def _augmentable(task, config: TrainConfig):
    """``task``, where ``config.augment`` can apply to its inputs; else one clear line."""
    if config.augment != "none" and not (task.images and task.augmentable):
        what = "its targets would have to move too" if task.images else "it takes token ids"
        raise TaskError(
            f"train.augment: {config.augment!r} crops, flips or erases images; task {task.name}:"
            f" {what} (allowed: none)"
        )
    return task


def train(
    model: nn.Module,
    data: Data,
    config: TrainConfig | dict,
    seed: int | None = None,
    device: str | None = None,
    loss_fn: LossFn | None = None,
    desc: str = "train",
    checkpoint_dir: str | Path | None = None,
    context: StageContext | None = None,
) -> nn.Module:
    """Train ``model`` in place on the train split and return it (in eval mode).

    ``context`` (a stage's :class:`StageContext`) gives the device, the seed and a
    checkpoint folder where the arguments do not. With a checkpoint folder, the state after every epoch
    (model, optimizer, scheduler, epoch, step, RNG, best score) is written atomically to
    ``last.pt`` and the best-validating weights to ``best.pt``; a call that finds a
    ``last.pt`` resumes from it, so an interrupted run, called again, ends where an
    uninterrupted one would. Under torchrun the model is wrapped in DDP and each rank reads
    its share of every batch; only rank 0 writes and draws the progress bar.

    Example:
        >>> model = train(model, data, TrainConfig(epochs=1), seed=0)
    """
    phase: TrainConfig | None = as_config("train", config)
    check_fits_data(model, data)  # one line, not an IndexError a few steps in
    context = context or StageContext()
    seed = context.seed if seed is None else seed
    device = context.device if device is None else device
    if checkpoint_dir is None:
        checkpoint_dir = context.checkpoint_dir(desc)
    # The schedule, then its cooldown (train.cooldown_epochs) as a second phase with its own
    # checkpoints, so that a run stopped in it resumes there.
    while phase is not None:
        steps = _train_phase(
            model, data, phase, seed, device, loss_fn, desc, checkpoint_dir, context
        )
        if not steps:
            break
        phase = cooldown_config(phase, steps_done=steps)
        desc = f"{desc} cooldown"
        checkpoint_dir = Path(checkpoint_dir) / "cooldown" if checkpoint_dir is not None else None
    model.eval()
    return model


@dataclasses.dataclass
class _Phase:
    """What the epochs of one training phase share."""

    model: nn.Module
    net: nn.Module  # the model, or its DDP wrapper under torchrun
    data: Data
    config: TrainConfig
    task: Task
    loss_fn: LossFn
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    amp_dtype: torch.dtype | None
    device: str
    seed: int
    desc: str
    checkpoint: Path | None
    total_steps: int
    micro_batches: int  # per epoch
    progress: Any = None  # the phase's tqdm bar, made when the phase starts
    step: int = 0
    # the best validation score so far (times +1 or -1: higher is better), its epoch, weights
    best: dict = dataclasses.field(
        default_factory=lambda: {"score": -math.inf, "epoch": -1, "state": None}
    )

    @property
    def better(self) -> float:
        return 1.0 if self.task.higher_is_better else -1.0


def _train_phase(model, data, config, seed, device, loss_fn, desc, checkpoint_dir, context) -> int:
    """One schedule of :func:`train`; the steps it trained (0: nothing to train)."""
    torch.manual_seed(seed)
    model.to(device).train()
    threads = config.threads or distributed.rank_threads()
    torch.set_num_threads(threads)
    micro_batches = len(data.loader("train", shuffle=True, seed=seed))
    steps_per_epoch = math.ceil(micro_batches / config.accumulate)
    total_steps = steps_per_epoch * config.epochs
    if config.max_steps is not None:  # with epochs 0: exactly max_steps, across epochs
        total_steps = config.max_steps if config.epochs == 0 else min(total_steps, config.max_steps)
    if total_steps == 0:
        return 0
    context.budget.append({"steps": total_steps, "config": dataclasses.asdict(config)})
    cuda = torch.device(device).type == "cuda"
    if config.amp != "off" and not cuda:
        log.info("%s: train.amp=%s applies on CUDA only; training in fp32", desc, config.amp)
    task = _augmentable(get_task(data.task), config)
    optimizer = optimizer_for(model, config)
    amp_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(config.amp) if cuda else None
    run = _Phase(
        model=model,
        net=model,  # wrapped in DDP after a resume: the resumed weights are broadcast
        data=data,
        config=config,
        task=task,
        loss_fn=loss_fn or (lambda m, x, y, *_: _task_loss(m, x, y, task, config.label_smoothing)),
        optimizer=optimizer,
        scheduler=scheduler_for(optimizer, config, total_steps),
        scaler=torch.amp.GradScaler("cuda", enabled=amp_dtype is torch.float16),
        amp_dtype=amp_dtype,
        device=device,
        seed=seed,
        desc=desc,
        checkpoint=Path(checkpoint_dir) / "last.pt" if checkpoint_dir is not None else None,
        total_steps=total_steps,
        micro_batches=micro_batches,
    )
    first_epoch = 0
    if run.checkpoint is not None and run.checkpoint.is_file():
        first_epoch, run.step, run.best = resume(
            run.checkpoint, model, optimizer, run.scheduler, run.scaler
        )
        log.info(
            "%s: resumed from %s at epoch %d, step %d", desc, run.checkpoint, first_epoch, run.step
        )
    run.net = _parallel(model, device, threads, desc)
    # disable=None: a bar on a terminal, silence in logs and CI; other ranks stay quiet.
    run.progress = tqdm(
        total=total_steps,
        initial=run.step,
        desc=desc,
        unit="step",
        dynamic_ncols=True,
        leave=False,
        disable=None if distributed.is_main() else True,
    )
    # Under torchrun with sync_batchnorm, BatchNorm sees the global batch (the float
    # model it ends with has plain BatchNorm layers again).
    with distributed.synced_batchnorm(model, config.sync_batchnorm) as synced:
        if config.sync_batchnorm and distributed.world_size() > 1:
            # A QAT graph (torch.export) holds its BatchNorm as operations, not modules.
            log.info("%s: %d BatchNorm layers normalise over every rank's images", desc, synced)
        for epoch in range(first_epoch, math.ceil(total_steps / steps_per_epoch)):
            loss, seen = _epoch(run, epoch)
            _end_epoch(run, epoch, loss, seen)
    run.progress.close()
    if config.use_best and run.best["state"] is not None:
        log.info(
            "%s: keeping epoch %d (validation %s %.2f)",
            desc,
            run.best["epoch"],
            task.metric,
            run.better * run.best["score"],
        )
        model.load_state_dict(run.best["state"])
    model.eval()
    return total_steps


def _parallel(model: nn.Module, device: str, threads: int, desc: str) -> nn.Module:
    """Under torchrun, the model in DDP (gradients averaged across ranks after each
    backward); else the model itself."""
    if distributed.world_size() == 1:
        return model
    log.info(
        "%s: %d processes, %d threads each (%d cores here, %d processes on this machine)",
        desc,
        distributed.world_size(),
        threads,
        distributed.usable_cores(),
        distributed.local_world_size(),
    )
    cuda = torch.device(device).type == "cuda"
    net = DistributedDataParallel(
        model, device_ids=[torch.device(device).index] if cuda else None, **DDP_OPTIONS
    )
    if DDP_BF16_GRADIENTS and not cuda:
        net.register_comm_hook(None, default_hooks.bf16_compress_hook)
    return net


def _epoch(run: _Phase, epoch: int) -> tuple[torch.Tensor, list]:
    """One pass over the train split (or up to the phase's last step): its last loss and the
    task's rows of its batches (the running metric)."""
    config, task, net, model = run.config, run.task, run.net, run.model
    net.train()
    batches = run.data.loader("train", shuffle=True, seed=run.seed, epoch=epoch)
    # Seeded per epoch, as the order is: a resumed epoch draws the same augmentations.
    draws = torch.Generator().manual_seed(run.seed * 1_000_003 + epoch)
    seen, loss = [], torch.tensor(math.nan)
    for index, batch in enumerate(batches):
        images, labels, extra = task.split(batch)
        if task.dense:
            images, labels = augment(
                images, config.augment, config.crop_padding, draws, masks=labels
            )
        else:
            images = augment(images, config.augment, config.crop_padding, draws)
        images, labels = to_device(images, run.device), to_device(labels, run.device)
        extra = tuple(to_device(e, run.device) for e in extra)
        # The last micro-batch of a step (or of the epoch) steps the optimizer; the ones
        # before it only add their gradients, without a DDP exchange (no_sync).
        stepping = (index + 1) % config.accumulate == 0 or index + 1 == run.micro_batches
        if index % config.accumulate == 0:
            run.optimizer.zero_grad(set_to_none=True)
        group_start = index - index % config.accumulate
        in_step = min(config.accumulate, run.micro_batches - group_start)
        exchange = stepping or net is model  # no_sync defers DDP's gradient exchange
        with contextlib.nullcontext() if exchange else cast(DistributedDataParallel, net).no_sync():
            with torch.autocast("cuda", dtype=run.amp_dtype, enabled=run.amp_dtype is not None):
                loss, logits = run.loss_fn(net, images, labels, *extra)
            if not torch.isfinite(loss):
                run.progress.close()
                last_good = (
                    f"; last good checkpoint: {run.checkpoint}"
                    if run.checkpoint and run.checkpoint.is_file()
                    else ""
                )
                raise TrainingError(
                    f"non-finite loss ({loss.item()}) at epoch {epoch}, step {run.step};"
                    f" lower train.lr or set train.grad_clip{last_good}"
                )
            run.scaler.scale(loss / in_step).backward()  # a step's mean over its micro-batches
        if logits is not None:  # a detector in training mode gives its losses alone
            seen.append(task.scores(_detached(logits), labels))
        if not stepping:
            continue
        if config.grad_clip:
            run.scaler.unscale_(run.optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        run.scaler.step(run.optimizer)
        run.scaler.update()
        run.scheduler.step()
        run.step += 1
        run.progress.update()
        if run.step % 10 == 0 or run.step >= run.total_steps:  # the running metric: cheap
            shown = {"epoch": epoch, "loss": f"{loss.item():.3f}"}
            if seen:
                shown["metric"] = f"{task.summarize(np.concatenate(seen))[task.metric]:.1f}"
            run.progress.set_postfix(**shown)
        if run.step >= run.total_steps:
            break
    return loss, seen


def _end_epoch(run: _Phase, epoch: int, loss: torch.Tensor, seen: list) -> None:
    """Validation, the epoch's log line, the best weights so far, and the checkpoint."""
    model, task = run.model, run.task
    distributed.broadcast_buffers(model)  # every rank validates and ends with rank 0's
    score = _validate(model, run.data, run.device) if run.config.validate else None
    running = task.summarize(np.concatenate(seen))[task.metric] if seen else None
    log.info(
        "%s: epoch %d done, step %d/%d, last loss %.3f%s%s",
        run.desc,
        epoch,
        run.step,
        run.total_steps,
        loss.item(),
        "" if running is None else f", train {task.metric} {running:.1f}",  # none: a detector's
        "" if score is None else f", validation {task.metric} {score:.2f}",
    )
    if score is not None and run.better * score > run.best["score"]:
        # The weights are copied only where they are used: use_best, or best.pt.
        keep = run.config.use_best or run.checkpoint is not None
        run.best = {
            "score": run.better * score,
            "epoch": epoch,
            "state": cpu_state(model) if keep else None,
        }
        if run.checkpoint is not None and distributed.is_main():
            best_state = run.best["state"]
            write_atomic(
                run.checkpoint.with_name("best.pt"), lambda tmp: torch.save(best_state, tmp)
            )
    if run.checkpoint is not None:
        if distributed.is_main():
            save_checkpoint(
                run.checkpoint,
                model,
                run.optimizer,
                run.scheduler,
                run.scaler,
                epoch,
                run.step,
                run.best,
            )
        distributed.barrier()  # no rank runs ahead of a checkpoint it may need to resume


def _validate(model: nn.Module, data: Data, device: str) -> float:
    """The task's metric on the calibration split: held out of training, not the test split."""
    model.eval()  # not chained: an exported QAT graph's eval() returns None
    return metrics(model, data, device, split="calibration")[get_task(data.task).metric]


def _task_loss(model, inputs, targets, task, label_smoothing: float):
    return task.train_loss(model, inputs, targets, label_smoothing)


def _detached(output):
    """A batch's output for the running metric: a float tensor, or a detector's dicts."""
    return output.detach().float() if isinstance(output, torch.Tensor) else output
