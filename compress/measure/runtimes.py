"""The runtimes a deployed model runs in, each as a module taking and returning CPU tensors:
PyTorch with inductor (:class:`InductorModel`), ONNX Runtime (:class:`OnnxRuntimeModel`) and
OpenVINO (:class:`OpenVinoModel`), each set for latency at batch 1 with a given number of
threads. :func:`compress.measure.deploy.deployed` exports a model and wraps it in one."""

from __future__ import annotations

import collections
import copy
import functools
import math
import warnings
from pathlib import Path

import torch
from torch import nn

from compress.core.errors import ExportError, first_line
from compress.core.modules import compile_module
from compress.measure.onnx_rewrite import onnx_precision


class InductorModel(nn.Module):
    """A float model through ``torch.compile`` with freezing (weights folded into constants
    and pre-packed for oneDNN), compiled once per input shape."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = copy.deepcopy(model).eval()
        self.compiled = compile_module(self.model)
        self._shapes: set[torch.Size] = set()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape in self._shapes:
            return self.compiled(x)
        with torch._inductor.config.patch(freezing=True), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                out = self.compiled(x)
            except Exception as error:  # noqa: BLE001 - dynamo's and inductor's errors are many
                raise ExportError(f"torch.compile failed: {first_line(error)}") from None
        self._shapes.add(x.shape)
        return out


class OnnxRuntimeModel(nn.Module):
    """An ONNX Runtime CPU session with all graph optimisations (QDQ fusion included)."""

    def __init__(self, path: str | Path, threads: int, optimized_to: str | Path | None = None):
        super().__init__()
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # unused-initializer warnings are noise here
        if optimized_to is not None:  # the graph as ORT runs it: which nodes it fused
            options.optimized_model_filepath = str(optimized_to)
        try:
            self.session = ort.InferenceSession(
                str(path), options, providers=["CPUExecutionProvider"]
            )
        except Exception as error:  # noqa: BLE001 - ORT raises its own types, one line is enough
            raise ExportError(f"onnxruntime cannot load {path}: {first_line(error)}") from None
        self.input_name = self.session.get_inputs()[0].name
        self.file = Path(path)
        self.precision = onnx_precision(path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        array = _as_input(x)
        return torch.from_numpy(self.session.run(None, {self.input_name: array})[0])


@functools.cache
def openvino_default_precision() -> str:
    """The inference precision OpenVINO's CPU plugin picks by default on this machine ("bf16"
    on CPUs with AVX-512 BF16 or AMX, else "f32")."""
    import openvino as ov

    return ov.Core().get_property("CPU", "INFERENCE_PRECISION_HINT").get_type_name()


class OpenVinoModel(nn.Module):
    """An OpenVINO CPU model compiled for latency (one stream) with ``threads`` threads.

    OpenVINO picks its own inference precision (bf16 for float models on CPUs with AMX or
    AVX-512 BF16); ``precision`` records what it chose, since top-1 is measured as it runs.
    ``activation_group``: the inputs per int8 scale of a 4-bit model's activations (None: the
    weights' group; 0: not quantized).
    """

    def __init__(
        self,
        path: str | Path,
        threads: int,
        precision: str | None = None,
        profile: bool = False,
        activation_group: int | None = None,
    ):
        super().__init__()
        import openvino as ov

        config = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1}
        if precision is not None:  # an FP16/BF16 model: OpenVINO's own half-precision path
            config["INFERENCE_PRECISION_HINT"] = precision
        if profile:  # per-node times in request.profiling_info (costs a little per call)
            config["PERF_COUNT"] = True
        try:
            core = ov.Core()
            graph = core.read_model(str(path))
            # OpenVINO quantizes a 4-bit-weight matmul's activations to int8 as it runs, in
            # groups of 32 inputs by default; groups as long as the weights' ran the GPT's
            # prefill faster (scripts/bench_lm.py: compress_int4_ov against int4_ov_group32).
            group = _weight_group(graph) if activation_group is None else activation_group
            if group is not None:
                config["DYNAMIC_QUANTIZATION_GROUP_SIZE"] = group
            compiled = core.compile_model(graph, "CPU", config)
        except Exception as error:  # noqa: BLE001 - OpenVINO raises RuntimeError with long text
            raise ExportError(f"openvino cannot compile {path}: {first_line(error)}") from None
        self.request = compiled.create_infer_request()
        self.file = Path(path)
        self.precision = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
        ops = graph.get_ops()
        codes = {
            o.get_element_type().get_type_name() for o in ops if o.get_type_name() == "Constant"
        }
        if any(op.get_type_name() == "FakeQuantize" for op in ops):
            self.precision = f"int8, the rest {self.precision}"
        elif codes & {"u4", "i4", "u8", "i8"}:  # a weight-only model's codes
            bits = 4 if codes & {"u4", "i4"} else 8
            per = f", int8 activations per {group} inputs" if group else ""
            self.precision = f"{self.precision} (int{bits} weights{per})"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Shared buffers: OpenVINO reads the input in place and the output is copied once
        # (~0.07 ms less per call than its default copies at batch 1).
        array = _as_input(x)
        result = self.request.infer({0: array}, share_inputs=True, share_outputs=True)
        return torch.from_numpy(next(iter(result.values())).copy())


def _as_input(x: torch.Tensor):
    """A batch as the runtimes take it: float32, or integer ids (a language model's) as they are."""
    x = x.detach().cpu()
    return (x.float() if x.dtype.is_floating_point else x).contiguous().numpy()


def _weight_group(graph) -> int | None:
    """The inputs per scale of a 4-bit weight-only model's codes in OpenVINO ``graph`` (the
    most common, where layers differ), or None without 4-bit codes. The graph dequantizes
    codes as (Reshape) → Convert → (Subtract zero points) → Multiply by scales; the group is
    the dimensions the scales broadcast over (ours are [in/group, group, out], NNCF's
    [out, in/group, group])."""
    groups: collections.Counter[int] = collections.Counter()
    for op in graph.get_ops():
        if op.get_type_name() != "Constant":
            continue
        if op.get_element_type().get_type_name() not in ("u4", "i4"):
            continue
        node, index = op, 0
        while node.get_type_name() != "Multiply":
            consumers = [  # the shape's reads aside: an ONNX file reshapes its blocks
                c
                for c in node.output(0).get_target_inputs()
                if c.get_node().get_type_name() != "ShapeOf"
            ]
            if len(consumers) != 1:
                break
            node, index = consumers[0].get_node(), consumers[0].get_index()
        else:
            codes, scales = (node.get_input_partial_shape(i) for i in (index, 1 - index))
            if not (codes.is_static and scales.is_static) or len(codes) != len(scales):
                continue
            group = math.prod(
                c for c, s in zip(codes.to_shape(), scales.to_shape(), strict=True) if s == 1
            )
            if group > 1:
                groups[group] += 1
    return groups.most_common(1)[0][0] if groups else None
