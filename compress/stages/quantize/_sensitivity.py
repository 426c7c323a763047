"""Per-layer sensitivity, and the accuracy-aware fallback built on it.

Both measure on the calibration split (held out of train, never the test split), so that
choosing which layers stay in float does not peek at the figures the report quotes.
Quantized candidates are scored with their uncompiled reference graph: the same numbers
without compiling a kernel per candidate.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from compress.core.modules import matching_modules
from compress.core.traits import add_note, set_traits, traits
from compress.data import Data
from compress.measure.latency import measure_latency
from compress.spec.tasks import get_task
from compress.stages.quantize._config import QuantizeConfig

QuantizeFn = Callable[[nn.Module, Data, QuantizeConfig], nn.Module]


def candidate_layers(model: nn.Module, skip: Sequence[str] = ()) -> list[str]:
    """Names of the layers that quantization acts on (convolutions and Linear)."""
    kinds = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
    return [n for n, m in model.named_modules() if isinstance(m, kinds) and n and n not in skip]


def layer_sensitivity(
    model: nn.Module, data: Data, config: QuantizeConfig, quantize_fn: QuantizeFn
) -> list[dict]:
    """Quantize one layer at a time (the rest float); most sensitive first.

    Each row: ``layer``, ``drop`` (points of the task's metric, calibration split) and
    ``sqnr_db`` of the outputs against the float model's.

    Example:
        >>> rows = layer_sensitivity(model, data, QuantizeConfig(), QUANTIZE_METHODS["int8_static"])
    """
    float_score, _ = _score(model, data)
    skipped = matching_modules(model, config.skip, key="quantize.skip")
    layers = candidate_layers(model, skipped)
    rows = []
    for layer in tqdm(layers, desc="sensitivity", unit="layer", leave=False, disable=None):
        others = [n for n in layers if n != layer] + skipped
        quantized = quantize_fn(
            model, data, dataclasses.replace(config, skip=others, max_accuracy_drop=None)
        )
        score, sqnr = _score(quantized, data, model)
        rows.append({"layer": layer, "drop": _drop(float_score, score, data), "sqnr_db": sqnr})
    rows.sort(key=lambda r: (-r["drop"], r["sqnr_db"]))
    return rows


def quantize_with_fallback(
    model: nn.Module, data: Data, config: QuantizeConfig, quantize_fn: QuantizeFn
) -> nn.Module:
    """Quantize; while the drop exceeds ``config.max_accuracy_drop``, return the most
    sensitive layers to float one at a time. Keeps the best model found and says how."""
    target = config.max_accuracy_drop
    assert target is not None, "the fallback runs for a max_accuracy_drop"
    plain = dataclasses.replace(config, max_accuracy_drop=None)
    float_score, _ = _score(model, data)

    def attempt(kept: list[str]) -> tuple[nn.Module, dict]:
        quantized = quantize_fn(model, data, dataclasses.replace(plain, skip=plain.skip + kept))
        score, _ = _score(quantized, data)
        p50 = measure_latency(quantized, data.example_input(1), warmup=3, iterations=20).p50
        return quantized, {
            "kept_float": list(kept),
            "drop": _drop(float_score, score, data),
            "p50_ms": p50,
        }

    best, chosen = attempt([])
    steps = [chosen]
    if chosen["drop"] > target:
        kept: list[str] = []
        for row in layer_sensitivity(model, data, plain, quantize_fn):
            kept.append(row["layer"])
            candidate, step = attempt(kept)
            steps.append(step)
            # The first step that meets the target has the fewest float layers: take it.
            # Until then, keep the lowest drop seen, never the last one tried.
            if step["drop"] <= target or step["drop"] < chosen["drop"]:
                best, chosen = candidate, step
            if step["drop"] <= target:
                break
    set_traits(best, stage_details={"fallback_steps": steps, "kept_float": chosen["kept_float"]})
    add_note(best, _describe(steps, chosen, target))
    return best


def _describe(steps: list[dict], chosen: dict, target: float) -> str:
    trail = "; ".join(
        f"{'+' + s['kept_float'][-1] if s['kept_float'] else 'all quantized'}: drop"
        f" {s['drop']:.2f} pts, p50 {s['p50_ms']:.3f} ms"
        for s in steps
    )
    where = "on the calibration split"
    if chosen["drop"] <= target:
        kept = ", ".join(chosen["kept_float"]) or "none"
        return f"accuracy-aware fallback met max_accuracy_drop={target} {where}; float layers: {kept} ({trail})"
    return (
        f"accuracy-aware fallback could NOT meet max_accuracy_drop={target} {where}, even with"
        f" {len(steps) - 1} layers in float; kept the best model found (drop"
        f" {chosen['drop']:.2f} pts, float layers: {', '.join(chosen['kept_float']) or 'none'})"
        f" ({trail})"
    )


def _score(model: nn.Module, data: Data, reference: nn.Module | None = None):
    """The task's metric of ``model`` on the calibration split, and the SQNR (dB) of its
    outputs against the float ``reference``'s (None without one; NaN where the outputs are
    not one tensor, a detector's boxes), batch by batch: a segmenter's outputs for the whole
    split need not fit in memory."""
    task = get_task(data.task)
    model = traits(model).reference
    rows, signal, noise = [], 0.0, 0.0
    with torch.inference_mode():
        for batch in data.loader("calibration"):
            inputs, targets, _ = task.split(batch)
            output = _as_float(task.output(model(inputs)))
            rows.append(task.scores(output, targets))
            if reference is not None and not isinstance(output, torch.Tensor):
                signal = noise = math.nan  # boxes after NMS: no SQNR, so no reference run
            elif reference is not None:
                expected = _as_float(task.output(reference(inputs)))
                signal += expected.pow(2).sum().item()
                noise += (expected - output).pow(2).sum().item()
    score = task.summarize(np.concatenate(rows))[task.metric]
    if reference is None:
        return score, None
    return score, math.inf if noise == 0 else 10 * math.log10(signal / noise)


def _as_float(output):
    return output.float() if isinstance(output, torch.Tensor) else output


def _drop(float_score: float, score: float, data: Data) -> float:
    """Points of the metric lost (positive: worse), whichever way the metric points."""
    return (float_score - score) * (1.0 if get_task(data.task).higher_is_better else -1.0)
