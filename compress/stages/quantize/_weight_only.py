"""Weight-only quantization of Linear layers: INT4 group-wise or INT8 per output channel,
run by torch's CPU kernels for them.

INT4 codes are asymmetric per group of ``group_size`` inputs (an FP16 scale and a 4-bit
zero point each), stored two per byte; they run in ``aten._weight_int4pack_mm_for_cpu``
(the CPU kernel torchao's int4 CPU layout calls), which needs the layer's outputs a
multiple of 16 and its inputs a multiple of a group of 32, 64, 128 or 256. A layer that
does not fit runs its dequantized weights in float, and the model's notes name each.
INT8 codes are symmetric per output channel (an FP32 scale each) and run in
``aten._weight_int8pack_mm``. Activations stay float: these methods shrink the weights
and the memory traffic of small batches (decoding), not the arithmetic.

Exported (ONNX Runtime, OpenVINO), the file holds the same codes behind a DequantizeLinear
per layer (INT4 as opset 21's blocked ``uint4``): ONNX Runtime fuses each into its
``MatMulNBits`` kernel (accuracy level 4: activations rounded to INT8 per block), OpenVINO
keeps the weights compressed in its FullyConnected; the report scores each runtime.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from compress.core.errors import ArtifactError
from compress.core.modules import matching_modules
from compress.data import Data
from compress.measure.counts import count_params
from compress.measure.onnx_rewrite import WeightCodes
from compress.models.artifact import (
    manifest_counts,
    read_weights,
    register_loader,
    spec_architecture,
)
from compress.stages.quantize._config import QuantizeConfig

INT4_KERNEL = "aten._weight_int4pack_mm_for_cpu"
INT8_KERNEL = "aten._weight_int8pack_mm"
INT4_GROUPS = (32, 64, 128, 256)  # what the int4 CPU kernel takes
# Rows (tokens, images) up to which a call runs the weight-only kernel; more run the
# dequantized weights in float. The kernels are built for decoding's few rows: on an AMD
# EPYC (AVX-512) ``_weight_int8pack_mm`` took 16 ms for 256 rows of a 192x768 layer,
# where the dequantized float matmul took 0.49 ms (71 against 55 us for one row).
KERNEL_MAX_ROWS = 8


class _PackedLinear(nn.Module):
    """A Linear whose weight is kept as codes and run by a weight-only kernel."""

    def __init__(self, codes: dict, bias: torch.Tensor | None):
        super().__init__()
        self.codes = codes
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())
        self.out_features, self.in_features = codes["shape"][:2]
        if "scales" in codes and "zeros" in codes:  # int4
            group = codes["shape"][2]
            self.group = group
            ids = _unpack_int4(codes).to(torch.int32)
            scales = codes["scales"].float()
            # The kernel computes (code - 8) * scale + zero: zero here is (8 - z) * scale.
            zeros = (8 - codes["zeros"].float()) * scales
            pairs = torch.stack((scales, zeros), dim=-1).transpose(0, 1).contiguous()
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(ids, 1)
            self.register_buffer("packed", packed, persistent=False)
            self.register_buffer("scales_and_zeros", pairs, persistent=False)
        else:
            self.register_buffer("packed", codes["int8"], persistent=False)
            self.register_buffer("scales", codes["int8_scales"].float(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        if flat.shape[0] > KERNEL_MAX_ROWS:
            return F.linear(x, dequantize(self.codes).to(x.dtype), self.bias)
        if hasattr(self, "scales_and_zeros"):
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(
                flat, self.packed, self.group, self.scales_and_zeros
            )
        else:
            y = torch.ops.aten._weight_int8pack_mm(flat, self.packed, self.scales)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features)


class WeightOnlyModel(nn.Module):
    """``inner`` with the Linear weights of ``packed`` quantized to ``bits`` (4 or 8)."""

    def __init__(
        self,
        inner: nn.Module,
        packed: dict[str, dict],
        bits: int,
        group_size: int,
        param_counts: tuple[int, int],
    ):
        super().__init__()
        self.inner, self.packed, self.bits = inner, packed, bits
        self.group_size = group_size
        self.param_counts = tuple(param_counts)
        self.compute_dtype = f"float32 (int{bits} weights)"
        kernel, dequantized = [], []
        for name, codes in packed.items():
            linear = cast(nn.Linear, inner.get_submodule(name))
            if _fits_kernel(codes, bits):
                _set_submodule(inner, name, _PackedLinear(codes, linear.bias))
                kernel.append(name)
            else:  # the float weights are exactly what was stored
                with torch.no_grad():
                    linear.weight.copy_(dequantize(codes))
                dequantized.append(name)
        self.notes = [
            f"int{bits} weights run in {INT4_KERNEL if bits == 4 else INT8_KERNEL}"
            f" (activations float): {', '.join(kernel) or 'no layer'}",
            f"exported as the same int{bits} codes: ONNX Runtime runs them in MatMulNBits"
            " (activations rounded to INT8 per block), OpenVINO in its compressed-weight"
            " FullyConnected",
        ]
        if dequantized:
            self.notes.append(
                f"int{bits} weights dequantized to float (no kernel for their shape):"
                f" {', '.join(dequantized)}"
            )
        if not kernel:
            self.not_faster_reason = f"int{bits} weights run dequantized (no kernel fits)"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)

    def export_module(self) -> nn.Module:
        """What the exporter traces: the inner model with the dequantized weights as plain
        Linear layers, and the codes (``onnx_weight_codes``) that the file stores instead."""
        plain = copy.deepcopy(self.inner)
        for name, codes in self.packed.items():
            packed = plain.get_submodule(name)
            if isinstance(packed, _PackedLinear):
                linear = nn.Linear(packed.in_features, packed.out_features, packed.bias is not None)
                with torch.no_grad():
                    linear.weight.copy_(dequantize(codes))
                    if packed.bias is not None:
                        linear.bias.copy_(packed.bias)
                _set_submodule(plain, name, linear)
        weight_codes = [_weight_codes(c) for c in self.packed.values()]
        plain.onnx_weight_codes = weight_codes  # type: ignore[assignment]  # for the exporter
        return plain

    def decoder(self) -> nn.Module:
        """The inner model's decoding step, on the same quantized layers."""
        return getattr(self.inner, "decoder")()  # noqa: B009 - only where the inner has one

    def save_artifact(self, folder: Path, example: torch.Tensor | None) -> dict:
        if not hasattr(self.inner, "compress_spec"):
            raise ValueError("weight-only artifacts need a model built by compress (a spec)")
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
            "kind": f"int{self.bits}_weight_only",
            "file": "weights.pt",
            "spec": self.inner.compress_spec,
            "layers": {name: list(codes["shape"]) for name, codes in self.packed.items()},
            "group_size": self.group_size,
            "param_counts": list(self.param_counts),
        }


