"""INT8 dynamic for models that decode (a GPT): torchao's
``Int8DynamicActivationInt8WeightConfig`` on every Linear layer — INT8 weights, one scale
per output channel; activations quantized per token at run time — applied in place with
``quantize_``, so that the forward pass and the decoding step run the same INT8 layers.
torch.compile lowers them to INT8 matmuls (the forward pass compiles itself, once per input
shape; the evaluator's ``inductor`` decode runtime compiles the step).

PT2E's graph (``int8_dynamic`` on other models) has no decoding step and quantizes each
activation with one scale per tensor; a language model's tokens differ too much for that.
Saved as each layer's INT8 codes and scales, plain tensors; loading quantizes the float
layers again and puts the stored codes back, so that the loaded model computes exactly
what was saved.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from compress.core.errors import ArtifactError
from compress.core.modules import compile_module, matching_modules
from compress.data import Data
from compress.measure.counts import count_params
from compress.measure.onnx_rewrite import WeightCodes
from compress.models.artifact import (
    architecture_changes,
    manifest_counts,
    read_weights,
    register_loader,
    spec_architecture,
)
from compress.stages.quantize._config import QuantizeConfig
from compress.stages.quantize._weight_only import take_parts

_PARTS = ("qdata", "scale")  # what torchao's Int8Tensor holds, saved per layer


class PerTokenInt8Model(nn.Module):
    """``inner`` whose Linear layers in ``layers`` hold torchao INT8 weights."""

    compute_dtype = "int8 (per-token dynamic)"
    cpu_only = True  # the x86 INT8 lowering; measured on the CPU

    def __init__(self, inner: nn.Module, layers: list[str], param_counts: tuple[int, int]):
        super().__init__()
        self.inner, self.layers = inner, layers
        self.param_counts = tuple(param_counts)
        self.reference_module = inner  # counted eagerly; what runs is compiled
        self.notes = [
            "int8 weights and per-token int8 activations (torchao"
            f" Int8DynamicActivationInt8WeightConfig) in: {', '.join(layers) or 'no layer'}",
            "exported as the same int8 weight codes: ONNX Runtime runs them in MatMulNBits"
            " and OpenVINO in its FullyConnected, each rounding activations to INT8 per"
            " block of 32 inputs (its own dynamic quantization, finer than per token)",
        ]
        self._compiled = compile_module(inner)
        self._shapes: set[torch.Size] = set()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape in self._shapes:
            return self._compiled(x)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = self._compiled(x)
        self._shapes.add(x.shape)
        return out

    def _apply(self, fn, recurse=True):
        # torchao's INT8 weights cannot be swapped by .cpu() / .to(): on the CPU already,
        # where their kernels run, the model stays as it is.
        return self

    def export_module(self) -> nn.Module:
        """What the exporter traces: the inner model with float Linear layers holding the
        dequantized INT8 weights, and the codes (``onnx_weight_codes``) the file stores."""
        plain = _float_copy(self.inner, self.layers)
        weight_codes = []
        for name in self.layers:
            codes, scales = _int8_parts(self.inner.get_submodule(name))
            dequantized = cast(nn.Linear, plain.get_submodule(name)).weight.detach().numpy()
            weight_codes.append(
                WeightCodes(
                    8, codes.numpy(), scales.numpy(), None, dequantized.shape[1], dequantized
                )
            )
        plain.onnx_weight_codes = weight_codes  # type: ignore[assignment]  # for the exporter
        return plain

    def decoder(self) -> nn.Module:
        """The inner model's decoding step, on the same INT8 layers."""
        return getattr(self.inner, "decoder")()  # noqa: B009 - a method nn.Module types as Tensor

    def save_artifact(self, folder: Path, example: torch.Tensor | None) -> dict:
        if not hasattr(self.inner, "compress_spec"):
            raise ValueError("per-token INT8 artifacts need a model built by compress (a spec)")
        quantized = set(self.layers)
        state = {
            k: v
            for k, v in self.inner.state_dict().items()
            if k.removesuffix(".weight") not in quantized
        }
        for name in self.layers:
            weight = self.inner.get_submodule(name).weight
            state.update({f"{name}.{part}": getattr(weight, part).clone() for part in _PARTS})
        torch.save(state, folder / "weights.pt")
        return {
            "kind": "int8_per_token",
            "file": "weights.pt",
            "spec": self.inner.compress_spec,
            "layers": self.layers,
            "param_counts": list(self.param_counts),
            **architecture_changes(self.inner),  # pruned shapes and depth, rebuilt on load
        }


