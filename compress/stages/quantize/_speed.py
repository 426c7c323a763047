"""Quantize only where it pays (``quantize.goal: speed``, the default for the INT8 methods):
the INT8 model and the model it came from are timed side by side, each in its fastest
runtime of the run's ``evaluate.runtimes``, in the alternating rounds the report uses; where
INT8 is not faster by its median round, the stage returns its input, and says so.

On these CPUs INT8 is not always faster: requantizing around concatenations, channel
shuffles, squeeze-excitation and hard-swish, and small inputs where a call is mostly
overhead, can cost more than the INT8 matmuls save (LR-ASPP on 64x64 scenes: 1.05x its
float model; mobilenet_v3_small at 224: every INT8, the peers' included, slower than float).
``goal: size`` keeps INT8 for its size alone.
"""

from __future__ import annotations

import copy
import dataclasses
import logging

from torch import nn

from compress.core.registry import StageContext
from compress.core.traits import set_traits, traits
from compress.data import Data
from compress.measure.evaluate import evaluate
from compress.spec.recipe import EvaluateConfig

log = logging.getLogger("compress")


def only_if_faster(
    model: nn.Module,
    quantized: nn.Module,
    data: Data,
    method: str,
    context: StageContext,
    trainings_before: int | None = None,
) -> nn.Module:
    """``quantized`` where it is faster than ``model`` in their best runtimes, else a CPU
    copy of ``model`` with a note; either way ``stage_details["speed_check"]`` holds the
    paired ratio, its 95 % interval and the runtimes. Both are timed on the CPU, where INT8
    runs. ``trainings_before``: the length of ``context.budget`` before the stage trained
    (QAT); a float model kept is charged none of that training.

    Example:
        >>> kept = only_if_faster(model, int8, data, "int8_static", StageContext())
        >>> traits(kept).details["speed_check"]["kept"]
        'int8'
    """
    settings = dataclasses.replace(
        context.evaluate or EvaluateConfig(), accuracy=False, profile=False, control=False
    )
    float_copy = copy.deepcopy(model).cpu().eval()  # the input stays as it was given
    before = evaluate(float_copy, data, settings, name="input")
    after = evaluate(quantized, data, settings, baseline=before, name=method)
    ratio = after.latency_ratio
    if ratio is None:  # rank > 0 of a distributed run gets rank 0's ratio; none: no timing
        return quantized
    faster, check, measured = _decoding(before, after, method) or _latency(
        before, after, method, ratio
    )
    if faster:
        details = {**traits(quantized).details, "speed_check": check}
        set_traits(quantized, stage_details=details)
        log.info("quantize: %s pays: %s", method, measured)
        return quantized
    log.warning("quantize: %s is not faster here: %s; kept float", method, measured)
    if trainings_before is not None:  # QAT's fine-tune made the INT8 model, not this one
        del context.budget[trainings_before:]
    note = (
        f"kept float: {method} ran at {measured}, not faster, so the stage returns its input"
        f" (quantize.goal: size keeps INT8 for its {after.size_bytes / before.size_bytes:.2f}x"
        " size)"
    )
    tried = traits(quantized)  # what the INT8 model said of itself (a fallback's steps)
    notes = [note, *(f"the INT8 model timed: {n}" for n in tried.notes)]
    details = {**tried.details, "speed_check": check}
    return set_traits(float_copy, notes=notes, stage_details=details)


def _latency(before, after, method: str, ratio) -> tuple[bool, dict, str]:
    """Faster where the paired p50 ratio of the best deployments is below 1."""
    check = {
        "kept": "int8" if ratio.p50 < 1.0 else "float",
        "p50_x": ratio.p50,
        "interval": list(ratio.interval),
        "rounds": ratio.rounds,
        "runtime": after.runtime,
        "input_runtime": before.runtime,
    }
    measured = (
        f"{ratio.p50:.2f}x [{ratio.interval[0]:.2f}, {ratio.interval[1]:.2f}] its input's p50"
        f" ({method} in {after.runtime} against float in {before.runtime}, {ratio.rounds}"
        " alternating rounds)"
    )
    return ratio.p50 < 1.0, check, measured


def _decoding(before, after, method: str) -> tuple[bool, dict, str] | None:
    """A language model is deployed to generate: faster where it decodes more tokens a
    second than its input (each in its fastest runtime); None where either was not timed."""
    mine, theirs = after.best_decode(), before.best_decode()
    if mine is None or theirs is None:
        return None
    paired = after.decode_ratio or {"x": mine[1] / theirs[1], "interval": None, "rounds": 0}
    speedup = paired["x"]
    check = {
        "kept": "int8" if speedup > 1.0 else "float",
        "decode_x": speedup,
        "interval": paired["interval"],
        "rounds": paired["rounds"],
        "runtime": mine[0],
        "input_runtime": theirs[0],
    }
    spread = f" {_interval(paired['interval'])}" if paired["interval"] else ""
    measured = (
        f"{speedup:.2f}x{spread} its input's decoding tokens/s ({method} in {mine[0]} against"
        f" float in {theirs[0]}, {paired['rounds'] or 'no'} alternating rounds)"
    )
    return speedup > 1.0, check, measured


def _interval(bounds) -> str:
    return f"[{bounds[0]:.2f}, {bounds[1]:.2f}]"
