"""Quantize only where it pays (``quantize.goal: speed``, the default for the INT8 methods):
the INT8 model and the model it came from are timed side by side, each in its fastest
runtime of the run's ``evaluate.runtimes``, in the alternating rounds the report uses; where
INT8 is not faster by its median round, the stage returns its input, and says so.

On these CPUs INT8 is not always faster: requantizing around concatenations, channel
shuffles, squeeze-excitation and hard-swish, and small inputs where a call is mostly
overhead, can cost more than the INT8 matmuls save (LR-ASPP on 64x64 scenes: 1.05x its
float model; mobilenet_v3_small at 224: every INT8, the peers' included, slower than float).
``goal: size`` keeps INT8 for its size alone. ``speed_by_block: true`` looks finer where
the whole model does not pay: block by block, float where INT8 is slower
(:func:`float_where_slower`).
"""

from __future__ import annotations

import copy
import dataclasses
import logging

from torch import nn

from compress.core.distributed import usable_cores
from compress.core.modules import matching_modules
from compress.core.registry import StageContext
from compress.core.traits import add_note, set_traits, traits
from compress.data import Data
from compress.measure.deploy import deployed
from compress.measure.evaluate import evaluate
from compress.measure.latency import paired_latency_ratio
from compress.spec.recipe import EvaluateConfig
from compress.stages.quantize._config import QuantizeConfig
from compress.stages.quantize._sensitivity import QuantizeFn, candidate_layers

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


def float_where_slower(
    model: nn.Module,
    quantized: nn.Module,
    data: Data,
    config: QuantizeConfig,
    quantize_fn: QuantizeFn,
    context: StageContext,
    runtime: str,
) -> nn.Module | None:
    """``model`` in INT8 but for the blocks whose INT8 form is slower: each block in turn goes
    back to float and is timed against the model so far in ``runtime`` (INT8's best in the
    speed check; paired rounds, as the report times); it stays float where that is faster.
    None where no block stayed INT8 (the float model is then the answer).

    Example:
        >>> mixed = float_where_slower(model, int8, data, config, fn, StageContext(), "openvino")
        >>> traits(mixed).details["speed_blocks"][0]
        {'block': 'features.0', 'p50_x': 0.93, 'float': True}
    """
    settings = context.evaluate or EvaluateConfig()
    batch = data.example_input(settings.latency_batch_size)
    threads = settings.threads or usable_cores()
    fixed = [*config.skip, *traits(quantized).details.get("kept_float", [])]  # accuracy's
    blocks = model_blocks(model, matching_modules(model, fixed, key="quantize.skip"))
    current, timed = quantized, deployed(quantized, runtime, threads, batch)
    floats: list[str] = []
    steps: list[dict] = []
    for block in blocks:
        skip = [*fixed, *floats, block]
        candidate = quantize_fn(
            model, data, dataclasses.replace(config, skip=skip, max_accuracy_drop=None)
        )
        deployment = deployed(candidate, runtime, threads, batch)
        ratio = paired_latency_ratio((timed, batch), (deployment, batch), settings)
        steps.append({"block": block, "p50_x": round(ratio.p50, 3), "float": ratio.p50 < 1.0})
        if ratio.p50 < 1.0:
            current, timed, floats = candidate, deployment, [*floats, block]
    if len(floats) == len(blocks):
        return None
    details = {**traits(current).details, "speed_blocks": steps}
    set_traits(current, stage_details=details)
    kept = ", ".join(f"{s['block']} ({s['p50_x']:.2f}x)" for s in steps if s["float"]) or "none"
    add_note(
        current,
        f"blocks kept float for speed in {runtime}: {kept}, each timed against the model so"
        f" far; {len(blocks) - len(floats)} of {len(blocks)} blocks INT8",
    )
    return current


def model_blocks(model: nn.Module, skip: list[str]) -> list[str]:
    """The blocks of ``model`` that hold quantizable layers, in order: its top-level
    children, and in place of a child holding most of the layers, that child's children
    (MobileNet's ``features.0`` ... ``features.12``; ResNet's ``conv1``, ``layer1`` ...).
    A layer under a skipped module is float already, and counts for no block."""
    layers = [
        n for n in candidate_layers(model) if not any(n.startswith(s + ".") or n == s for s in skip)
    ]

    def blocks(prefix: str, module: nn.Module) -> list[str]:
        found = []
        for name, child in module.named_children():
            full = prefix + name
            inside = [n for n in layers if n == full or n.startswith(full + ".")]
            if 2 * len(inside) > len(layers) and len(list(child.children())) > 1:
                found += blocks(full + ".", child)
            elif inside:
                found.append(full)
        return found

    return blocks("", model)
