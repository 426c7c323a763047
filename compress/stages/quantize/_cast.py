"""FP16 and BF16: the whole model cast to a 16-bit float type, float inputs cast on the way in."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from compress.core.errors import ArtifactError
from compress.data import Data
from compress.measure.counts import count_params
from compress.models.artifact import (
    fill_state,
    manifest_counts,
    register_loader,
    save_graph,
    save_state,
    spec_architecture,
)
from compress.stages.quantize._config import QuantizeConfig

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
# CPU flags that give fast kernels for each type; without them oneDNN emulates or converts.
_FAST_CPU_FLAGS = {
    torch.float16: ("avx512_fp16", "amx_fp16"),
    torch.bfloat16: ("avx512_bf16", "amx_bf16"),
}


class LowPrecisionModel(nn.Module):
    """``inner`` in FP16/BF16; takes float32 (or integer token ids) and returns float32 so
    that it drops in anywhere."""

    def __init__(self, inner: nn.Module, dtype: torch.dtype, param_counts: tuple[int, int]):
        super().__init__()
        self.inner = inner.to(dtype)
        self.dtype = dtype
        self.param_counts = tuple(param_counts)
        self.compute_dtype = str(dtype).removeprefix("torch.")
        self.element_bytes = 2
        self.notes: list[str] = []

    @property
    def not_faster_reason(self) -> str:
        """Why half precision may not be faster where the model is (read by compare)."""
        on_gpu = any(p.is_cuda for p in self.inner.parameters())
        return _not_faster_reason(self.dtype, on_gpu)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Only floating inputs are cast: a language model's integer token ids index its
        # embedding tables as they are.
        return self.inner(x.to(self.dtype) if x.is_floating_point() else x).float()

    def save_artifact(self, folder: Path, example: torch.Tensor | None) -> dict:
        if not hasattr(self.inner, "compress_spec"):
            if example is None:
                raise ValueError(
                    "pass an example input to save a model that compress did not build"
                )
            return {"kind": "exported", "file": save_graph(self, folder, example)}
        manifest = save_state(self.inner, folder)
        return {
            **manifest,
            "kind": "low_precision",
            "dtype": self.compute_dtype,
            "param_counts": list(self.param_counts),
        }


@register_loader("low_precision")
def _load(folder: Path, manifest: dict, trust) -> LowPrecisionModel:
    dtype = {str(d).removeprefix("torch."): d for d in DTYPES.values()}.get(
        str(manifest.get("dtype"))
    )
    if dtype is None:
        raise ArtifactError(f"{folder}: dtype {manifest.get('dtype')!r} is not float16/bfloat16")
    inner = spec_architecture(folder, manifest, trust)
    fill_state(inner, folder, manifest)
    return LowPrecisionModel(inner, dtype, manifest_counts(folder, manifest))


def cast(model: nn.Module, data: Data, config: QuantizeConfig, context=None) -> LowPrecisionModel:
    """Cast a copy of ``model`` to the method's dtype."""
    return LowPrecisionModel(
        copy.deepcopy(model).eval(), DTYPES[config.method], count_params(model)
    ).eval()


def _not_faster_reason(dtype: torch.dtype, on_gpu: bool = False) -> str:
    name = str(dtype).removeprefix("torch.")
    if on_gpu:
        return (
            f"on the GPU this model's work per call is too small to keep it busy: time goes to"
            f" kernel launches, not arithmetic, and {name} adds casts; half precision pays off"
            " with larger images and batches"
        )
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        flags = []
    fast = [f for f in _FAST_CPU_FLAGS[dtype] if f in flags]
    if fast:
        return f"on the CPU, {name} kernels ({', '.join(fast)}) did not beat float32 for this model"
    return (
        f"this CPU has no fast {name} instructions ({' or '.join(_FAST_CPU_FLAGS[dtype])}), so"
        f" {name} runs converted or emulated; it pays off on GPUs and newer CPUs"
    )
