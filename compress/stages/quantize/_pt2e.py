"""INT8 on torchao's PT2E path: static (post-training), dynamic and quantization-aware.

Flow: ``torch.export`` (batch dimension dynamic) → ``prepare_pt2e`` with
``X86InductorQuantizer`` → calibration on the calibration split → ``convert_pt2e`` →
``torch.compile`` with inductor freezing, which lowers the quantize/dequantize patterns
to oneDNN INT8 kernels. The uncompiled converted graph is kept as ``reference_module``:
it computes the same numbers with fake-quant ops, and the evaluator counts FLOPs on it.

Over 400 lines because static, dynamic and QAT are one flow (export, prepare, calibrate or
train, convert, lower) with their shared fallback for what does not trace; each method is a
few lines of it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import operator
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import cast

import torch
from torch import nn
from torch._dynamo.utils import counters
from torch.utils._python_dispatch import _get_current_dispatch_mode
from torchao.quantization.pt2e import (
    HistogramObserver,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    PerChannelMinMaxObserver,
    allow_exported_model_train_eval,
    qat_utils,
)
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e, prepare_qat_pt2e
from torchao.quantization.pt2e.quantizer import QuantizationSpec

# Importing torchao's x86 quantizer also registers inductor's INT8 lowering passes: without
# it a model loaded from disk in a fresh process would compile to fake-quant.
from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq
from tqdm import tqdm

from compress.core import distributed
from compress.core.errors import QuantizationError
from compress.core.modules import compile_module, matching_modules
from compress.core.registry import StageContext
from compress.data import Data
from compress.measure.counts import count_params
from compress.models.artifact import (
    MAX_BATCH,
    graph_file,
    graph_input,
    load_graph,
    manifest_counts,
    save_graph,
)
from compress.stages.quantize._bias import BiasCorrection
from compress.stages.quantize._config import QuantizeConfig
from compress.training.train import train

# Exported graphs accept batches of 1..MAX_BATCH images. The compiled model is built per
# power-of-two batch bucket (static shapes are what the INT8 lowering handles), so a batch
# of 250 runs in the 256 bucket and at most log2(MAX_BATCH) + 1 kernels are compiled.
# inductor's C++ wrapper calls the kernels without Python in between: ~10 % lower latency
# for resnet18 at batch 1 (2.9 vs 3.2 ms), for ~7 s more compile time per batch size (a
# tiny CNN compiles in 2.3 s without it, 9.5 s with it). COMPRESS_CPP_WRAPPER=0 trades the
# latency for the compile time, e.g. in the test suite, whose assertions do not time.
CPP_WRAPPER_VARIABLE = "COMPRESS_CPP_WRAPPER"


def _cpp_wrapper() -> bool:
    return os.environ.get(CPP_WRAPPER_VARIABLE, "1") != "0"


class QuantizedModel(nn.Module):
    """A converted PT2E graph, run through inductor's INT8 lowering.

    ``reference_module`` is the converted graph (quantize/dequantize ops around float
    convolutions): exact, portable and slow. ``forward`` runs the compiled form; if
    compilation is unavailable it falls back to the reference and says so in ``notes``.
    """

    compute_dtype = "int8"
    element_bytes: int | None = 1  # int8 weights and activations; None: dynamic (float ones)
    cpu_only = True  # oneDNN INT8 kernels: the evaluator feeds it CPU tensors
    compiles_itself = True  # forward runs inductor already: no separate "inductor" runtime

    def __init__(
        self,
        reference: nn.Module,
        param_counts: tuple[int, int],
        notes: list[str] | None = None,
        compile: bool = True,
        dynamic: bool = False,
    ):
        super().__init__()
        self.training = False  # inference-only, from the start
        if dynamic:  # float activations between the INT8 Linear layers
            self.element_bytes = None
            self.compute_dtype = "int8 (dynamic)"
        self.reference_module = reference
        self.param_counts = tuple(param_counts)
        self.notes = list(notes or [])
        self._compile = compile
        self._compiled: Callable[[torch.Tensor], torch.Tensor] | None = None
        self._shapes_compiled: set[torch.Size] = set()
        self.int8_kernels: int | None = None  # INT8 ops inductor lowered at the last new shape

    def save_artifact(self, folder: Path, example: torch.Tensor | None) -> dict:
        graph = cast(torch.fx.GraphModule, self.reference_module)
        if example is None:  # the graph remembers its input's shape and dtype
            example = _zeros_input(graph)
        return {
            "kind": "quantized",
            "file": save_graph(graph, folder, example),
            "param_counts": list(self.param_counts),
            "notes": self.notes,
            "dynamic": self.element_bytes is None,
        }

    def train(self, mode: bool = True) -> QuantizedModel:
        # Exported graphs refuse train()/eval(); a converted INT8 graph is inference-only.
        if mode:
            raise QuantizationError(
                "a converted INT8 model cannot be trained; fine-tune before"
                " quantizing, or use quantization-aware training"
            )
        self.training = False
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _get_current_dispatch_mode() is not None:
            # A counting mode (FLOPs, memory access) sees no ops inside compiled kernels:
            # show it the reference graph, which computes the same thing op by op.
            return self.reference_module(x)
        n = x.shape[0]
        if n > MAX_BATCH:  # split very large batches rather than fail
            return torch.cat([self(chunk) for chunk in x.split(MAX_BATCH)])
        bucket = 1 << (n - 1).bit_length()
        if bucket != n:
            x = torch.cat([x, x.new_zeros(bucket - n, *x.shape[1:])])
        return _first_rows(self._run(x), n)

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        if not self._compile:
            return self.reference_module(x)
        compiled = self._compiled
        if compiled is None:
            compiled = self._compiled = compile_module(self.reference_module)
        if x.shape in self._shapes_compiled:
            return compiled(x)  # compiled already: no config patch on the hot path
        before = _int8_lowerings()
        try:
            # Freezing turns the int8 weights into constants so that inductor can pre-pack
            # them for oneDNN; without it the graph stays fake-quant and gains nothing.
            with (
                torch._inductor.config.patch(freezing=True, cpp_wrapper=_cpp_wrapper()),
                warnings.catch_warnings(),
            ):
                warnings.simplefilter("ignore")
                out = compiled(x)
        except Exception as error:  # noqa: BLE001 - any compiler failure: run the reference
            self._compile = False
            reason = (
                str(error).strip().splitlines()[0][:200]
                if str(error).strip()
                else type(error).__name__
            )
            self.notes.append(
                "INT8 kernels unavailable (torch.compile failed: "
                f"{reason}); ran the fake-quant reference graph, which is not faster"
            )
            return self.reference_module(x)
        self._shapes_compiled.add(x.shape)
        self.int8_kernels = _int8_lowerings() - before
        if self.int8_kernels == 0 and not any("no INT8 kernel" in n for n in self.notes):
            self.notes.append(
                "inductor lowered no INT8 kernel: the model runs fake-quant"
                " (quantize/dequantize around float ops) and is not faster"
            )
        return out


def quantize_graph(
    model: nn.Module,
    exported: torch.fx.GraphModule,
    calibration,
    config: QuantizeConfig,
    mode: str,
    data: Data | None = None,
    context: StageContext | None = None,
) -> QuantizedModel:
    """prepare → calibrate (or QAT-train on ``data``) → convert one exported graph of ``model``.

    ``calibration`` yields input batches; ``config.skip`` names modules of ``model``.
    """
    param_counts = count_params(model)
    quantizer = DeployableX86Quantizer()
    if mode == "dynamic":
        # Dynamic quantization pays off for Linear (and recurrent) layers only.
        quantizer.set_module_type_qconfig(nn.Linear, quantization_config(config, mode))
    else:
        quantizer.set_global(quantization_config(config, mode))
    skipped = matching_modules(model, config.skip, key="quantize.skip")
    for name in skipped:
        quantizer.set_module_name_qconfig(name, None)
    with warnings.catch_warnings():
        # "The input of maxpool2d is not quantized, skip annotate": expected for skipped layers.
        warnings.filterwarnings("ignore", message="The input of .* is not quantized")
        with _only_present_convs(exported):
            prepared = (prepare_qat_pt2e if mode == "qat" else prepare_pt2e)(exported, quantizer)
    if mode == "qat":
        assert data is not None, "QAT trains on the data"
        allow_exported_model_train_eval(prepared)  # the shared loop calls .train()/.eval()
        train(prepared, data, config.fine_tune, desc="qat", context=context)
    else:
        batches = 1 if mode == "dynamic" else config.calibration_batches
        calibrate(prepared, calibration, batches, mode == "static" and config.bias_correction)
    with _only_present_convs(prepared):
        converted = convert_pt2e(prepared)
    _drop_unused_tensors(converted)
    notes = [f"kept in float: {', '.join(skipped)}"] if skipped else []
    if mode == "dynamic" and any(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules()):
        notes.append("dynamic INT8 quantizes Linear layers only; convolutions stay float")
    return QuantizedModel(converted, param_counts, notes, dynamic=mode == "dynamic")


@contextlib.contextmanager
def _only_present_convs(graph_module: torch.fx.GraphModule):
    """QAT's preparation fuses, and its conversion folds, BatchNorm into convolutions by
    matching torchao's conv-BN patterns for conv1d, conv2d and both transposed
    convolutions, exporting 3 (prepare) and 24 (convert) small graphs per kind whether or
    not the model has one. Skip the kinds the graph has no node of: the same nodes match
    (the same graph and outputs, checked on tiny_cnn and resnet18), and a QAT quantize with
    3 training steps takes 9-12 s instead of 30 s (tiny_cnn) and 14-16 s instead of 31 s
    (resnet18) on 2 cores. Without torchao's helpers (a newer torchao), the flow runs as
    it comes."""
    present = {
        str(node.target).split(".")[1]
        for node in graph_module.graph.nodes
        if node.op == "call_function" and str(node.target).startswith("aten.conv")
    }
    helpers = {name: getattr(qat_utils, name, None) for name in _PER_CONV_KIND_HELPERS}
    for name, helper in helpers.items():
        if helper is not None:
            setattr(qat_utils, name, _present_kinds_only(helper, present))
    try:
        yield
    finally:
        for name, helper in helpers.items():
            if helper is not None:
                setattr(qat_utils, name, helper)


def _present_kinds_only(helper, present: set[str]):
    def skip_absent_kinds(model, conv_fn, *args, **kwargs):
        if getattr(conv_fn, "__name__", None) in _CONV_KINDS - present:
            return model
        return helper(model, conv_fn, *args, **kwargs)

    return skip_absent_kinds


_CONV_KINDS = {"conv1d", "conv2d", "conv_transpose1d", "conv_transpose2d"}
_PER_CONV_KIND_HELPERS = ("_fuse_conv_bn_qat_helper", "_fold_conv_bn_qat_helper")


class DeployableX86Quantizer(xiq.X86InductorQuantizer):
    """torchao's X86 quantizer, plus quantized inputs on both sides of a residual add,
    squeeze-excitation gates left in float, and no requantizing after a concatenation that
    only float ops read.

    For ``conv → add`` torchao leaves the convolution's output in float, because inductor
    fuses the add into the INT8 convolution. ONNX Runtime and OpenVINO fuse only what sits
    between DequantizeLinear and QuantizeLinear, so with a float input the convolution
    and the add run in float there. Observing that input too (as ONNX Runtime's and NNCF's
    own quantizers do) gives one graph that every runtime runs in INT8.

    A squeeze-excitation gate (``x * gate(pool(x))``) works on a pooled vector: INT8 saves
    nothing there, and quantizing the pool's input makes OpenVINO convert ``x`` from the
    bf16 layout its convolution wrote to the f32 one its quantizer reads, once per block
    (mobilenet_v3_small at 224 in OpenVINO: 1.28x its float model's time; gates float,
    0.84-0.99x, 0.81-1.08x NNCF's INT8; efficientnet_b0 1.17x NNCF's -> 0.87-0.93x).
    Quantizing ``x`` once for both the pool and the product (NNCF's placement) measured
    the same within the noise, and a float gate keeps its precision.

    torchao quantizes a concatenation's output with its inputs' scale. Where only float
    ops read it (DenseNet's ``cat → BatchNorm → ReLU → conv``), that quantizer made
    OpenVINO requantize every feature once per concatenation reading it (649 runtime
    quantizers for NNCF's 62): densenet121's INT8 ran 2.6-2.8x NNCF's time at 64 px, and
    0.86-0.93x without it. A view or a channel shuffle after it keeps it (ShuffleNet).
    """

    def annotate(self, model: torch.fx.GraphModule) -> torch.fx.GraphModule:
        xiq._annotate_nodes_not_quantize(list(_excitation_gates(model.graph)))
        model = super().annotate(model)
        adds = (torch.ops.aten.add.Tensor, torch.ops.aten.add_.Tensor)
        for node in model.graph.nodes:
            annotation = node.meta.get("quantization_annotation")
            if node.target not in adds or annotation is None or not annotation.input_qspec_map:
                continue
            spec = next(iter(annotation.input_qspec_map.values()))
            for arg in node.args[:2]:
                if isinstance(arg, torch.fx.Node) and arg not in annotation.input_qspec_map:
                    annotation.input_qspec_map[arg] = spec
        _unread_outputs_float(model.graph)
        return model


def _unread_outputs_float(graph: torch.fx.Graph) -> None:
    """No quantizer on the output of an INT8-in-INT8-out op (a concatenation, a pool) whose
    consumers all compute in float: none reads it quantized, none only moves it."""
    for node in graph.nodes:
        annotation = node.meta.get("quantization_annotation")
        if node.target not in xiq.int8_in_int8_out_ops or annotation is None:
            continue
        if annotation.output_qspec is None:
            continue
        kept = [
            user
            for user in node.users
            if node in getattr(user.meta.get("quantization_annotation"), "input_qspec_map", {})
            or _moves_data(user)
        ]
        if not kept:
            annotation.output_qspec = None


_DATA_MOVES = {
    "view", "_unsafe_view", "reshape", "transpose", "permute", "split", "split_with_sizes",
    "chunk", "flatten", "slice", "narrow", "select", "unsqueeze", "squeeze", "expand",
    "contiguous", "clone", "pixel_shuffle", "pixel_unshuffle", "channel_shuffle",
    "native_channel_shuffle",
}  # fmt: skip


def _moves_data(node: torch.fx.Node) -> bool:
    """A view, a reshuffle or a split: runtimes carry INT8 through it unchanged."""
    if node.target is operator.getitem:
        return True
    packet = getattr(node.target, "overloadpacket", None)
    return packet is not None and packet.__name__ in _DATA_MOVES


_POOLS = (torch.ops.aten.adaptive_avg_pool2d.default, torch.ops.aten.mean.dim)
_MULS = (torch.ops.aten.mul.Tensor, torch.ops.aten.mul_.Tensor)
_GATE_DEPTH = 8  # pool → conv/linear → activation → conv/linear → sigmoid, with views between


def _excitation_gates(graph: torch.fx.Graph) -> set[torch.fx.Node]:
    """The nodes of every squeeze-excitation gate: ``mul(x, g)`` where ``g`` comes, through
    a chain of first arguments, from a global pool of ``x`` (the pool included)."""
    gates: set[torch.fx.Node] = set()
    for node in graph.nodes:
        if node.op != "call_function" or node.target not in _MULS or len(node.args) != 2:
            continue
        for source, gate in (node.args, node.args[::-1]):
            chain = []
            while isinstance(gate, torch.fx.Node) and gate.op == "call_function":
                chain.append(gate)
                if gate.target in _POOLS and gate.args[0] is source:
                    gates.update(chain)
                    break
                if len(chain) == _GATE_DEPTH or not gate.args:
                    break
                gate = gate.args[0]
    return gates


def quantization_config(config: QuantizeConfig, mode: str):
    """torchao's x86 QuantizationConfig with the recipe's observer, symmetry and granularity.

    Weights always use per-channel symmetric int8, the form inductor lowers to oneDNN
    kernels; ``per_channel: false`` gives every channel the same (per-tensor) scale, so the
    numbers are per-tensor and the kernels stay fast.
    """
    reduce_range = not _has_vnni()
    default = xiq.get_default_x86_inductor_quantization_config(
        is_qat=mode == "qat", is_dynamic=mode == "dynamic", reduce_range=reduce_range
    )
    if mode != "static":
        return default  # dynamic and QAT: torchao's own observers / fake-quant
    observers = {
        "minmax": MinMaxObserver,
        "moving_average": MovingAverageMinMaxObserver,
        "histogram": HistogramObserver,
        "percentile": PercentileObserver,
    }
    extra = {"eps": 2**-12}  # torchao's x86 default: keeps scales away from 0
    observer_args = {"percentile": config.percentile} if config.observer == "percentile" else {}
    activation = QuantizationSpec(
        dtype=torch.uint8,
        quant_min=0,
        quant_max=127 if reduce_range else 255,
        qscheme=torch.per_tensor_symmetric if config.symmetric else torch.per_tensor_affine,
        is_dynamic=False,
        observer_or_fake_quant_ctr=observers[config.observer].with_args(**extra, **observer_args),
    )
    weight_observer = PerChannelMinMaxObserver if config.per_channel else SharedScaleObserver
    weight = dataclasses.replace(
        default.weight, observer_or_fake_quant_ctr=weight_observer.with_args(**extra)
    )
    return dataclasses.replace(
        default, input_activation=activation, output_activation=activation, weight=weight
    )


class PercentileObserver(MinMaxObserver):
    """Activation range from the (100 - p)-th to the p-th percentile (clips rare outliers).

    The range is the mean over calibration batches of each batch's low and high
    percentile; at most 2^20 values of a batch are looked at (strided sample).
    """

    def __init__(self, percentile: float = 99.99, **kwargs):
        super().__init__(**kwargs)
        self.percentile = percentile
        self.register_buffer("batches", torch.tensor(0))

    def forward(self, x_orig):
        if x_orig.numel() == 0:
            return x_orig
        x = x_orig.detach().float().flatten()
        x = x[:: max(1, x.numel() >> 20)]
        q = torch.tensor([1 - self.percentile / 100, self.percentile / 100])
        low, high = torch.quantile(x, q)
        n = self.batches.item()
        self.min_val = ((self.min_val * n + low) / (n + 1)) if n else low.clone()
        self.max_val = ((self.max_val * n + high) / (n + 1)) if n else high.clone()
        self.batches += 1
        return x_orig


class SharedScaleObserver(PerChannelMinMaxObserver):
    """Per-tensor weight numerics in per-channel form: every channel gets the widest range."""

    def forward(self, x_orig):
        out = super().forward(x_orig)
        self.min_val.fill_(self.min_val.min().item())
        self.max_val.fill_(self.max_val.max().item())
        return out


def load_quantized(folder: Path, manifest: dict, trust) -> QuantizedModel:
    graph = load_graph(graph_file(folder, manifest))
    return QuantizedModel(
        graph,
        manifest_counts(folder, manifest),
        [str(note) for note in manifest.get("notes", [])],
        dynamic=manifest.get("dynamic") is True,
    )


def _zeros_input(graph: torch.fx.GraphModule) -> torch.Tensor:
    """A batch of two zero inputs of the graph's shape and dtype (recorded when it was
    loaded, else traced by export): token id 0 for a language model, which takes integers."""
    found = graph_input(graph)
    assert found is not None, "an exported or loaded graph knows its input"
    shape, dtype = found
    return torch.zeros(2, *shape, dtype=dtype)


def export_model(model: nn.Module, example: torch.Tensor) -> torch.fx.GraphModule:
    """``torch.export`` with a dynamic batch dimension; a clear error when it cannot trace.

    The example batch has 2 images: an exported batch of 1 would be specialised to 1.
    """
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    try:
        # strict=True: the X86 quantizer matches conv/linear patterns by the source
        # partitions that strict (dynamo) tracing records.
        exported = torch.export.export(model, (example,), dynamic_shapes=({0: batch},), strict=True)
        return cast(torch.fx.GraphModule, exported.module())
    except Exception as error:  # noqa: BLE001 - report the first line, not a stack trace
        first = next(
            (line for line in str(error).splitlines() if line.strip()), type(error).__name__
        )
        raise QuantizationError(
            f"torch.export could not trace {type(model).__name__}: {first[:300]}"
        ) from None


def calibrate(prepared: nn.Module, calibration, batches: int, correct_bias: bool = False) -> None:
    """Run the first ``batches`` input batches of ``calibration`` through the observers;
    with ``correct_bias``, then shift each INT8 layer's bias by its weights' mean error.

    Under torchrun rank 0 calibrates and the observed ranges are broadcast, so every rank
    converts the same model.
    """
    if not distributed.is_main():
        distributed.broadcast_state(prepared)
        return
    observe = BiasCorrection(cast(torch.fx.GraphModule, prepared)) if correct_bias else prepared
    with torch.no_grad():
        for i, images in enumerate(
            tqdm(
                calibration,
                total=batches,
                desc="calibrate",
                unit="batch",
                leave=False,
                disable=None,
            )
        ):
            if i >= batches:
                break
            # A part's batch can exceed what the graph takes (a detector's box head sees
            # every proposal of every image): its rows are observed a chunk at a time.
            large = isinstance(images, torch.Tensor) and images.shape[0] > MAX_BATCH
            for chunk in images.split(MAX_BATCH) if large else [images]:
                observe(chunk)
    if isinstance(observe, BiasCorrection):
        observe.apply()
    distributed.broadcast_state(prepared)


def _int8_lowerings() -> int:
    """How many quantized ops (qconv, qlinear, ...) inductor has lowered to INT8 kernels so far."""
    return sum(
        v
        for k, v in counters["inductor"].items()
        if k.startswith("q") and k.endswith("_lower_count")
    )


def _has_vnni() -> bool:
    """Whether the CPU has VNNI int8 dot products.

    Without VNNI, uint8 x int8 products can saturate 16-bit intermediates, so activations
    must use 7 bits (``reduce_range``), as torchao's X86 quantizer recommends.
    """
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return True  # not Linux: assume a current CPU
    return any(flag in flags for flag in ("avx512_vnni", "avx_vnni", "amx_int8"))


def _drop_unused_tensors(graph_module: torch.fx.GraphModule) -> None:
    """Delete the float weights that conversion replaced with int8 constants.

    They are no longer read by the graph, but ``torch.export`` would still save them,
    making the "quantized" artifact larger than the float one.
    """
    used = {node.target for node in graph_module.graph.nodes if node.op == "get_attr"}
    for name, _ in [*graph_module.named_parameters(), *graph_module.named_buffers()]:
        if name not in used:
            owner_name, _, attr = name.rpartition(".")
            owner = graph_module.get_submodule(owner_name) if owner_name else graph_module
            delattr(owner, attr)


def _first_rows(output, n: int):
    """The first ``n`` rows of an output padded to its batch bucket: a tensor, or the
    tensors of a dict, list or tuple (a detector's backbone gives a dict of feature maps)."""
    if isinstance(output, torch.Tensor):
        return output[:n]
    if isinstance(output, dict):
        return type(output)((k, _first_rows(v, n)) for k, v in output.items())
    if isinstance(output, (list, tuple)):
        return type(output)(_first_rows(v, n) for v in output)
    return output
