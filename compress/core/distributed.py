"""Data-parallel runs under ``torchrun``: the process group and the few collectives we need.

``torchrun --nproc-per-node N -m compress run RECIPE`` starts N processes with RANK,
WORLD_SIZE and MASTER_ADDR set; :func:`init_from_env` joins them (gloo on CPU, NCCL on
CUDA). Without torchrun every helper here is a no-op for a world of one process, so the
rest of the code calls them unconditionally.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.nn.functional import all_reduce as all_reduce_with_gradient


def init_from_env(device: str) -> str:
    """Join the process group torchrun describes, if any; returns the device to use.

    On CUDA each process takes the GPU of its LOCAL_RANK.
    """
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) <= 1:
        return device
    if device == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return device


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    """Rank 0 writes files, draws progress bars and measures latency."""
    return rank() == 0


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, which containers narrow)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def local_world_size() -> int:
    """Processes of this run on this machine (torchrun's LOCAL_WORLD_SIZE), else 1."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if world_size() > 1 else 1


def rank_threads() -> int:
    """Threads for this process's own work (training, its share of an evaluation): the
    machine's cores shared among the ranks on it, so that N ranks never run N times as
    many busy threads as there are cores (which made 2 ranks on 2 cores 6x slower)."""
    return max(1, usable_cores() // local_world_size())


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def sum_across_ranks(*values: float) -> list[float]:
    """Element-wise sum of ``values`` over all ranks (counts, for metrics)."""
    if world_size() == 1:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64)
    if dist.get_backend() == "nccl":
        tensor = tensor.cuda()
    dist.all_reduce(tensor)
    return tensor.cpu().tolist()


def gather_shards(values: np.ndarray, length: int) -> np.ndarray:
    """The whole per-item array of ``length`` items (rows, when 2-D), from each rank's
    :func:`shard` of it (e.g. each test image's scores in that rank's share)."""
    if world_size() == 1:
        return np.asarray(values)
    whole = torch.zeros((length, *np.asarray(values).shape[1:]), dtype=torch.float64)
    whole[torch.tensor(shard(length))] = torch.as_tensor(values, dtype=torch.float64)
    if dist.get_backend() == "nccl":
        whole = whole.cuda()
    dist.all_reduce(whole)
    return whole.cpu().numpy().astype(np.asarray(values).dtype)


def broadcast_object(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (small picklable things: a path, a decision).

    Pickled only between the processes of one run, never read from a file.
    """
    if world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def broadcast_state(module: nn.Module) -> None:
    """Give every rank rank 0's parameters and buffers (observers' ranges included)."""
    if world_size() == 1:
        return
    state = broadcast_object({k: v.cpu() for k, v in module.state_dict().items()})
    if not is_main():
        module.load_state_dict(state)


def broadcast_buffers(module: nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm's running statistics): training leaves
    each rank's own, so that DDP need not broadcast them before every forward."""
    if world_size() == 1:
        return
    for buffer in module.buffers():
        if dist.get_backend() == "nccl" or buffer.device.type == "cpu":
            dist.broadcast(buffer, src=0)


class _SyncedBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics are those of the global batch: each rank's
    per-channel sums and counts added across ranks (one all-reduce a layer, its gradient
    too). torch's own SyncBatchNorm runs on GPUs only; this one on gloo as well."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and world_size() > 1):
            return super().forward(x)
        channels = x.shape[1]
        dims = [0, *range(2, x.dim())]
        wide = x.float()  # sums and counts in fp32: fp16 counts overflow at 65,504 values
        count = wide.new_full((1,), x.numel() // channels)
        sums = all_reduce_with_gradient(torch.cat([wide.sum(dims), (wide * wide).sum(dims), count]))
        total, square, n = sums[:channels], sums[channels:-1], sums[-1]
        mean = total / n
        variance = (square / n - mean * mean).clamp_min(0)  # biased, as BatchNorm divides by
        if self.track_running_stats:
            tracked, running_mean, running_var = (
                self.num_batches_tracked,
                self.running_mean,
                self.running_var,
            )
            assert tracked is not None and running_mean is not None and running_var is not None
            with torch.no_grad():
                tracked.add_(1)
                momentum = self.momentum
                if momentum is None:  # a cumulative average, as torch's
                    momentum = 1.0 / float(tracked)
                running_mean.lerp_(mean.detach(), momentum)
                running_var.lerp_(variance.detach() * n / (n - 1).clamp_min(1), momentum)
        shape = (1, channels) + (1,) * (x.dim() - 2)
        y = (wide - mean.view(shape)) * torch.rsqrt(variance.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


_SYNCED: dict[type[nn.Module], type[nn.Module]] = {
    base: type(f"Synced{base.__name__}", (_SyncedBatchNorm, base), {})
    for base in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
}


@contextlib.contextmanager
def synced_batchnorm(model: nn.Module, enabled: bool = True) -> Iterator[int]:
    """Within the block, ``model``'s BatchNorm layers normalise over the global batch of all
    ranks (``train.sync_batchnorm``); yields how many layers that is (none with one
    process). The layers keep their parameters, buffers and state_dict keys.

    Example:
        >>> with synced_batchnorm(model, config.sync_batchnorm):
        ...     loss = criterion(model(images), labels)
    """
    layers = [m for m in model.modules() if type(m) in _SYNCED] if enabled else []
    if world_size() == 1:
        layers = []
    for layer in layers:
        layer.__class__ = _SYNCED[type(layer)]
    try:
        yield len(layers)
    finally:
        for layer in layers:
            layer.__class__ = layer.__class__.__bases__[1]


def shard(length: int) -> range:
    """This rank's share of ``length`` items for evaluation: strided, no padding, so the
    counts summed over ranks count every item exactly once."""
    return range(rank(), length, world_size())


def set_threads(threads: int | None) -> int:
    """Use ``threads`` intra-op threads (default: every core this process may run on)."""
    threads = threads or usable_cores()
    torch.set_num_threads(threads)
    return threads
