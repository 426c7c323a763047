"""The search's grid and its cost model: each (keep, format) candidate built once, its
latency, size and MACs predicted from the measured corners by piecewise-linear fits, and
the order in which candidates are trained: cheapest predicted to meet the target first.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import replace
from typing import TYPE_CHECKING, cast

import numpy as np
from torch import nn

from compress.core.errors import ExportError
from compress.core.registry import STAGES
from compress.data import Data
from compress.measure.counts import count_flops
from compress.measure.deploy import available_runtimes
from compress.measure.evaluate import evaluate
from compress.spec.recipe import Recipe, TrainConfig, parse_recipe
from compress.workflow.search._candidate import Candidate, Cost

if TYPE_CHECKING:  # the package's own config; annotations only
    from compress.workflow.search import SearchConfig

FORMATS = ("int8_static", "float")


# MACs fractions tried, from unpruned to a twentieth: about 20 % apart, 10 % between 0.3
# and 0.1, where a 0.3x latency target lands on small inputs. Pruning with round_to makes
# the reachable MACs a staircase (ResNet-18, round_to 8: 0.2, 0.16, 0.148, 0.105), and a
# 20 % grid stepped over 0.148. A keep costs a prune (seconds), not a training.
KEEP: tuple[float, ...] = (
    1.0,
    0.8,
    0.65,
    0.5,
    0.4,
    0.32,
    0.28,
    0.25,
    0.22,
    0.2,
    0.18,
    0.16,
    0.15,
    0.14,
    0.13,
)
KEEP += (0.12, 0.11, 0.1, 0.08, 0.06, 0.05)


# Candidates timed per format for the latency model: an export and a timing each.
PROBES = 4


# A latency prediction up to this fraction over the target is trained first (see _slack).
LATENCY_SLACK = 0.15


# The fine-tune when the recipe has no distill stage: KD, a short 4 epochs (step 4 stretches it).
DISTILL_TRAINING = {"epochs": 4, "lr": 0.02, "schedule": "cosine"}


def _templates(recipe: Recipe) -> dict[str, dict]:
    """The recipe's own prune / distill / quantize options, where it has those stages: the
    search keeps them and chooses only the amount and the format."""
    found = {s.kind: s.options() for s in reversed(recipe.stages)}
    prune = found.get("prune") or {}
    if prune.get("method") != "structured":
        prune = {}
    prune = {k: v for k, v in prune.items() if k not in ("ratio", "target_latency_ms")}
    quantize = found.get("quantize") or {}
    if quantize.get("method") != "int8_static":
        quantize = {}
    # The pruned model is the student: a student the recipe names is another search's.
    distill = {k: v for k, v in (found.get("distill") or {}).items() if k != "student"}
    return {
        "prune": {**prune, "method": "structured", "fine_tune": {"epochs": 0}},
        "distill": distill or {"train": dict(DISTILL_TRAINING)},
        # goal: size, since the search times each format itself and chooses by that.
        "quantize": {**quantize, "method": "int8_static", "goal": "size"},
    }


def _runtimes(recipe: Recipe) -> list[str]:  # any the recipe names, or all installed
    return list(recipe.evaluate.runtimes or available_runtimes())


def _grid(baseline, data, config, templates, context) -> tuple[list[Candidate], dict]:
    """Every (keep, format) candidate with its exact MACs and parameters, and the pruned
    models by (keep, format): pruned once per keep, shared by the formats."""
    example = data.example_input(1)
    base_macs = count_flops(baseline, example) // 2
    candidates, models = [], {}
    for keep in sorted(set(config.keep), reverse=True):
        prune = {**templates["prune"], "target_macs": keep}
        model = baseline if keep >= 1.0 else _stage("prune", baseline, data, prune, context())
        macs = count_flops(model, example) // 2
        params = sum(p.numel() for p in model.parameters())
        for fmt in config.formats:
            models[keep, fmt] = model
            candidates.append(Candidate(keep, fmt, macs, macs / base_macs, params))
    return candidates, models


def _stage(kind: str, model: nn.Module, data: Data, options: dict, context) -> nn.Module:
    """One registered stage, as a run calls it, with ``options`` as a recipe would give."""
    config = STAGES[kind].parse(options, f"search.{kind}")
    return STAGES[kind].function(model, data, config, context=context).cpu().eval()


def _stretched(distill: dict, stretch: int) -> dict:
    """The recipe's distillation options with ``stretch`` times its epochs (and max_steps)."""
    train = dict(distill.get("train") or {})
    train["epochs"] = stretch * train.get("epochs", TrainConfig().epochs)
    if train.get("max_steps"):
        train["max_steps"] = stretch * train["max_steps"]
    return {**distill, "train": train}


