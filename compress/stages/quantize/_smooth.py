"""SmoothQuant (``quantize.smoothquant: α``): activation outliers moved into the weights
before INT8, so that one activation scale fits every channel.

For each norm (LayerNorm, RMSNorm) whose output feeds Linear layers directly (a
transformer's q/k/v and first MLP layer), each input channel j gets a factor
``s_j = max|X_j|^α / max|W_:,j|^(1-α)`` from the calibration split (Xiao et al., 2023): the
norm's weight and bias are divided by ``s`` and the Linear weights' columns multiplied by
it. The float model computes the same function (checked on a calibration batch, norm by
norm: a norm whose output also goes elsewhere, or whose weight does not scale its output,
is left alone). Linear layers with no norm before them are not smoothed: there is nowhere
to put the division without an extra op per call.
"""

from __future__ import annotations

import copy
from typing import cast

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from compress.core.errors import QuantizationError
from compress.core.modules import forward_with_hooks
from compress.data import Data

# Largest relative change of the model's outputs a smoothed norm may cause (float rounding
# of the rescaled weights is ~1e-6; a norm with another consumer changes them by far more).
SAME_OUTPUT_TOLERANCE = 1e-4


def _is_norm(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    named_norm = type(module).__name__.endswith(("LayerNorm", "RMSNorm"))
    return (
        (isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or named_norm)
        and isinstance(weight, nn.Parameter)
        and weight.dim() == 1
    )


@torch.no_grad()
def _norm_consumers(model: nn.Module, batches: list) -> tuple[dict, dict]:
    """Which Linear layers read each norm's output as it is, and each Linear's largest
    absolute input per channel over ``batches``."""
    outputs: dict[int, tuple[str, torch.Tensor]] = {}  # the tensor held: its id stays its own
    consumers: dict[str, set[str]] = {}
    input_max: dict[str, torch.Tensor] = {}

    def hook_for(name, module):
        def norm_output(_module, _args, output):
            if isinstance(output, torch.Tensor):
                outputs[id(output)] = (name, output)

        def linear_input(_module, args, _output):
            x = args[0]
            if id(x) in outputs:
                consumers.setdefault(outputs[id(x)][0], set()).add(name)
            peak = x.detach().abs().reshape(-1, x.shape[-1]).amax(0).float()
            input_max[name] = peak if name not in input_max else input_max[name].maximum(peak)

        if isinstance(module, nn.Linear):
            return linear_input
        return norm_output if _is_norm(module) else None

    for inputs in batches:
        forward_with_hooks(model, inputs, hook_for)
        outputs.clear()
    return consumers, input_max


def _outputs(model: nn.Module, inputs) -> list[torch.Tensor]:
    return [t.float() for t in tree_leaves(model(inputs)) if isinstance(t, torch.Tensor)]


def _same(before: list[torch.Tensor], after: list[torch.Tensor]) -> bool:
    scale = max((t.abs().max().item() for t in before), default=1.0) or 1.0
    return len(before) == len(after) and all(
        a.shape == b.shape and (a - b).abs().max().item() <= SAME_OUTPUT_TOLERANCE * scale
        for a, b in zip(before, after, strict=True)
    )


@torch.no_grad()
def smooth(model: nn.Module, data: Data, alpha: float, batches: int) -> tuple[nn.Module, str]:
    """A copy of ``model`` with SmoothQuant's factors folded in, and a note saying where.

    Example:
        >>> smoothed, note = smooth(model, data, alpha=0.5, batches=4)
        >>> note
        'smoothquant (α = 0.5): 25 Linear layers behind 13 norms smoothed; ...'
    """
    model = copy.deepcopy(model).cpu().eval()
    loader = data.loader("calibration")
    calibration = [batch[0] for _, batch in zip(range(batches), loader, strict=False)]
    if not calibration:
        raise QuantizationError("smoothquant needs calibration data: the split is empty")
    consumers, input_max = _norm_consumers(model, calibration)
    reference = _outputs(model, calibration[0])
    smoothed, left = [], []
    for norm_name, layer_names in sorted(consumers.items()):
        norm = model.get_submodule(norm_name)
        layers = [cast(nn.Linear, model.get_submodule(n)) for n in sorted(layer_names)]
        weight_max = torch.stack([m.weight.abs().amax(0) for m in layers]).amax(0)
        factor = input_max[sorted(layer_names)[0]].clamp(min=1e-5).pow(alpha)
        factor = (factor / weight_max.clamp(min=1e-5).pow(1 - alpha)).clamp(min=1e-5)
        tensors = [_norm_weight(norm), *(m.weight for m in layers)]
        bias = getattr(norm, "bias", None)
        if isinstance(bias, torch.Tensor):
            tensors.append(bias)
        saved = [t.detach().clone() for t in tensors]
        _rescale(norm, layers, factor)
        if _same(reference, _outputs(model, calibration[0])):
            smoothed.append((norm_name, len(layers)))
        else:  # the norm's output goes elsewhere too, or its weight is not a plain scale
            for tensor, original in zip(tensors, saved, strict=True):
                tensor.copy_(original)
            left.append(norm_name)
    total = sum(count for _, count in smoothed)
    note = f"smoothquant (α = {alpha}): {total} Linear layers behind {len(smoothed)} norms smoothed"
    if left:
        note += f"; left alone (their output is not only a Linear's input): {', '.join(left)}"
    if not smoothed:
        note = f"smoothquant (α = {alpha}): no Linear layer reads a norm's output; nothing smoothed"
    return model, note


def _norm_weight(norm: nn.Module) -> torch.Tensor:
    return cast(torch.Tensor, norm.weight)


def _rescale(norm: nn.Module, layers: list[nn.Linear], factor: torch.Tensor) -> None:
    weight = _norm_weight(norm)
    weight.div_(factor.to(weight.dtype))
    bias = getattr(norm, "bias", None)
    if isinstance(bias, torch.Tensor):
        bias.div_(factor.to(bias.dtype))
    for layer in layers:
        layer.weight.mul_(factor.to(layer.weight.dtype))
