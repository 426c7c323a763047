"""Deployment: export a model to ONNX or OpenVINO IR, and run it in the runtime it ships to.

``export(model, path, format)`` writes the file a runtime loads; ``deployed(model,
runtime, ...)`` returns a module that runs the model in that runtime (ONNX Runtime,
OpenVINO, or PyTorch with inductor), so the shared evaluator measures every deployment
with the same code. onnx, onnxscript, onnxruntime and openvino are the optional extra
``compress[deploy]``; without them the evaluator measures PyTorch alone and says so.

INT8 graphs export as QuantizeLinear/DequantizeLinear (QDQ) around Conv/Gemm, the form
both runtimes fuse into integer kernels. ONNX Runtime fuses a Conv only when *every*
input comes from a DequantizeLinear, the bias included, so a float bias is stored as
int32 at scale ``input_scale * weight_scale`` (as ONNX Runtime's own quantizer does).
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import io
import logging
import os
import re
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from compress.errors import ExportError
from compress.traits import traits

# Where the evaluator can measure a model. ``torch``: the model as ``model(x)`` runs it
# (eager for float models; INT8 models compile themselves); ``inductor``: a float model
# through torch.compile with freezing, PyTorch's own best deployment on a CPU.
RUNTIMES = ("torch", "inductor", "onnxruntime", "openvino")
FORMATS = {"onnx": ".onnx", "openvino": ".xml"}
# Exported graphs take batches of 1..MAX_BATCH (the same bound as compress's INT8 graphs).
MAX_BATCH = 4096
_RUNTIME_PACKAGES = {
    "onnxruntime": ("onnx", "onnxscript", "onnxruntime"),
    "openvino": ("onnx", "onnxscript", "openvino"),
}


def available_runtimes() -> list[str]:
    """The runtimes whose packages are installed, in :data:`RUNTIMES` order."""
    return [
        r
        for r in RUNTIMES
        if all(importlib.util.find_spec(p) is not None for p in _RUNTIME_PACKAGES.get(r, ()))
    ]


def missing_runtimes() -> list[str]:
    """The runtimes of :data:`RUNTIMES` whose packages are not installed."""
    return [r for r in RUNTIMES if missing_packages(r)]


def missing_packages(runtime: str) -> list[str]:
    return [p for p in _RUNTIME_PACKAGES.get(runtime, ()) if importlib.util.find_spec(p) is None]


def export(
    model: nn.Module, path: str | Path, format: str = "onnx", example: torch.Tensor | None = None
) -> Path:
    """Write ``model`` as an ONNX file or an OpenVINO IR (``.xml`` + ``.bin``) at ``path``.

    ``example`` is one input batch (its shape fixes everything but the batch size, which
    stays dynamic). A path without the format's suffix (``.onnx``, ``.xml``) gets it; an
    existing file is never overwritten. Returns the path written.

    Example:
        >>> export(int8_model, "deploy/model.onnx", "onnx", data.example_input(1))
        >>> export(int8_model, "deploy/model.xml", "openvino", data.example_input(1))
    """
    if format not in FORMATS:
        raise ExportError(f"format {format!r} is not one of: {', '.join(FORMATS)}")
    runtime = "onnxruntime" if format == "onnx" else "openvino"
    missing = missing_packages(runtime)
    if missing:
        raise ExportError(
            f"exporting to {format} needs {', '.join(missing)}: pip install 'compress[deploy]'"
        )
    path = Path(path)
    if path.suffix != FORMATS[format]:
        path = path.with_suffix(FORMATS[format])
    if path.exists():
        raise ExportError(f"{path} already exists; compress never overwrites a file")
    if example is None:
        example = _example_from_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.stem}.export-") as tmp:
        onnx_file = Path(tmp) / "model.onnx"
        _export_onnx(model, onnx_file, example, format)
        if format == "onnx":
            os.replace(onnx_file, path)
        else:
            _convert_to_openvino(onnx_file, path)
    return path


def _convert_to_openvino(onnx_file: Path, xml: Path) -> None:
    """OpenVINO's own converter, ONNX → IR, written beside ``xml`` and renamed into place."""
    import openvino as ov

    with tempfile.TemporaryDirectory(dir=xml.parent, prefix=f".{xml.stem}.convert-") as tmp:
        staged = Path(tmp) / xml.name
        try:
            converted = ov.convert_model(str(onnx_file))
        except Exception as error:  # noqa: BLE001 - the converter's errors are long
            raise ExportError(
                f"openvino cannot convert {onnx_file}: {_first_line(error)}"
            ) from None
        ov.save_model(converted, str(staged), compress_to_fp16=False)
        # The .xml names its .bin; the .bin lands first so that a visible .xml is complete.
        os.replace(staged.with_suffix(".bin"), xml.with_suffix(".bin"))
        os.replace(staged, xml)