def _trained(model, data, templates, fmt, context) -> nn.Module:
    """A candidate as its recipe would make it: distilled, then quantized when INT8."""
    model = _stage("distill", model, data, templates["distill"], context())
    if fmt == "int8_static":
        model = _stage("quantize", model, data, templates["quantize"], context())
    return model


def _cost(model: nn.Module, data: Data, recipe: Recipe, runtimes: list[str]) -> Cost:
    """p50 in the fastest of ``runtimes`` (and which), and the size on disk: the shared
    evaluator's figures, without the accuracy (the search scores the calibration split)."""
    config = dataclasses.replace(
        recipe.evaluate, accuracy=False, profile=False, runtimes=cast(list, runtimes)
    )
    result = evaluate(model, data, config, name="candidate")
    if result.runtime not in runtimes:
        raise ExportError(f"search: the model runs in none of {', '.join(runtimes)}")
    return Cost(result.runtime, result.latency_ms.p50, result.size_bytes / 1e6)


def _target(config: SearchConfig, base: Cost) -> dict:
    """The target in absolute units (ms, MB, or a fraction of the baseline's MACs)."""
    if config.target_latency_ms is not None:
        return {"metric": "latency", "value": config.target_latency_ms, "unit": "ms"}
    if config.target_latency_x is not None:
        value = config.target_latency_x * base.latency_ms
        return {
            "metric": "latency",
            "value": value,
            "unit": "ms",
            "of_baseline": config.target_latency_x,
        }
    if config.target_size_mb is not None:
        return {"metric": "size", "value": config.target_size_mb, "unit": "MB"}
    if config.target_size_x is not None:
        value = config.target_size_x * base.size_mb
        return {"metric": "size", "value": value, "unit": "MB", "of_baseline": config.target_size_x}
    return {"metric": "macs", "value": config.target_macs, "unit": "x the baseline's MACs"}


def _fit_cost_model(
    candidates: list[Candidate], models, data, recipe, templates, runtimes, context, base_cost
) -> list[Candidate]:
    """Measure PROBES candidates per format, spread over the grid; predict p50 by straight
    lines between the measured MACs (extended along the end segments) and size = c +
    d*params by least squares, for every candidate (``*_predicted``; the measured ones
    keep their measurement too). The unpruned float candidate is the baseline, measured
    already (``base_cost``). The candidates come back in their order."""
    fitted = {}
    for fmt in dict.fromkeys(c.format for c in candidates):
        mine = sorted((c for c in candidates if c.format == fmt), key=lambda c: -c.keep)
        spread = set(np.linspace(0, len(mine) - 1, PROBES).round().astype(int).tolist())
        for i in sorted(spread):
            c = mine[i]
            if fmt == "float" and c.keep >= 1.0:
                mine[i] = replace(c, probe=base_cost)
                continue
            model = models[c.keep, fmt]
            if fmt == "int8_static":
                model = _stage("quantize", model, data, templates["quantize"], context())
            mine[i] = replace(c, probe=_cost(model, data, recipe, runtimes))
        measured = [(c.macs, c.params, c.probe) for c in mine if c.probe is not None]
        latency = _segments([m for m, _, _ in measured], [p.latency_ms for _, _, p in measured])
        size = _line([n for _, n, _ in measured], [p.size_mb for _, _, p in measured])
        for c in mine:
            fitted[c.keep, fmt] = replace(
                c,
                latency_ms_predicted=max(latency(c.macs), 1e-6),
                size_mb_predicted=max(size(c.params), 1e-6),
            )
    return [fitted[c.keep, c.format] for c in candidates]


def _line(x: list[float], y: list[float]):
    """y = a + b*x by least squares (a constant when every x is the same)."""
    if len(set(x)) < 2:
        mean = float(np.mean(y))
        return lambda _: mean
    b, a = np.polyfit(np.asarray(x, float), np.asarray(y, float), 1)
    return lambda value: float(a + b * value)


def _segments(x: list[float], y: list[float]):
    """y along straight lines between the points, extended past the ends along the end
    segments (a constant with one distinct x). Latency is not a line in MACs: it levels
    off towards a floor of fixed costs as a network shrinks (ResNet-18 at 28x28: 0.56 ms
    at 1x the MACs, 0.20 at 0.2x, 0.08 at 0.04x), which one least-squares line missed by
    28 % at the middle of the grid."""
    points: dict[float, list[float]] = {}
    for xi, yi in zip(x, y, strict=True):
        points.setdefault(float(xi), []).append(float(yi))
    xs = sorted(points)
    ys = [float(np.mean(points[xi])) for xi in xs]
    if len(xs) < 2:
        return lambda _: ys[0]

    def predict(value: float) -> float:
        i = min(max(int(np.searchsorted(xs, value)), 1), len(xs) - 1)
        slope = (ys[i] - ys[i - 1]) / (xs[i] - xs[i - 1])
        return ys[i - 1] + slope * (value - xs[i - 1])

    return predict


