"""INT4 weight-only quantization of Linear layers, group-wise, stored packed.

torchao 0.18 has no CPU kernel for int4 weights (its packing formats target CUDA, XPU
and an optional kernel library), so on the CPU compress stores the weights packed
(two 4-bit codes per byte, one FP16 scale and one 4-bit zero point per group) and runs
the dequantized weights in float: the artifact shrinks, the latency does not, and the
model's notes say so.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from compress.core.errors import ArtifactError
from compress.core.modules import matching_modules
from compress.data import Data
from compress.measure.counts import count_params
from compress.models.artifact import (
    manifest_counts,
    read_weights,
    register_loader,
    spec_architecture,
)
from compress.stages.quantize._config import QuantizeConfig

NO_KERNEL_NOTE = (
    "int4 weights are stored packed and dequantized to float for compute: no int4 kernel for"
    " this device in torchao, so expect a smaller artifact, not a faster model"
)


class Int4WeightOnlyModel(nn.Module):
    """``inner`` whose Linear weights are the dequantized int4 codes kept in ``packed``."""

    compute_dtype = "float32 (int4 weights)"

    def __init__(
        self,
        inner: nn.Module,
        packed: dict[str, dict[str, torch.Tensor]],
        group_size: int,
        param_counts: tuple[int, int],
    ):
        super().__init__()
        self.inner = inner
        self.packed = packed
        self.group_size = group_size
        self.param_counts = tuple(param_counts)
        self.notes = [NO_KERNEL_NOTE, f"int4 weights in: {', '.join(packed) or 'no layer'}"]
        self.not_faster_reason = "int4 weights run dequantized (no int4 kernel here)"
        for name, codes in packed.items():  # the float weights are exactly what was stored
            with torch.no_grad():
                self.inner.get_parameter(f"{name}.weight").copy_(dequantize(codes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)

    def save_artifact(self, folder: Path, example: torch.Tensor | None) -> dict:
        if not hasattr(self.inner, "compress_spec"):
            raise ValueError("int4 artifacts need a model built by compress (one with a spec)")
        state = {
            k: v
            for k, v in self.inner.state_dict().items()
            if k.removesuffix(".weight") not in self.packed
        }
        state.update(
            {
                f"{name}.{part}": t
                for name, codes in self.packed.items()
                for part, t in codes.items()
                if isinstance(t, torch.Tensor)
            }
        )
        torch.save(state, folder / "weights.pt")
        return {
            "kind": "int4_weight_only",
            "file": "weights.pt",
            "spec": self.inner.compress_spec,
            "layers": {name: list(codes["shape"]) for name, codes in self.packed.items()},
            "group_size": self.group_size,
            "param_counts": list(self.param_counts),
        }


@register_loader("int4_weight_only")
def _load(folder: Path, manifest: dict, trust) -> Int4WeightOnlyModel:
    inner = spec_architecture(folder, manifest, trust)
    group_size, layers = manifest.get("group_size"), manifest.get("layers")
    if not isinstance(group_size, int) or group_size < 1 or not isinstance(layers, dict):
        raise ArtifactError(f"{folder}: group_size or layers malformed; refused")
    state = read_weights(folder, manifest, inner)
    packed = {}
    for name, shape in layers.items():
        module = dict(inner.named_modules()).get(name)
        if not isinstance(module, nn.Linear):
            raise ArtifactError(f"{folder}: int4 layer {name!r} is not a Linear of the model")
        out_features, in_features = module.weight.shape
        group = min(group_size, in_features)
        if shape != [out_features, in_features, group]:
            raise ArtifactError(f"{folder}: int4 layer {name!r}: shape {shape!r} does not fit")
        groups = -(-in_features // group)
        expected = {
            "codes": (out_features, -(-groups * group // 2)),
            "scales": (out_features, groups),
        }
        expected["zeros"] = expected["scales"]
        try:
            packed[name] = {part: state.pop(f"{name}.{part}") for part in expected}
        except KeyError as error:
            raise ArtifactError(f"{folder}: the weight file lacks {error}; refused") from None
        if any(tuple(packed[name][p].shape) != expected[p] for p in expected):
            raise ArtifactError(f"{folder}: int4 layer {name!r}: packed tensors do not fit")
        packed[name]["shape"] = tuple(shape)
    missing, unexpected = inner.load_state_dict(state, strict=False)
    if unexpected or set(missing) != {f"{name}.weight" for name in packed}:
        raise ArtifactError(
            f"{folder}: weights do not fit the model (missing {missing}, unexpected {unexpected})"
        )
    return Int4WeightOnlyModel(inner, packed, group_size, manifest_counts(folder, manifest))


def int4_weight_only(
    model: nn.Module, data: Data, config: QuantizeConfig, context=None
) -> Int4WeightOnlyModel:
    """Quantize every Linear weight (except ``skip``) to 4 bits in groups of ``group_size``."""
    inner = copy.deepcopy(model).cpu().eval()
    skipped = set(matching_modules(inner, config.skip, key="quantize.skip"))
    packed = {
        name: quantize_weight(module.weight.detach(), config.group_size)
        for name, module in inner.named_modules()
        if isinstance(module, nn.Linear) and name not in skipped
    }
    return Int4WeightOnlyModel(inner, packed, config.group_size, count_params(model)).eval()


def quantize_weight(weight: torch.Tensor, group_size: int) -> dict:
    """Asymmetric 4-bit codes per group of ``group_size`` inputs, two codes per byte.

    Example:
        >>> w = torch.randn(8, 256)
        >>> q = quantize_weight(w, group_size=128)
        >>> (dequantize(q) - w).abs().max()  # at most half a step of its group
    """
    out_features, in_features = weight.shape
    group = min(group_size, in_features)
    padded = -in_features % group
    w = torch.nn.functional.pad(weight.float(), (0, padded)).view(out_features, -1, group)
    # The range always holds 0, so that the zero point is a valid code (a group of only
    # positive or only negative weights would otherwise clamp).
    low, high = w.amin(dim=2).clamp(max=0), w.amax(dim=2).clamp(min=0)
    scales = ((high - low) / 15).clamp(min=1e-8).half()  # stored in FP16
    zeros = (-low / scales.float()).round().clamp(0, 15).to(torch.uint8)
    codes = (w / scales.float()[..., None] + zeros[..., None]).round().clamp(0, 15).to(torch.uint8)
    codes = codes.view(out_features, -1)
    if codes.shape[1] % 2:
        codes = torch.nn.functional.pad(codes, (0, 1))
    packed = codes[:, 0::2] | (codes[:, 1::2] << 4)
    return {
        "codes": packed,
        "scales": scales,
        "zeros": zeros,
        "shape": (out_features, in_features, group),
    }


def dequantize(q: dict) -> torch.Tensor:
    """The float weight that the stored codes stand for."""
    out_features, in_features, group = q["shape"]
    packed = q["codes"]
    codes = torch.stack([packed & 0x0F, packed >> 4], dim=2).view(out_features, -1)
    groups = q["scales"].shape[1]
    codes = codes[:, : groups * group].view(out_features, groups, group).float()
    w = (codes - q["zeros"].float()[..., None]) * q["scales"].float()[..., None]
    return w.view(out_features, -1)[:, :in_features]