def deployed(
    model: nn.Module,
    runtime: str,
    threads: int,
    example: torch.Tensor,
    stem: str | Path | None = None,
) -> nn.Module:
    """``model`` as ``runtime`` runs it: a module taking and returning CPU tensors.

    For ONNX Runtime and OpenVINO the model is exported first, to ``<stem>.onnx`` or
    ``<stem>.xml`` (+ ``.bin``) when ``stem`` is given, else into a temporary folder; an
    existing ``<stem>.onnx`` is what OpenVINO converts. The module's ``file`` names what it
    runs. Raises :class:`ExportError` with one line when it cannot.

    Example:
        >>> ov_model = deployed(int8_model, "openvino", threads=2, example=x)
        >>> ov_model(x).argmax(1)
    """
    if runtime == "torch":
        return model
    if runtime == "inductor":
        return InductorModel(model)
    if runtime not in RUNTIMES:
        raise ExportError(f"runtime {runtime!r} is not one of: {', '.join(RUNTIMES)}")
    missing = missing_packages(runtime)
    if missing:
        raise ExportError(f"{runtime} is not installed ({', '.join(missing)} missing)")
    scratch = None
    if stem is None:  # removed with the returned module
        scratch = tempfile.TemporaryDirectory(prefix="compress-deploy-")
        stem = Path(scratch.name) / "model"
    stem = Path(stem)
    onnx_file = stem.parent / f"{stem.name}.onnx"
    precision = _OPENVINO_PRECISION.get(getattr(model, "dtype", None))
    if runtime == "onnxruntime":
        if getattr(model, "dtype", None) == torch.bfloat16:
            raise ExportError("onnxruntime's CPU kernels take no bfloat16 (OpenVINO's do)")
        if not onnx_file.exists():
            export(model, onnx_file, "onnx", example)
        module = OnnxRuntimeModel(onnx_file, threads)
    else:
        xml = stem.parent / f"{stem.name}.xml"
        if not xml.exists():
            if onnx_file.exists() and precision is None:
                _convert_to_openvino(onnx_file, xml)
            else:
                export(model, xml, "openvino", example)
        module = OpenVinoModel(xml, threads, precision)
    module.scratch = scratch
    return module


def deployed_files(path: Path) -> list[Path]:
    """The files a runtime reads for ``path`` (an OpenVINO IR is two)."""
    return [path, path.with_suffix(".bin")] if path.suffix == ".xml" else [path]


