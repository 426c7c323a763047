"""The factorize stage: standard k x k convolutions become depthwise k x k + pointwise 1x1
pairs (as in MobileNet), and optionally Linear layers become two thin ones (truncated SVD).

Each replacement starts from the best fit to the original weights: for every input
channel i, the slice W[:, i] (out x k·k) is approximated by its rank-1 SVD term, whose
left vector becomes the pointwise column and right vector the depthwise kernel; that is
the closest depthwise-separable kernel in the Frobenius norm. The fit is not exact, so a
`distill` stage from the original model should follow to recover the accuracy.

The replaced architecture is recorded as data (``model.compress_replacements``), so the
artifact reloads without pickled code.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass
from typing import Literal, cast

import torch
from torch import nn

from compress.core.errors import RecipeError
from compress.core.modules import forward_with_hooks, matching_modules
from compress.core.registry import StageContext, register_stage
from compress.core.schema import Config, option
from compress.core.traits import set_traits
from compress.data import Data
from compress.measure.counts import count_flops
from compress.models.artifact import mark_changed, register_architecture_change

log = logging.getLogger("compress")


@dataclass
class FactorizeConfig(Config):
    """`stages: - factorize: {...}`: standard convolutions replaced by depthwise + pointwise
    pairs (and optionally Linear layers by two thin ones), fitted to the original weights.
    Recover the accuracy with a `distill` stage after it."""

    method: Literal["depthwise_separable"] = "depthwise_separable"  # as in MobileNet
    # Which k x k convolutions (k > 1, groups 1): dotted names or "re:" patterns. Empty: every
    # such convolution with at least `min_in_channels` inputs whose replacement saves at
    # least `min_macs_saved` of the model's MACs.
    layers: list[str] = option(default_factory=list)
    min_in_channels: int = option(16, min=1)  # a 1-channel stem fits badly
    # Fraction of the model's MACs a replacement must save to be made.
    min_macs_saved: float = option(0.005, min=0.0, max=1.0)
    # Linear layers too: rank of the split as a fraction of min(in, out); null: Linear kept.
    linear_rank: float | None = option(None, min=0.01, max=1.0)
    skip: list[str] = option(default_factory=list)  # never replaced


def separable_fit(conv: nn.Conv2d) -> tuple[nn.Sequential, float]:
    """The depthwise + pointwise pair closest to ``conv``, and its relative kernel error.

    Example:
        >>> pair, error = separable_fit(nn.Conv2d(32, 64, 3, padding=1))
        >>> [type(m).__name__ for m in pair]
        ['Conv2d', 'Conv2d']
    """
    w = conv.weight.detach().float()
    out_channels, in_channels, kh, kw = w.shape
    slices = w.permute(1, 0, 2, 3).reshape(in_channels, out_channels, kh * kw)
    u, s, vh = torch.linalg.svd(slices, full_matrices=False)
    scale = s[:, 0].sqrt()
    pair = _separable(conv)
    depthwise, pointwise = cast(nn.Conv2d, pair[0]), cast(nn.Conv2d, pair[1])
    with torch.no_grad():
        depthwise.weight.copy_((vh[:, 0, :] * scale[:, None]).view(in_channels, 1, kh, kw))
        pointwise.weight.copy_(
            (u[:, :, 0] * scale[:, None]).t().reshape(out_channels, in_channels, 1, 1)
        )
        if conv.bias is not None and pointwise.bias is not None:
            pointwise.bias.copy_(conv.bias.detach())
    error = (s[:, 1:].pow(2).sum().sqrt() / w.norm()).item()
    return pair.to(conv.weight.dtype), error


def svd_fit(linear: nn.Linear, rank: int) -> tuple[nn.Sequential, float]:
    """Two Linear layers (in → rank → out) from the truncated SVD of ``linear``'s weight."""
    u, s, vh = torch.linalg.svd(linear.weight.detach().float(), full_matrices=False)
    pair = _thin(linear.in_features, linear.out_features, rank, linear.bias is not None)
    root = s[:rank].sqrt()
    first, second = cast(nn.Linear, pair[0]), cast(nn.Linear, pair[1])
    with torch.no_grad():
        first.weight.copy_(vh[:rank] * root[:, None])
        second.weight.copy_(u[:, :rank] * root[None, :])
        if linear.bias is not None and second.bias is not None:
            second.bias.copy_(linear.bias.detach())
    error = (s[rank:].pow(2).sum().sqrt() / s.pow(2).sum().sqrt()).item()
    return pair, error


@register_stage("factorize", FactorizeConfig)
def factorize(
    model: nn.Module,
    data: Data,
    config: FactorizeConfig,
    *,
    context: StageContext,
) -> nn.Module:
    """Replace convolutions (and optionally Linear layers) by factorized pairs.

    Example:
        >>> thin = factorize(model, data)            # every eligible 3x3 convolution
        >>> thin = factorize(model, data, layers=["re:layer[34]\\\\..*conv"])
    """
    model = copy.deepcopy(model).cpu().eval()
    example = data.example_input(1)
    total_macs = count_flops(model, example) // 2
    pixels = _output_pixels(model, example)
    skipped = (
        set(matching_modules(model, config.skip, key="factorize.skip")) if config.skip else set()
    )
    chosen = (
        set(matching_modules(model, config.layers, key="factorize.layers"))
        if config.layers
        else None
    )
    modules = dict(model.named_modules())
    rows, records = [], list(getattr(model, "compress_replacements", []))
    for name, module in list(modules.items()):
        if name in skipped or (chosen is not None and name not in chosen):
            continue
        fitted = _fit(name, module, pixels.get(name, 0), config, total_macs, chosen is not None)
        if fitted is None:
            continue
        replacement, error, before, after = fitted
        _replace(model, name, replacement)
        records.append({"name": name, **_record(replacement)})
        rows.append(
            {
                "layer": name,
                "type": type(module).__name__,
                "macs_before": before,
                "macs_after": after,
                "params_before": sum(p.numel() for p in module.parameters()),
                "params_after": sum(p.numel() for p in replacement.parameters()),
                "fit_error": error,
            }
        )
    if not rows:
        log.warning("factorize: no layer qualified; the model is unchanged")
    set_traits(model, compress_replacements=records)
    if records:
        mark_changed(model, "replacements")
    macs_after = count_flops(model, example) // 2
    set_traits(
        model,
        stage_details={"layers": rows, "macs_ratio": macs_after / total_macs},
        notes=[
            f"{len(rows)} layers factorized; MACs {macs_after / total_macs:.2f}x the input"
            " model's. The fit is approximate: a distill stage after this one recovers the"
            " accuracy"
        ],
    )
    return model.eval()


