"""The share stage: k-means weight sharing (Deep Compression, Han et al., 2016).

Each selected layer's weights are clustered into 2^bits values; every weight is replaced
by its centroid. An optional fine-tune trains the centroids themselves through the shared
loop: the weight is a parametrization ``codebook[indices]`` of the codebook, so autograd
sums the gradients of all weights in a cluster into its centroid and the weights never
leave the codebook. Zeros left by pruning stay zero and the clusters are formed among the
non-zero weights only, so ``prune → share`` is the Deep Compression chain. The artifact
stores each shared tensor as a codebook plus entropy-coded indices (see ``models/artifact/state.py``).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from torch.nn.utils import parametrize

from compress.core.modules import matching_modules
from compress.core.registry import StageContext, register_stage
from compress.core.schema import Config, option
from compress.core.traits import set_traits
from compress.data import Data
from compress.spec.recipe import TrainConfig
from compress.training.train import train

log = logging.getLogger("compress")

# How weight sharing fine-tunes its codebooks by default: Adam, because each centroid's
# gradient is the sum over every weight in its cluster (thousands), which SGD would overshoot.
SHARE_TRAINING: dict[str, Any] = {
    "epochs": 1,
    "optimizer": "adamw",
    "lr": 1e-4,
    "schedule": "cosine",
    "weight_decay": 0.0,
}


@dataclass
class ShareBits(Config):
    """Codebook bits per layer type: 2^bits shared values per layer (null: not shared)."""

    conv: int | None = option(4, min=1, max=8)  # Conv1d/2d/3d weights
    linear: int | None = option(5, min=1, max=8)  # Linear weights


@dataclass
class ShareConfig(Config):
    """`stages: - share: {...}`: k-means weight sharing (Deep Compression, Han et al. 2016)."""

    method: Literal["kmeans"] = "kmeans"  # Lloyd's k-means per layer, on the non-zero weights
    bits: ShareBits = option(default_factory=ShareBits)  # codebook sizes, per layer type
    # Where the centroids start: evenly over [min, max] (linear, best in Deep Compression),
    # at quantiles of the weights (density), or at seeded random weights (random).
    init: Literal["linear", "density", "random"] = "linear"
    iterations: int = option(30, min=1)  # Lloyd iterations per layer
    skip: list[str] = option(
        default_factory=list
    )  # dotted names or "re:" patterns kept as they are
    # Trains the centroids (weights stay on the codebook).
    fine_tune: TrainConfig = option(
        default_factory=lambda: TrainConfig(**SHARE_TRAINING), defaults=SHARE_TRAINING
    )


CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def kmeans_1d(
    values: torch.Tensor, clusters: int, init: str = "linear", iterations: int = 30, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means on scalars; returns (sorted centroids, each value's cluster index).

    In one dimension the nearest centroid is found by bisection between the midpoints of
    the sorted centroids, so each iteration is a sort-free O(n log k).

    Example:
        >>> centroids, index = kmeans_1d(torch.tensor([0.0, 0.1, 1.0, 1.1]), 2)
        >>> centroids
        tensor([0.0500, 1.0500])
    """
    v = values.detach().flatten().float()
    clusters = max(1, min(clusters, v.numel()))
    if init == "linear":
        centroids = torch.linspace(v.min().item(), v.max().item(), clusters)
    elif init == "density":  # evenly spaced on the weights' CDF
        sample = v if v.numel() <= 1 << 20 else v[:: v.numel() // (1 << 20) + 1]
        centroids = torch.quantile(sample, torch.linspace(0, 1, clusters))
    else:
        generator = torch.Generator().manual_seed(seed)
        centroids = v[torch.randperm(v.numel(), generator=generator)[:clusters]]
    for _ in range(iterations):
        centroids = centroids.sort().values
        index = torch.bucketize(v, (centroids[1:] + centroids[:-1]) / 2)
        sums = torch.zeros(clusters).index_add_(0, index, v)
        counts = torch.bincount(index, minlength=clusters)
        updated = torch.where(counts > 0, sums / counts.clamp(min=1), centroids)
        if torch.equal(updated, centroids):
            break
        centroids = updated
    centroids = centroids.sort().values
    index = torch.bucketize(v, (centroids[1:] + centroids[:-1]) / 2)
    return centroids, index.view(values.shape)


class SharedWeight(nn.Module):
    """Parametrization ``weight = codebook[indices]``; the codebook is what trains.

    With ``keep_zero`` the codebook's entry 0 is pinned to 0 (pruned weights stay pruned).
    """

    indices: torch.Tensor  # buffers: each weight's codebook entry, and the pinned entries
    pin: torch.Tensor

    def __init__(self, indices: torch.Tensor, size: int, keep_zero: bool):
        super().__init__()
        self.register_buffer("indices", indices.to(torch.uint8 if size <= 256 else torch.int64))
        pin = torch.ones(size)
        if keep_zero:
            pin[0] = 0.0
        self.register_buffer("pin", pin)

    def forward(self, codebook: torch.Tensor) -> torch.Tensor:
        return (codebook * self.pin)[self.indices.long()]

    def right_inverse(self, weight: torch.Tensor) -> torch.Tensor:
        # The codebook that reproduces ``weight``: each cluster's mean (its centroid).
        index = self.indices.long().flatten()
        sums = torch.zeros(self.pin.numel(), dtype=weight.dtype).index_add_(
            0, index, weight.detach().flatten()
        )
        counts = torch.bincount(index, minlength=self.pin.numel()).clamp(min=1)
        return (sums / counts) * self.pin


@register_stage("share", ShareConfig)
def share(
    model: nn.Module,
    data: Data,
    config: ShareConfig,
    *,
    context: StageContext,
) -> nn.Module:
    """Cluster each selected layer's weights into 2^bits shared values; fine-tune if asked.

    Example:
        >>> shared = share(model, data, bits={"conv": 4, "linear": 5}, fine_tune={"epochs": 1})
    """
    model = copy.deepcopy(model).cpu().eval()
    skipped = set(matching_modules(model, config.skip, key="share.skip")) if config.skip else set()
    rows: list[dict] = []
    shared = []
    for name, module in model.named_modules():
        bits = _bits(module, config)
        if bits is None or name in skipped:
            continue
        weight = module.weight.detach()
        nonzero = weight != 0
        keep_zero = bool((~nonzero).any())
        # Pruned zeros get index 0 (pinned at 0); the rest share the other entries.
        size = 2**bits
        centroids, index = kmeans_1d(
            weight[nonzero], size - int(keep_zero), config.init, config.iterations, seed=len(rows)
        )
        indices = torch.zeros(weight.shape, dtype=torch.long)
        indices[nonzero] = index + int(keep_zero)
        codebook = torch.cat([torch.zeros(int(keep_zero)), centroids]).to(weight.dtype)
        size = codebook.numel()
        with torch.no_grad():
            module.weight.copy_(codebook[indices])
        parametrize.register_parametrization(
            module, "weight", SharedWeight(indices, size, keep_zero), unsafe=True
        )
        shared.append(module)
        rows.append(
            {
                "layer": name,
                "type": type(module).__name__,
                "bits": bits,
                "weights": weight.numel(),
                "sparsity": 1.0 - nonzero.float().mean().item(),
            }
        )
    if config.fine_tune.epochs or config.fine_tune.max_steps:
        train(model, data, config.fine_tune, desc="share fine-tune", context=context)
    model = model.cpu()
    for module in shared:  # plain weights again, every value on its layer's codebook
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
    # The centroids' gradients would stay behind on the new weights with the wrong shape.
    model.zero_grad(set_to_none=True)
    modules = dict(model.named_modules())
    for row in rows:
        row["unique_values"] = int(torch.unique(modules[row["layer"]].weight.detach()).numel())
    model.eval()
    widths = ", ".join(f"{b}-bit" for b in sorted({r["bits"] for r in rows}))
    set_traits(
        model,
        stage_details={"layers": rows},
        notes=[
            f"{len(rows)} layers share {widths} codebooks; the artifact stores codebooks plus"
            " LZMA-coded indices, and the kernels still compute in float32, so there is no"
            " latency gain"
        ],
    )
    log.info("share: %d layers clustered", len(rows))
    return model


def _bits(module: nn.Module, config: ShareConfig) -> int | None:
    if isinstance(module, CONV):
        return config.bits.conv
    if isinstance(module, nn.Linear):
        return config.bits.linear
    return None
