"""Bias correction: the mean error that INT8 weights add to each output channel, taken back
out of the layer's bias (Nagel et al. 2019, "Data-free quantization", section 4.2, with the
input means measured on the calibration split; NNCF's fast bias correction, on by default in
its post-training flow, does the like).

Rounding a layer's weights to INT8 leaves an error ``W - Q(W)`` whose product with the
layer's mean input is a per-channel offset in its output, the same for every input: small
in one layer, it adds up through a deep network, and most in depthwise convolutions, whose
output channels each see few weights. The offset is ``(W - Q(W)) · E[x]``; adding it to the
bias makes the INT8 layer's mean output its float layer's. The input means are summed in the
calibration pass itself (the observers observe as usual), so the correction costs no extra
pass over the data; a layer without a bias, or kept float, is left as it is.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx
from torch.utils import _pytree as pytree

_SPATIAL_DIMS = {  # the convolutions corrected, by how many spatial dimensions they slide
    torch.ops.aten.conv1d.default: 1,
    torch.ops.aten.conv2d.default: 2,
    torch.ops.aten.conv3d.default: 3,
}
_LAYERS = {*_SPATIAL_DIMS, torch.ops.aten.linear.default}


@dataclass(frozen=True)
class _Layer:
    """Where a corrected layer's pieces live in the prepared graph."""

    input: fx.Node
    weight: str  # attribute names of the graph module
    bias: str
    observer: str  # the weight's observer (its qparams are the conversion's)
    geometry: tuple[list[int], list[int], list[int]] | None  # a convolution's; None: Linear


class BiasCorrection(fx.Interpreter):
    """Runs a prepared (observed) graph like the graph itself, summing each quantized
    layer's input per channel (and kernel tap); ``apply()`` then shifts their biases.

    Example:
        >>> run = BiasCorrection(prepared)
        >>> for images in calibration:
        ...     run(images)
        >>> run.apply()  # before convert_pt2e: the conversion quantizes the same weights
    """

    def __init__(self, prepared: fx.GraphModule):
        super().__init__(prepared)
        found = ((n, _layer(prepared, n)) for n in prepared.graph.nodes)
        self.layers = {node: layer for node, layer in found if layer is not None}
        self.sums: dict[fx.Node, torch.Tensor] = {}
        self.counts: dict[fx.Node, int] = {}

    def __call__(self, inputs):
        """The prepared graph on ``inputs``, as ``prepared(inputs)`` runs it."""
        return self.run(*pytree.tree_leaves(inputs))  # the graph's placeholders: the leaves

    def run_node(self, node: fx.Node):
        layer = self.layers.get(node)
        if layer is not None:
            x = self.env[layer.input].detach()
            if layer.geometry is None:  # a Linear: one tap per feature
                sums = x.reshape(-1, x.shape[-1]).double().sum(0)[:, None]
                count = x.numel() // x.shape[-1]
            else:
                kernel = list(self.fetch_attr(layer.weight).shape[2:])
                sums, count = _tap_sums(x, kernel, *layer.geometry)
            self.sums[node] = self.sums.get(node, 0) + sums
            self.counts[node] = self.counts.get(node, 0) + count
        return super().run_node(node)

    @torch.no_grad()
    def apply(self) -> int:
        """Shift the bias of every layer whose inputs were seen; how many were shifted."""
        for node in self.sums:
            layer = self.layers[node]
            observer: Any = self.module.get_submodule(layer.observer)  # torchao's observer
            weight = self.fetch_attr(layer.weight).float()
            scale, zero_point = observer.calculate_qparams()
            rounded = torch.fake_quantize_per_channel_affine(
                weight,
                scale.float(),
                zero_point.int(),
                observer.ch_axis,
                observer.quant_min,
                observer.quant_max,
            )
            error = (weight - rounded).flatten(1)  # (out, in / groups x taps)
            mean = (self.sums[node] / self.counts[node]).float()  # (in, taps)
            groups = mean.shape[0] * mean.shape[1] // error.shape[1]
            shift = torch.bmm(error.view(groups, -1, error.shape[1]), mean.view(groups, -1, 1))
            bias = self.fetch_attr(layer.bias)
            bias.add_(shift.flatten().to(bias.dtype))
        return len(self.sums)


def _geometry(args: tuple, dims: int) -> tuple[list[int], list[int], list[int]]:
    """A convolution's stride, padding and dilation from its aten arguments, one value per
    dimension (aten's arguments may be left out for their defaults, or given once for all)."""
    given = [*args[3:6], *[None] * (6 - len(args))]
    stride, padding, dilation = (
        [int(v)] * dims if isinstance(v, int) else [int(n) for n in v] * (dims // len(v))
        for v in (given[0] or [1], given[1] or [0], given[2] or [1])
    )
    return stride, padding, dilation


def _tap_sums(x: torch.Tensor, kernel, stride, padding, dilation) -> tuple[torch.Tensor, int]:
    """Per input channel and kernel tap, the sum of the inputs that tap multiplies over the
    output positions, padding's zeros included: near a border a tap reads padding, and on
    small feature maps (8x8 under a dilated 5x5 kernel) most taps often do, so a mean taken
    over the input alone would over-correct. Returns the (channels, taps) sums and how many
    output positions they cover."""
    spatial = x.shape[2:]
    padded = F.pad(x, [p for p in reversed(padding) for _ in range(2)])
    out = [
        (size + 2 * p - d * (k - 1) - 1) // s + 1
        for size, k, s, p, d in zip(spatial, kernel, stride, padding, dilation, strict=True)
    ]
    reduce = [0, *range(2, x.dim())]
    sums = []
    for tap in itertools.product(*(range(k) for k in kernel)):
        window = tuple(
            slice(t * d, t * d + s * (o - 1) + 1, s)
            for t, d, s, o in zip(tap, dilation, stride, out, strict=True)
        )
        sums.append(padded[(slice(None), slice(None), *window)].double().sum(reduce))
    return torch.stack(sums, -1), x.shape[0] * math.prod(out)


def _layer(prepared: fx.GraphModule, node: fx.Node) -> _Layer | None:
    """``node`` as a layer to correct: a convolution or Linear layer whose weight goes
    through a per-channel observer (it will be INT8) and whose bias is a tensor of the graph
    (it can take the shift); None for any other node."""
    if node.op != "call_function" or node.target not in _LAYERS or len(node.args) < 3:
        return None
    source, observed, bias = node.args[0], node.args[1], node.args[2]
    if not (isinstance(observed, fx.Node) and observed.op == "call_module" and observed.args):
        return None
    weight = observed.args[0]
    observer = prepared.get_submodule(str(observed.target))
    if not (
        getattr(observer, "ch_axis", None) == 0
        and isinstance(source, fx.Node)
        and isinstance(weight, fx.Node)
        and weight.op == "get_attr"
        and isinstance(bias, fx.Node)
        and bias.op == "get_attr"
    ):
        return None
    linear = node.target is torch.ops.aten.linear.default
    geometry = None if linear else _geometry(tuple(node.args), _SPATIAL_DIMS[node.target])
    return _Layer(source, str(weight.target), str(bias.target), str(observed.target), geometry)