def _fit(name: str, module: nn.Module, pixels: int, config, total_macs: int, chosen: bool):
    """``(replacement, fit error, MACs before, MACs after)`` for one layer, or None where it
    does not qualify. A layer the recipe ``chosen`` by name must qualify (else an error)."""
    if isinstance(module, nn.Conv2d):
        eligible = module.groups == 1 and math.prod(module.kernel_size) > 1
        if not eligible:
            if chosen:
                raise RecipeError(
                    f"factorize.layers: {name} is not a standard k x k convolution"
                    f" (kernel {tuple(module.kernel_size)}, groups {module.groups})"
                )
            return None
        before = _conv_macs(module, pixels)
        after = pixels * module.in_channels * (math.prod(module.kernel_size) + module.out_channels)
        if not chosen and (
            module.in_channels < config.min_in_channels
            or before - after < config.min_macs_saved * total_macs
        ):
            return None
        replacement, error = separable_fit(module)
    elif isinstance(module, nn.Linear) and config.linear_rank is not None:
        rank = max(1, round(config.linear_rank * min(module.in_features, module.out_features)))
        positions = pixels // module.out_features
        before = positions * module.in_features * module.out_features
        after = positions * rank * (module.in_features + module.out_features)
        if after >= before:
            return None
        replacement, error = svd_fit(module, rank)
    else:
        if chosen and not list(module.children()):
            raise RecipeError(
                f"factorize.layers: {name} is not a standard k x k convolution"
                f" ({type(module).__name__}; Linear layers need factorize.linear_rank)"
            )
        return None
    return replacement, error, before, after


@register_architecture_change(
    "replacements", capture=lambda model: model.compress_replacements, order=0
)  # before pruned shapes, which name the replacements' parts
def apply_replacements(model: nn.Module, records: list[dict]) -> None:
    """Rebuild recorded replacements on a freshly built model (artifact loading)."""
    for record in records:
        if record["kind"] == "depthwise_separable":
            conv = nn.Conv2d(
                record["in_channels"],
                record["out_channels"],
                tuple(record["kernel_size"]),
                tuple(record["stride"]),
                tuple(record["padding"])
                if isinstance(record["padding"], list)
                else record["padding"],
                tuple(record["dilation"]),
                bias=record["bias"],
            )
            replacement = _separable(conv)
        else:
            replacement = _thin(
                record["in_features"], record["out_features"], record["rank"], record["bias"]
            )
        _replace(model, record["name"], replacement)
    set_traits(model, compress_replacements=list(records))


def _separable(conv: nn.Conv2d) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(
            conv.in_channels,
            conv.in_channels,
            cast(tuple[int, int], conv.kernel_size),
            cast(tuple[int, int], conv.stride),
            cast(tuple[int, int], conv.padding),
            cast(tuple[int, int], conv.dilation),
            groups=conv.in_channels,
            bias=False,
        ),
        nn.Conv2d(conv.in_channels, conv.out_channels, 1, bias=conv.bias is not None),
    )


def _thin(in_features: int, out_features: int, rank: int, bias: bool) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(in_features, rank, bias=False), nn.Linear(rank, out_features, bias=bias)
    )


def _record(replacement: nn.Sequential) -> dict:
    first, second = replacement
    if isinstance(first, nn.Conv2d):
        return {
            "kind": "depthwise_separable",
            "in_channels": first.in_channels,
            "out_channels": second.out_channels,
            "kernel_size": list(first.kernel_size),
            "stride": list(first.stride),
            "padding": list(first.padding) if isinstance(first.padding, tuple) else first.padding,
            "dilation": list(first.dilation),
            "bias": second.bias is not None,
        }
    return {
        "kind": "svd",
        "in_features": first.in_features,
        "out_features": second.out_features,
        "rank": first.out_features,
        "bias": second.bias is not None,
    }


def _replace(model: nn.Module, name: str, replacement: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, replacement)


def _conv_macs(conv: nn.Conv2d, out_pixels: int) -> int:
    per_pixel = conv.in_channels // conv.groups * math.prod(conv.kernel_size) * conv.out_channels
    return out_pixels * per_pixel


def _output_pixels(model: nn.Module, example: torch.Tensor) -> dict[str, int]:
    """Per Conv2d: output positions (H·W); per Linear: output elements per image."""

    sizes: dict[str, int] = {}

    def hook_for(name: str, module: nn.Module):
        if isinstance(module, nn.Conv2d):
            return lambda m, i, o: sizes.__setitem__(name, o.shape[-1] * o.shape[-2])
        if isinstance(module, nn.Linear):
            return lambda m, i, o: sizes.__setitem__(name, o[0].numel())
        return None

    forward_with_hooks(model, example, hook_for)
    return sizes
