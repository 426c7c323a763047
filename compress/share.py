"""The share stage: k-means weight sharing (Deep Compression, Han et al., 2016).

Each selected layer's weights are clustered into 2^bits values; every weight is replaced
by its centroid. An optional fine-tune trains the centroids themselves through the shared
loop: the weight is a parametrization ``codebook[indices]`` of the codebook, so autograd
sums the gradients of all weights in a cluster into its centroid and the weights never
leave the codebook. Zeros left by pruning stay zero and the clusters are formed among the
non-zero weights only, so ``prune → share`` is the Deep Compression chain. The artifact
stores each shared tensor as a codebook plus entropy-coded indices (see ``artifact.py``).
"""

from __future__ import annotations

import copy
import logging

import torch
from torch import nn
from torch.nn.utils import parametrize

from compress.data import Data
from compress.recipe import ShareConfig, parse_stage_options

log = logging.getLogger("compress")

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


def share(model: nn.Module, data: Data, config: ShareConfig | None = None, **options) -> nn.Module:
    """Cluster each selected layer's weights into 2^bits shared values; fine-tune if asked.

    Example:
        >>> shared = share(model, data, bits={"conv": 4, "linear": 5}, fine_tune={"epochs": 1})
    """
    from compress.quantize._pt2e import matching_modules
    from compress.train import train

    if config is None:
        config = parse_stage_options("share", options)
    elif options:
        raise TypeError("pass either a ShareConfig or keyword options, not both")
    model = copy.deepcopy(model).cpu().eval()
    skipped = set(matching_modules(model, config.skip)) if config.skip else set()
    rows, shared = [], []
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
        train(model, data, config.fine_tune, desc="share fine-tune")
    model = model.cpu()
    for module in shared:  # plain weights again, every value on its layer's codebook
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
    # The centroids' gradients would stay behind on the new weights with the wrong shape.
    model.zero_grad(set_to_none=True)
    modules = dict(model.named_modules())
    for row in rows:
        row["unique_values"] = int(torch.unique(modules[row["layer"]].weight.detach()).numel())
    model.eval()
    model.stage_details = {"layers": rows}
    widths = ", ".join(f"{b}-bit" for b in sorted({r["bits"] for r in rows}))
    model.notes = [
        f"{len(rows)} layers share {widths} codebooks; the artifact stores codebooks plus LZMA-coded indices, and the kernels"
        " still compute in float32, so there is no latency gain"
    ]
    log.info("share: %d layers clustered", len(rows))
    return model


def _bits(module: nn.Module, config: ShareConfig) -> int | None:
    if isinstance(module, CONV):
        return config.bits.conv
    if isinstance(module, nn.Linear):
        return config.bits.linear
    return None