def _weight_codes(codes: dict) -> WeightCodes:
    """The codes as the ONNX rewrite stores them, with the float weight they stand for."""
    weight = dequantize(codes).numpy()
    if "int8" in codes:
        scales = codes["int8_scales"].float().numpy()[:, None]
        return WeightCodes(8, codes["int8"].numpy(), scales, None, weight.shape[1], weight)
    group = codes["shape"][2]
    scales, zeros = codes["scales"].float().numpy(), codes["zeros"].numpy()
    return WeightCodes(4, _unpack_int4(codes).numpy(), scales, zeros, group, weight)


def _fits_kernel(codes: dict, bits: int) -> bool:
    out_features, in_features = codes["shape"][:2]
    if bits == 8:
        return True
    group = codes["shape"][2]
    return out_features % 16 == 0 and group in INT4_GROUPS and in_features % group == 0


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _expected_parts(bits: int, out_features: int, in_features: int, group: int) -> dict:
    if bits == 8:
        return {"int8": (out_features, in_features), "int8_scales": (out_features,)}
    groups = -(-in_features // group)
    scales = (out_features, groups)
    return {"codes": (out_features, -(-groups * group // 2)), "scales": scales, "zeros": scales}


def _load(folder: Path, manifest: dict, trust, bits: int) -> WeightOnlyModel:
    inner = spec_architecture(folder, manifest, trust)
    group_size, layers = manifest.get("group_size"), manifest.get("layers")
    if not isinstance(group_size, int) or group_size < 1 or not isinstance(layers, dict):
        raise ArtifactError(f"{folder}: group_size or layers malformed; refused")
    state = read_weights(folder, manifest, inner)
    packed = {}
    for name, shape in layers.items():
        module = dict(inner.named_modules()).get(name)
        if not isinstance(module, nn.Linear):
            raise ArtifactError(f"{folder}: int{bits} layer {name!r} is not a Linear of the model")
        out_features, in_features = module.weight.shape
        group = min(group_size, in_features) if bits == 4 else in_features
        if shape != [out_features, in_features, group]:
            raise ArtifactError(f"{folder}: int{bits} layer {name!r}: shape {shape!r} does not fit")
        expected = _expected_parts(bits, out_features, in_features, group)
        packed[name] = {**take_parts(state, name, expected, folder), "shape": tuple(shape)}
    missing, unexpected = inner.load_state_dict(state, strict=False)
    if unexpected or set(missing) != {f"{name}.weight" for name in packed}:
        raise ArtifactError(
            f"{folder}: weights do not fit the model (missing {missing}, unexpected {unexpected})"
        )
    return WeightOnlyModel(inner, packed, bits, group_size, manifest_counts(folder, manifest))


def take_parts(state: dict, name: str, expected: dict, folder: Path) -> dict[str, torch.Tensor]:
    """Layer ``name``'s stored tensors (``{part: shape}`` of ``expected``), taken out of a
    weight file's ``state``; a missing one or another shape is refused.

    Example:
        >>> take_parts(state, "head", {"int8": (84, 192), "int8_scales": (84,)}, folder)
    """
    try:
        parts = {part: state.pop(f"{name}.{part}") for part in expected}
    except KeyError as error:
        raise ArtifactError(f"{folder}: the weight file lacks {error}; refused") from None
    if any(tuple(parts[p].shape) != tuple(expected[p]) for p in expected):
        raise ArtifactError(f"{folder}: layer {name!r}: its stored tensors do not fit; refused")
    return parts


@register_loader("int4_weight_only")
def _load_int4(folder: Path, manifest: dict, trust) -> WeightOnlyModel:
    return _load(folder, manifest, trust, bits=4)


@register_loader("int8_weight_only")
def _load_int8(folder: Path, manifest: dict, trust) -> WeightOnlyModel:
    return _load(folder, manifest, trust, bits=8)


def weight_only(
    model: nn.Module, data: Data, config: QuantizeConfig, context=None
) -> WeightOnlyModel:
    """Quantize every Linear weight (except ``skip``): int4_weight_only in groups of
    ``group_size``, int8_weight_only per output channel."""
    bits = 4 if config.method == "int4_weight_only" else 8
    inner = copy.deepcopy(model).cpu().eval()
    skipped = set(matching_modules(inner, config.skip, key="quantize.skip"))
    encode = quantize_weight if bits == 4 else quantize_weight_int8
    packed = {
        name: encode(module.weight.detach(), config.group_size)
        for name, module in inner.named_modules()
        if isinstance(module, nn.Linear) and name not in skipped
    }
    return WeightOnlyModel(inner, packed, bits, config.group_size, count_params(model)).eval()


def quantize_weight_int8(weight: torch.Tensor, group_size: int = 0) -> dict:
    """Symmetric INT8 codes with one FP32 scale per output channel (``group_size`` unused).

    Example:
        >>> q = quantize_weight_int8(torch.randn(8, 16))
        >>> q["int8"].dtype, q["int8_scales"].shape
        (torch.int8, torch.Size([8]))
    """
    out_features, in_features = weight.shape
    scales = (weight.float().abs().amax(dim=1) / 127).clamp(min=1e-8)
    codes = (weight.float() / scales[:, None]).round().clamp(-127, 127).to(torch.int8)
    return {"int8": codes, "int8_scales": scales, "shape": (out_features, in_features, in_features)}


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


def _unpack_int4(q: dict) -> torch.Tensor:
    """The (out, in) 4-bit codes, one per element (padding of the last group dropped)."""
    out_features, in_features, _ = q["shape"]
    packed = q["codes"]
    codes = torch.stack([packed & 0x0F, packed >> 4], dim=2).view(out_features, -1)
    return codes[:, :in_features]


def dequantize(q: dict) -> torch.Tensor:
    """The float weight that the stored codes stand for."""
    if "int8" in q:
        return q["int8"].float() * q["int8_scales"].float()[:, None]
    out_features, in_features, group = q["shape"]
    packed = q["codes"]
    codes = torch.stack([packed & 0x0F, packed >> 4], dim=2).view(out_features, -1)
    groups = q["scales"].shape[1]
    codes = codes[:, : groups * group].view(out_features, groups, group).float()
    w = (codes - q["zeros"].float()[..., None]) * q["scales"].float()[..., None]
    return w.view(out_features, -1)[:, :in_features]