class InductorModel(nn.Module):
    """A float model through ``torch.compile`` with freezing (weights folded into constants
    and pre-packed for oneDNN), compiled once per input shape."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = copy.deepcopy(model).eval()
        self.compiled = torch.compile(self.model, dynamic=False)
        self._shapes: set[torch.Size] = set()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape in self._shapes:
            return self.compiled(x)
        with torch._inductor.config.patch(freezing=True), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = self.compiled(x)
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
            raise ExportError(f"onnxruntime cannot load {path}: {_first_line(error)}") from None
        self.input_name = self.session.get_inputs()[0].name
        self.file = Path(path)
        self.precision = _onnx_precision(path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        array = x.detach().cpu().float().contiguous().numpy()
        return torch.from_numpy(self.session.run(None, {self.input_name: array})[0])


class OpenVinoModel(nn.Module):
    """An OpenVINO CPU model compiled for latency (one stream) with ``threads`` threads.

    OpenVINO picks its own inference precision (bf16 for float models on CPUs with AMX or
    AVX-512 BF16); ``precision`` records what it chose, since top-1 is measured as it runs.
    """

    def __init__(
        self, path: str | Path, threads: int, precision: str | None = None, profile: bool = False
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
            compiled = core.compile_model(graph, "CPU", config)
        except Exception as error:  # noqa: BLE001 - OpenVINO raises RuntimeError with long text
            raise ExportError(f"openvino cannot compile {path}: {_first_line(error)}") from None
        self.request = compiled.create_infer_request()
        self.file = Path(path)
        self.precision = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
        if any(op.get_type_name() == "FakeQuantize" for op in graph.get_ops()):
            self.precision = f"int8, the rest {self.precision}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Shared buffers: OpenVINO reads the input in place and the output is copied once
        # (~0.07 ms less per call than its default copies at batch 1).
        array = x.detach().cpu().float().contiguous().numpy()
        result = self.request.infer({0: array}, share_inputs=True, share_outputs=True)
        return torch.from_numpy(next(iter(result.values())).copy())


# OpenVINO runs FP16/BF16 models as float32 IR with its own inference precision: its ONNX
# front end takes no bfloat16 graph, and its CPU plugin casts per layer as it sees fit.
_OPENVINO_PRECISION = {torch.float16: "f16", torch.bfloat16: "bf16"}


def _onnx_precision(path: str | Path) -> str:
    """What an ONNX file computes in: int8 (QDQ or dynamic), float16 or float32."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    ops = {n.op_type for n in graph.node}
    if ops & {"QuantizeLinear", "DynamicQuantizeLinear", "MatMulInteger"}:
        return "int8"
    if any(i.data_type == onnx.TensorProto.FLOAT16 for i in graph.initializer):
        return "float16"
    return "float32"


def _deployable_module(model: nn.Module, format: str) -> nn.Module:
    """What to export: a quantized model's converted graph (QDQ ops, int8 weights) rather
    than its compiled wrapper; for OpenVINO, a half-precision model's float32 original;
    any other model as it is."""
    if format == "openvino" and getattr(model, "dtype", None) in _OPENVINO_PRECISION:
        return copy.deepcopy(model.inner).float()
    about = traits(model)
    if about.compiled:
        return about.reference
    parametrized = [m for m in model.modules() if parametrize.is_parametrized(m)]
    if not parametrized:
        return model
    # Weight sharing keeps weights on a codebook through parametrizations; a deployed model
    # holds the weights they compute.
    model = copy.deepcopy(model)
    for module in model.modules():
        for name in list(getattr(module, "parametrizations", {})):
            parametrize.remove_parametrizations(module, name, leave_parametrized=True)
    return model


def _example_from_model(model: nn.Module) -> torch.Tensor:
    shape = getattr(model, "input_shape", None)
    if shape is None:
        raise ExportError(
            f"{type(model).__name__}: the input shape is unknown; pass an example input"
        )
    return torch.zeros(1, *shape)


def _export_onnx(model: nn.Module, path: Path, example: torch.Tensor, format: str) -> None:
    import onnx

    module = _deployable_module(model, format).cpu()
    example = example.cpu()
    if example.shape[0] == 1:  # a batch of 1 would be specialised to 1
        example = example.expand(2, *example.shape[1:]).contiguous()
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    # The exporter and its optimiser log every pass at INFO; a run's log keeps its own lines.
    quiet = [logging.getLogger(name) for name in ("torch.onnx", "onnxscript", "onnx_ir")]
    levels = [logger.level for logger in quiet]
    for logger in quiet:
        logger.setLevel(logging.ERROR)
    try:
        # The exporter prints its progress on stdout; a failure is one line from here on.
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                module,
                (example,),
                dynamo=True,
                input_names=["input"],
                output_names=["logits"],
                dynamic_shapes=({0: batch},),
                external_data=False,
                verbose=False,
                report=False,
                custom_translation_table=_dynamic_quantization_translations(),
            )
    except Exception as error:  # noqa: BLE001 - the exporter's errors are many and long
        raise ExportError(
            f"{type(model).__name__} does not export to ONNX: {_first_line(error)}"
        ) from None
    finally:
        for logger, level in zip(quiet, levels, strict=True):
            logger.setLevel(level)
    proto = program.model_proto  # a new copy at each access: edit this one
    _dynamic_matmuls(proto)
    quantize_biases(proto)
    onnx.save_model(proto, str(path))


