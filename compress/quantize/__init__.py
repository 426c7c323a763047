"""The quantize stage: INT8 static/dynamic/QAT (torchao PT2E), FP16/BF16, INT4 weights.

``quantize(model, data, method=...)`` dispatches on the method; with
``max_accuracy_drop`` it falls back layer by layer to float until the target is met.
"""

from __future__ import annotations

from torch import nn

from compress.data import Data
from compress.quantize._cast import LowPrecisionModel, cast
from compress.quantize._int4 import Int4WeightOnlyModel, int4_weight_only
from compress.quantize._parts import PartlyQuantizedModel
from compress.quantize._pt2e import (
    MAX_BATCH,
    QuantizationError,
    QuantizedModel,
    int8_dynamic,
    int8_qat,
    int8_static,
)
from compress.quantize._sensitivity import layer_sensitivity, quantize_with_fallback
from compress.recipe import FALLBACK_METHODS, QuantizeConfig, parse_stage_options

QUANTIZE_METHODS = {
    "int8_static": int8_static,
    "int8_dynamic": int8_dynamic,
    "int8_qat": int8_qat,
    "fp16": cast,
    "bf16": cast,
    "int4_weight_only": int4_weight_only,
}

__all__ = [
    "MAX_BATCH",
    "QUANTIZE_METHODS",
    "Int4WeightOnlyModel",
    "LowPrecisionModel",
    "PartlyQuantizedModel",
    "QuantizationError",
    "QuantizedModel",
    "layer_sensitivity",
    "quantize",
    "sensitivity",
]


def quantize(
    model: nn.Module, data: Data, config: QuantizeConfig | None = None, **options
) -> nn.Module:
    """Quantize a copy of ``model`` as ``config`` (or keyword options) says.

    Example:
        >>> qmodel = quantize(model, data, method="int8_static", calibration_batches=8)
        >>> qmodel = quantize(model, data, method="int8_static", max_accuracy_drop=0.3)
    """
    if config is None:
        config = parse_stage_options("quantize", options)
    elif options:
        raise TypeError("pass either a QuantizeConfig or keyword options, not both")
    method = QUANTIZE_METHODS[config.method]
    if config.max_accuracy_drop is not None and config.method in FALLBACK_METHODS:
        return quantize_with_fallback(model, data, config, method)
    return method(model, data, config)


def sensitivity(
    model: nn.Module, data: Data, config: QuantizeConfig | None = None, **options
) -> list[dict]:
    """Per-layer sensitivity rows for ``config``'s method, most sensitive first."""
    if config is None:
        config = parse_stage_options("quantize", options)
    return layer_sensitivity(model, data, config, QUANTIZE_METHODS[config.method])
