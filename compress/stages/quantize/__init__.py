"""The quantize stage: INT8 static/dynamic/QAT (torchao PT2E), FP16/BF16, INT4/INT8 weights.

``quantize(model, data, method=...)`` dispatches on the method; with
``max_accuracy_drop`` it falls back layer by layer to float until the target is met.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from compress.core.errors import QuantizationError
from compress.core.registry import StageContext, register_stage
from compress.core.traits import add_note, traits
from compress.data import Data
from compress.measure.decode import has_decoder
from compress.models.artifact import MAX_BATCH, register_loader
from compress.spec.recipe import parse_stage_options
from compress.stages.quantize._cast import LowPrecisionModel, cast
from compress.stages.quantize._config import (
    FALLBACK_METHODS,
    INT8_METHODS,
    QAT_TRAINING,
    QuantizeConfig,
)
from compress.stages.quantize._per_token import PerTokenInt8Model, per_token_int8
from compress.stages.quantize._sensitivity import (
    QuantizeFn,
    layer_sensitivity,
    quantize_with_fallback,
)
from compress.stages.quantize._smooth import smooth
from compress.stages.quantize._speed import float_where_slower, only_if_faster
from compress.stages.quantize._weight_only import WeightOnlyModel, weight_only

__all__ = [
    "FALLBACK_METHODS",
    "INT8_METHODS",
    "MAX_BATCH",
    "QAT_TRAINING",
    "QUANTIZE_METHODS",
    "LowPrecisionModel",
    "PartlyQuantizedModel",
    "PerTokenInt8Model",
    "QuantizationError",
    "QuantizeConfig",
    "QuantizedModel",
    "WeightOnlyModel",
    "layer_sensitivity",
    "quantize",
    "sensitivity",
]


# torchao's PT2E flow and x86 quantizer take ~3 s to import (they import dynamo and
# inductor): the INT8 modules load when an INT8 model is made or loaded, so that a command
# that never touches one (`--help`, a prune or distill run, `compare`) starts in half the
# time (importing compress.workflow.cli: 5.0 s instead of 10.3 s on 2 cores).
def __getattr__(name: str):
    if name == "QuantizedModel":
        from compress.stages.quantize._pt2e import QuantizedModel

        return QuantizedModel
    if name == "PartlyQuantizedModel":
        from compress.stages.quantize._parts import PartlyQuantizedModel

        return PartlyQuantizedModel
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@register_loader("quantized")
def _load_quantized(folder: Path, manifest: dict, trust) -> nn.Module:
    from compress.stages.quantize._pt2e import load_quantized

    return load_quantized(folder, manifest, trust)


@register_loader("partly_quantized")
def _load_partly_quantized(folder: Path, manifest: dict, trust) -> nn.Module:
    from compress.stages.quantize._parts import load_partly_quantized

    return load_partly_quantized(folder, manifest, trust)


# Not named _pt2e: importing the submodule compress.quantize._pt2e binds that name here.
def _int8_pt2e(
    model: nn.Module,
    data: Data,
    config: QuantizeConfig,
    context: StageContext | None = None,
    *,
    mode: str,
    exported: torch.fx.GraphModule | None = None,
) -> nn.Module:
    """INT8 through torchao's PT2E flow: the whole graph, or its parts that export.

    ``exported``: ``model``'s graph exported already (a copy of it is quantized).
    """
    if mode == "dynamic" and _per_token(model, data):  # no graph: dynamo and inductor unneeded
        return per_token_int8(model, data, config, context)
    from compress.stages.quantize._parts import quantize_parts
    from compress.stages.quantize._pt2e import export_model, quantize_graph

    model = copy.deepcopy(model).cpu().eval()  # X86InductorQuantizer targets x86 CPUs
    if exported is not None:
        exported = copy.deepcopy(exported)  # prepare_pt2e rewrites the graph it is given
    else:
        try:
            exported = export_model(model, data.example_input(2))
        except QuantizationError as error:
            if mode == "qat":
                raise  # QAT trains the whole graph: there is no partial form of it
            return quantize_parts(model, data, config, mode, str(error))
    calibration = (batch[0] for batch in data.loader("calibration"))  # inputs, any task
    return quantize_graph(model, exported, calibration, config, mode, data, context)


def _per_token(model: nn.Module, data: Data) -> bool:
    """A language model (it decodes, or its task is next-token prediction): its activations
    are quantized per token, by torchao in place, rather than per tensor in a PT2E graph."""
    return has_decoder(model) or data.task == "language_model"


def _exporting_once(method: QuantizeFn) -> QuantizeFn:
    """``method`` for many calls on one float model (the fallback, the sensitivity scan): a
    PT2E method exports each model once and quantizes a copy of that graph on every call
    (ResNet-18: 2.6 s an export, 0.05 s a copy; the scan quantizes once per layer)."""
    if not (isinstance(method, functools.partial) and method.func is _int8_pt2e):
        return method
    graphs: dict[int, tuple[nn.Module, nn.Module | None]] = {}  # id(model): (model, graph)

    def quantize_exported_once(model, data, config, context=None):
        if method.keywords.get("mode") == "dynamic" and _per_token(model, data):
            # No graph: torchao quantizes its layers in place. And no import of _pt2e:
            # torchao's x86 quantizer registers inductor patterns for the whole process
            # on import, and one of them lowers per-token INT8 to oneDNN's qlinear with a
            # scale read back per call, which decoded a GPT 3x slower (700 tokens/s, 2,500).
            return method(model, data, config, context)
        from compress.stages.quantize._pt2e import export_model

        if id(model) not in graphs:
            try:
                graph = export_model(copy.deepcopy(model).cpu().eval(), data.example_input(2))
            except QuantizationError:
                graph = None  # method says why, and quantizes the parts that export
            graphs[id(model)] = (model, graph)  # the model held: its id stays its own
        graph = graphs[id(model)][1]
        if graph is None:
            return method(model, data, config, context)
        return method(model, data, config, context, exported=graph)

    return quantize_exported_once


# method -> function(model, data, config, context=None) -> quantized copy.
QUANTIZE_METHODS: dict[str, Callable[..., nn.Module]] = {
    # Post-training static INT8: observers on the calibration split, then conversion.
    "int8_static": functools.partial(_int8_pt2e, mode="static"),
    # INT8 weights for Linear layers; activations quantized at run time (no calibration);
    # per token (torchao, in place) for a model that decodes, so that decoding runs INT8.
    "int8_dynamic": functools.partial(_int8_pt2e, mode="dynamic"),
    # Quantization-aware training: fake-quant, a short fine-tune, then real INT8.
    "int8_qat": functools.partial(_int8_pt2e, mode="qat"),
    "fp16": cast,
    "bf16": cast,
    # Weight-only: Linear weights narrow, run by torch's CPU weight-only kernels.
    "int4_weight_only": weight_only,
    "int8_weight_only": weight_only,
}


@register_stage("quantize", QuantizeConfig, final=True)
def quantize(
    model: nn.Module,
    data: Data,
    config: QuantizeConfig,
    *,
    context: StageContext,
) -> nn.Module:
    """Quantize a copy of ``model`` as ``config`` (or keyword options) says.

    Example:
        >>> qmodel = quantize(model, data, method="int8_static", calibration_batches=8)
        >>> qmodel = quantize(model, data, method="int8_static", max_accuracy_drop=0.3)
    """
    method = QUANTIZE_METHODS[config.method]
    trainings_before = len(context.budget)
    given, smoothing = model, None
    if config.smoothquant is not None:
        model, smoothing = smooth(model, data, config.smoothquant, config.calibration_batches)
    if config.max_accuracy_drop is not None and config.method in FALLBACK_METHODS:
        quantized = quantize_with_fallback(model, data, config, _exporting_once(method))
    else:
        quantized = method(model, data, config, context)
    if smoothing is not None:
        add_note(quantized, smoothing)
    if config.method not in INT8_METHODS or config.goal != "speed":
        return quantized
    kept = only_if_faster(given, quantized, data, config.method, context, trainings_before)
    check = traits(kept).details.get("speed_check")  # none: not timed (rank > 0)
    if config.speed_by_block and kept is not quantized and check is not None:
        fn = _exporting_once(method)
        mixed = float_where_slower(model, quantized, data, config, fn, context, check["runtime"])
        if mixed is not None:
            return only_if_faster(given, mixed, data, config.method, context, trainings_before)
    return kept


def sensitivity(
    model: nn.Module, data: Data, config: QuantizeConfig | None = None, **options
) -> list[dict]:
    """Per-layer sensitivity rows for ``config``'s method, most sensitive first.

    Example:
        >>> rows = sensitivity(model, data, method="int8_static")
        >>> rows[0]["layer"], rows[0]["drop"]
    """
    if config is None:
        config = parse_stage_options("quantize", options)
    return layer_sensitivity(model, data, config, _exporting_once(QUANTIZE_METHODS[config.method]))