def _dynamic_quantization_translations() -> dict:
    """ONNX for the ops of a dynamic INT8 graph, which the exporter has no translation for:
    torchao's ``choose_qparams`` (the scale and zero point of a tensor, at run time) is
    ONNX's DynamicQuantizeLinear, whose quantized output :func:`_dynamic_matmuls` then uses.
    """
    from onnxscript import opset18 as op

    def choose_qparams(x, quant_min, quant_max, eps, dtype):
        _, scale, zero_point = op.DynamicQuantizeLinear(x)
        return scale, zero_point

    def quantize(x, scale, zero_point, quant_min, quant_max, dtype):
        return op.QuantizeLinear(x, scale, zero_point)

    def dequantize(x, scale, zero_point, quant_min, quant_max, dtype, out_dtype=None):
        return op.DequantizeLinear(x, scale, zero_point)

    ops = torch.ops.quantized_decomposed
    if not hasattr(ops, "choose_qparams"):
        # Registered when torchao's PT2E flow is imported; a process that only loads and
        # exports a float model has none of these ops in its graphs.
        return {}
    return {
        ops.choose_qparams.tensor: choose_qparams,
        ops.quantize_per_tensor.tensor: quantize,
        ops.dequantize_per_tensor.tensor: dequantize,
    }


def _dynamic_matmuls(model) -> int:
    """Rewrite ``DynamicQuantizeLinear → DQ → Gemm(DQ(int8 weight))`` as ONNX's dynamic
    INT8 form, ``MatMulInteger`` then a float rescale (and bias), which ONNX Runtime fuses
    into one DynamicQuantizeMatMul kernel; returns how many Linear layers it rewrote.

    The exporter types the run-time scale and zero point as torch has them (float64,
    int64); ONNX's are float32 and uint8, so those declarations are dropped.
    """
    from onnx import helper, numpy_helper

    graph = model.graph
    dynamic = {n.output[1]: n for n in graph.node if n.op_type == "DynamicQuantizeLinear"}
    if not dynamic:
        return 0
    runtime_values = {o for n in dynamic.values() for o in n.output}
    for info in [v for v in graph.value_info if v.name in runtime_values]:
        graph.value_info.remove(info)
    values = {i.name: i for i in graph.initializer}
    producer = {out: n for n in graph.node for out in n.output}
    rewritten, replacement = 0, {}
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        plain = (
            attrs.get("transA", 0) == 0 and attrs.get("alpha", 1.0) == attrs.get("beta", 1.0) == 1.0
        )
        if node.op_type != "Gemm" or not plain:
            continue
        x, w = producer.get(node.input[0]), producer.get(node.input[1])
        if not (x and w and x.op_type == w.op_type == "DequantizeLinear"):
            continue
        source = dynamic.get(x.input[1])
        if source is None or w.input[0] not in values or w.input[1] not in values:
            continue
        weight = numpy_helper.to_array(values[w.input[0]])
        weight = weight.T if attrs.get("transB", 0) else weight  # K x N for MatMulInteger
        name = node.name or node.output[0]
        w_scale = numpy_helper.to_array(values[w.input[1]]).astype(np.float32).reshape(-1)
        graph.initializer.extend(
            [
                numpy_helper.from_array(np.ascontiguousarray(weight), f"{name}_weight_kn"),
                numpy_helper.from_array(
                    np.zeros(weight.shape[1], dtype=weight.dtype), f"{name}_weight_zero_point"
                ),
                numpy_helper.from_array(w_scale, f"{name}_weight_scale"),
            ]
        )
        out = node.output[0]
        nodes = [
            helper.make_node(
                "MatMulInteger",
                [
                    source.output[0],
                    f"{name}_weight_kn",
                    source.output[2],
                    f"{name}_weight_zero_point",
                ],
                [f"{name}_int32"],
            ),
            helper.make_node("Cast", [f"{name}_int32"], [f"{name}_float"], to=1),
            helper.make_node("Mul", [source.output[1], f"{name}_weight_scale"], [f"{name}_scale"]),
            helper.make_node(
                "Mul",
                [f"{name}_float", f"{name}_scale"],
                [f"{name}_scaled" if len(node.input) > 2 and node.input[2] else out],
            ),
        ]
        if len(node.input) > 2 and node.input[2]:
            nodes.append(helper.make_node("Add", [f"{name}_scaled", node.input[2]], [out]))
        replacement[id(node)] = nodes
        rewritten += 1
    if rewritten:
        ordered = []
        for node in graph.node:
            ordered += replacement.get(id(node), [node])
        del graph.node[:]
        graph.node.extend(ordered)
        _drop_dead_nodes(graph)
    return rewritten