def _int8_parts(linear: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """A torchao INT8 weight's codes (out, in) and float scales (out, 1)."""
    weight: Any = linear.weight
    return weight.qdata, weight.scale.float().reshape(-1, 1)


def _float_copy(inner: nn.Module, layers: list[str]) -> nn.Module:
    """A copy of ``inner`` whose INT8 Linear layers are float ones holding the dequantized
    weights (codes times scales, exactly what the INT8 matmul multiplies by)."""
    swapped = {}
    for name in layers:
        linear = cast(nn.Linear, inner.get_submodule(name))
        plain = nn.Linear(linear.in_features, linear.out_features, linear.bias is not None)
        with torch.no_grad():
            codes, scales = _int8_parts(linear)
            plain.weight.copy_(codes.float() * scales)
            if linear.bias is not None:
                plain.bias.copy_(linear.bias)
        swapped[name] = plain
    memo = {id(inner.get_submodule(name)): module for name, module in swapped.items()}
    return copy.deepcopy(inner, memo)


def _quantize_in_place(model: nn.Module, layers: list[str]) -> None:
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    chosen = set(layers)
    quantize_(
        model,
        Int8DynamicActivationInt8WeightConfig(),
        filter_fn=lambda module, name: isinstance(module, nn.Linear) and name in chosen,
    )


@register_loader("int8_per_token")
def _load(folder: Path, manifest: dict, trust) -> PerTokenInt8Model:
    inner = spec_architecture(folder, manifest, trust).eval()
    layers = manifest.get("layers")
    linear = {n for n, m in inner.named_modules() if isinstance(m, nn.Linear)}
    if not isinstance(layers, list) or not set(layers) <= linear:
        raise ArtifactError(f"{folder}: layers must name Linear layers of the model; refused")
    state = read_weights(folder, manifest, inner)
    stored: dict[str, dict[str, torch.Tensor]] = {}
    for name in layers:
        out_features, in_features = cast(nn.Linear, inner.get_submodule(name)).weight.shape
        expected = {"qdata": (out_features, in_features), "scale": (out_features, 1)}
        stored[name] = take_parts(state, name, expected, folder)
        if stored[name]["qdata"].dtype != torch.int8:
            raise ArtifactError(f"{folder}: layer {name!r}: codes are not int8; refused")
    missing, unexpected = inner.load_state_dict(state, strict=False)
    if unexpected or set(missing) != {f"{name}.weight" for name in layers}:
        raise ArtifactError(
            f"{folder}: weights do not fit the model (missing {missing}, unexpected {unexpected})"
        )
    _quantize_in_place(inner, layers)
    with torch.no_grad():
        for name, parts in stored.items():
            weight = inner.get_submodule(name).weight
            for part, tensor in parts.items():
                getattr(weight, part).copy_(tensor)
    return PerTokenInt8Model(inner, layers, manifest_counts(folder, manifest))


def per_token_int8(
    model: nn.Module, data: Data, config: QuantizeConfig, context=None
) -> PerTokenInt8Model:
    """INT8 weights and per-token dynamic INT8 activations in every Linear (except ``skip``)."""
    inner = copy.deepcopy(model).cpu().eval()
    skipped = set(matching_modules(inner, config.skip, key="quantize.skip"))
    layers = [
        name
        for name, module in inner.named_modules()
        if isinstance(module, nn.Linear) and name not in skipped
    ]
    _quantize_in_place(inner, layers)
    return PerTokenInt8Model(inner, layers, count_params(model)).eval()