def _value(candidate: Candidate, target: dict, which: str) -> float:
    """The candidate's figure for the target's metric, ``predicted`` or ``measured``."""
    if target["metric"] == "macs":
        return candidate.macs_x
    key = "latency_ms" if target["metric"] == "latency" else "size_mb"
    value = getattr(candidate, f"{key}_predicted" if which == "predicted" else key)
    assert value is not None, f"candidate {candidate.keep:g} {candidate.format}: no {which} {key}"
    return value


def _mark_predicted(candidates: list[Candidate], target: dict) -> list[Candidate]:
    """Each candidate with whether it is predicted to meet the target, and to come within
    reach."""
    marked = []
    for c in candidates:
        predicted = _value(c, target, "predicted")
        marked.append(
            replace(
                c,
                meets_predicted=predicted <= target["value"],
                within_reach=predicted <= target["value"] * _slack(target),
            )
        )
    return marked


def _to_train(candidates: list[Candidate], target: dict) -> list[Candidate]:
    """Per format, the least-pruned candidate predicted within reach of the target (see
    :func:`_slack`); where no candidate of any format is, the one predicted closest."""
    chosen = []
    for fmt in dict.fromkeys(c.format for c in candidates):
        meeting = [c for c in candidates if c.format == fmt and c.within_reach]
        if meeting:
            chosen.append(max(meeting, key=lambda c: c.keep))
    if not chosen:
        chosen = [min(candidates, key=lambda c: _value(c, target, "predicted"))]
    # The one predicted most accurate first (the least pruned), so a tight budget trains it.
    return sorted(chosen, key=lambda c: -c.keep)


def _slack(target: dict) -> float:
    """How far over a latency target a prediction may be and still be trained first: the
    latency model errs by 10-20 % near the target (ResNet-18: -12 %, +19 %), and the
    baseline's p50, which a relative target scales, read 0.539, 0.579 and 0.612 ms in three
    searches (13 % apart). A candidate that then misses as measured hands its turn to the next
    more-pruned one. MACs are exact and sizes follow parameters closely: no slack."""
    return 1.0 + LATENCY_SLACK if target["metric"] == "latency" else 1.0


def _next_smaller(candidates: list[Candidate], candidate: Candidate) -> Candidate | None:
    """The untrained candidate of the same format with the next fewer MACs, if any (keeps
    that pruned to the same MACs are the same network)."""
    smaller = [
        c
        for c in candidates
        if c.format == candidate.format
        and c.macs < candidate.macs
        and not c.trained
        and c.stretch == 1
    ]
    return max(smaller, key=lambda c: (c.macs, c.keep)) if smaller else None


def _to_stretch(
    candidates: list[Candidate], config: SearchConfig, elapsed: float
) -> Candidate | None:
    """When no trained candidate meets both, a copy of the one that meets the target with
    the least drop, to be distilled ``stretch`` times longer: the largest multiple up to
    ``max_distill_stretch`` whose training and final run fit in the budget (its first
    training's minutes times the multiple, twice). None when no multiple of 2 or more fits."""
    trained = [c for c in candidates if c.trained]
    if any(c.meets_target and c.meets_floor for c in trained):
        return None
    near = [c for c in trained if c.meets_target]
    if not near:
        return None
    best = min(near, key=lambda c: c.drop)
    fits = int((config.budget_minutes - elapsed) / (2 * max(best.minutes or 0.0, 1e-3)))
    stretch = min(config.max_distill_stretch, fits)
    if stretch < 2:
        return None
    return Candidate(
        best.keep,
        best.format,
        best.macs,
        best.macs_x,
        best.params,
        stretch=stretch,
        latency_ms_predicted=best.latency_ms_predicted,
        size_mb_predicted=best.size_mb_predicted,
        meets_predicted=best.meets_predicted,
        within_reach=best.within_reach,
    )


def _shortfall(candidate: Candidate, target: dict, max_drop: float) -> float:
    """How far a candidate misses: relative excess over the target plus over the floor."""
    over = max(0.0, _value(candidate, target, "measured") / max(target["value"], 1e-12) - 1.0)
    return over + max(0.0, candidate.drop - max_drop) / max(max_drop, 0.1)


def _plain_recipe(recipe: Recipe, chosen: Candidate, templates: dict) -> Recipe:
    """The chosen chain as an ordinary recipe: ``compress run`` reproduces it unsearched."""
    stages = []
    if chosen.keep < 1.0:
        stages.append({"prune": {**templates["prune"], "target_macs": chosen.keep}})
    stages.append({"distill": _stretched(templates["distill"], chosen.stretch)})
    if chosen.format == "int8_static":
        stages.append({"quantize": templates["quantize"]})
    plain = recipe.to_dict()
    plain.update(name=f"{recipe.name}-searched", stages=stages)
    return parse_recipe(json.loads(json.dumps(plain)), "<search>")