def _drop_dead_nodes(graph) -> None:
    """Remove nodes and initializers nothing reads (the float paths a rewrite replaced)."""
    outputs = {o.name for o in graph.output}
    while True:
        used = outputs | {name for n in graph.node for name in n.input}
        dead = [n for n in graph.node if not any(o in used for o in n.output)]
        if not dead:
            break
        for node in dead:
            graph.node.remove(node)
    used = {name for n in graph.node for name in n.input}
    for initializer in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(initializer)


def quantize_biases(model) -> int:
    """Give every Conv/Gemm whose input and weight are dequantized an int32 bias behind a
    DequantizeLinear (scale = input scale x weight scale, zero point 0); returns how many.

    ONNX Runtime's QDQ selector fuses DQ → Conv → Q into QLinearConv only when all inputs
    are dequantized; a float bias leaves the Conv in float. int32 at that scale is exact to
    within half a quantization step of the accumulator, as in ONNX Runtime's own quantizer.
    """
    from onnx import helper, numpy_helper

    graph = model.graph
    values = {i.name: i for i in graph.initializer}
    constants = {
        n.output[0]: n.attribute[0].t
        for n in graph.node
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"
    }

    def constant(name: str) -> np.ndarray | None:
        tensor = values.get(name) or constants.get(name)
        return None if tensor is None else numpy_helper.to_array(tensor)

    producer = {out: n for n in graph.node for out in n.output}
    added = []
    for node in graph.node:
        if node.op_type not in ("Conv", "Gemm") or len(node.input) < 3 or not node.input[2]:
            continue
        x, w = producer.get(node.input[0]), producer.get(node.input[1])
        if not (x and w and x.op_type == w.op_type == "DequantizeLinear"):
            continue
        if node.op_type == "Gemm" and any(
            a.name == "transB" and a.i == 0 for a in node.attribute
        ):  # the weight's scales would run along the wrong axis
            continue
        bias, x_scale, w_scale = (
            constant(node.input[2]),
            constant(x.input[1]),
            constant(w.input[1]),
        )
        if bias is None or x_scale is None or w_scale is None or x_scale.size != 1:
            continue
        scale = (float(x_scale.reshape(())) * w_scale.astype(np.float64)).reshape(-1)
        scale = np.broadcast_to(scale, bias.shape).astype(np.float32)
        codes = np.clip(np.round(bias / scale), -(2**31), 2**31 - 1).astype(np.int32)
        name = f"{node.input[2]}_int32"
        graph.initializer.extend(
            [
                numpy_helper.from_array(codes, name),
                numpy_helper.from_array(scale, f"{name}_scale"),
                numpy_helper.from_array(np.zeros_like(codes), f"{name}_zero_point"),
            ]
        )
        added.append(
            helper.make_node(
                "DequantizeLinear",
                [name, f"{name}_scale", f"{name}_zero_point"],
                [f"{name}_dequantized"],
                axis=0,
            )
        )
        node.input[2] = f"{name}_dequantized"
    if added:  # nodes are topologically sorted: the new ones read initializers only
        nodes = added + list(graph.node)
        del graph.node[:]
        graph.node.extend(nodes)
        _drop_dead_nodes(graph)  # the float biases, now stored as int32
    return len(added)


def _first_line(error: BaseException) -> str:
    """The most telling line of a long error: its root cause's first, without colours."""
    while error.__cause__ is not None:
        error = error.__cause__
    for line in re.sub(r"\x1b\[[0-9;]*m", "", str(error)).splitlines():
        if line.strip() and not line.startswith(("Traceback", "[torch.onnx]")):
            return line.strip()[:300]
    return type(error).__name__
