"""Compression to a budget: the chain that meets a latency, size or MACs target with the
least of the task's metric lost (top-1, mIoU, ...), chosen on the calibration split and
written as a plain recipe.

The search, in order (each decision on the calibration split; the test split is read
once, by the final run):

1. **Candidates**: structured pruning of the baseline to a grid of MACs fractions
   (``keep``; torch-pruning, no fine-tune) times a format (``int8_static`` or ``float``).
   Pruning with a magnitude importance is cheap and deterministic, so each candidate's
   MACs and parameters are exact.
2. **A cost model per format**, from PROBES measured candidates spread over the grid:
   p50 along straight lines between their MACs in the target runtime (or each
   candidate's fastest runtime), size = c + d * parameters. Every other candidate is
   predicted. Measuring a handful and predicting the rest is what makes a grid of ~26
   cheap: an export and timing costs seconds, a fine-tune minutes.
3. **Training the few that matter**: for each format, the least-pruned candidate
   predicted to meet the target, or a latency target within LATENCY_SLACK (accuracy
   falls as pruning deepens, so it is that format's best hope), distilled from the
   baseline with the recipe's distillation settings, quantized when INT8, and scored image by image against the baseline on the
   calibration split; its latency and size are then measured, not predicted. One that
   misses the target as measured hands its turn to the next more-pruned candidate of
   its format (the cost model is a model: it errs by 10-20 % at the edge).
4. **A longer distillation with the time left**: when no trained candidate meets both,
   the one that meets the target with the least drop is distilled again for a multiple
   of the recipe's epochs (up to ``max_distill_stretch``), as long as it and the final
   run fit in the budget. A small network learns back from its teacher for longer than a
   4-epoch recipe gives it (ResNet-18 pruned to 0.16x MACs: 92.50 % after 4 epochs of
   KD, 0.84 points under its teacher).
5. **The choice**: the most accurate trained candidate that meets both the target
   (measured) and the accuracy floor; when none does, the closest, said in words. Its chain
   is written as a plain recipe and run with :func:`compress.run`, which gives the usual
   run directory; ``search.json`` / ``search.md`` beside the report list every candidate
   and the cost model's error on the chosen one.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from compress.core.errors import ExportError
from compress.core.registry import STAGES, StageContext
from compress.core.schema import Config, FieldError, coerce, option
from compress.core.storage import write_atomic
from compress.data import Data, build_data
from compress.measure.counts import count_flops
from compress.measure.deploy import available_runtimes
from compress.measure.evaluate import evaluate
from compress.measure.scores import example_scores
from compress.run.baseline import baseline_model
from compress.run.pipeline import resolve_device, run
from compress.run.report import Report
from compress.run.rundir import refuse_used_out
from compress.spec.recipe import Recipe, TrainConfig, load_recipe, parse_recipe
from compress.spec.tasks import get_task

log = logging.getLogger("compress")

FORMATS = ("int8_static", "float")
# MACs fractions tried, from unpruned to a twentieth: about 20 % apart, 10 % between 0.3
# and 0.1, where a 0.3x latency target lands on small inputs. Pruning with round_to makes
# the reachable MACs a staircase (ResNet-18, round_to 8: 0.2, 0.16, 0.148, 0.105), and a
# 20 % grid stepped over 0.148. A keep costs a prune (seconds), not a training.
KEEP = (1.0, 0.8, 0.65, 0.5, 0.4, 0.32, 0.28, 0.25, 0.22, 0.2, 0.18, 0.16, 0.15, 0.14, 0.13)
KEEP += (0.12, 0.11, 0.1, 0.08, 0.06, 0.05)
# Candidates timed per format for the latency model: an export and a timing each.
PROBES = 4
# A latency prediction up to this fraction over the target is trained first (see _slack).
LATENCY_SLACK = 0.15
# The fine-tune when the recipe has no distill stage: KD, a short 4 epochs (step 4 stretches it).
DISTILL_TRAINING = {"epochs": 4, "lr": 0.02, "schedule": "cosine"}
TARGETS = (
    "target_latency_ms",
    "target_latency_x",
    "target_size_mb",
    "target_size_x",
    "target_macs",
)


@dataclass
class SearchConfig(Config):
    """What ``compress search`` aims at: one target and an accuracy floor."""

    # One target. Latency: p50 ms at evaluate.latency_batch_size, or a fraction of the
    # baseline's p50 (each in its fastest runtime, or in `runtime`); size: MB on disk, or a
    # fraction of the baseline's; MACs: a fraction of the baseline's.
    target_latency_ms: float | None = option(None, min=0.0)
    target_latency_x: float | None = option(None, min=0.0, max=1.0)
    target_size_mb: float | None = option(None, min=0.0)
    target_size_x: float | None = option(None, min=0.0, max=1.0)
    target_macs: float | None = option(None, min=0.0, max=1.0)
    # Points of the task's metric the chosen chain may lose on the calibration split (paired).
    max_drop: float = option(0.5, min=0.0)
    # Where latency counts: one runtime, or None for each model's fastest of
    # evaluate.runtimes (every installed one when that is unset).
    runtime: Literal["torch", "inductor", "onnxruntime", "openvino"] | None = None
    # Wall-clock minutes for the whole search, final run included: no candidate starts
    # training when it and the final run would not fit.
    budget_minutes: float = option(60.0, min=0.0)
    # The longest distillation of step 4, in multiples of the recipe's epochs (and
    # max_steps): 8x a 4-epoch distillation is 32, about 15 minutes for a ResNet-18
    # pruned to a tenth of its MACs on 2 cores. 1 turns step 4 off.
    max_distill_stretch: int = option(8, min=1, max=100)
    keep: list[float] = option(default_factory=lambda: list(KEEP))  # MACs fractions tried
    formats: list[Literal["int8_static", "float"]] = option(default_factory=lambda: list(FORMATS))

    def check(self) -> None:
        given = [key for key in TARGETS if getattr(self, key) is not None]
        if len(given) != 1:
            raise FieldError(
                given[1] if given else "target",
                f"give exactly one target (allowed: {', '.join(TARGETS)});"
                f" got {', '.join(given) or 'none'}",
            )
        if not self.keep or not all(0.0 < k <= 1.0 for k in self.keep):
            raise FieldError("keep", f"{self.keep!r}: each a MACs fraction in (0, 1]")
        if not self.formats:
            raise FieldError("formats", f"give at least one of {', '.join(FORMATS)}")


@dataclass
class SearchResult:
    """What :func:`search` found: the final run's report, every candidate, the chosen one."""

    report: Report
    candidates: list[dict]
    chosen: dict
    met: bool  # the chosen chain meets the target and the floor, as the search measured
    target: dict  # the target in absolute units: {"metric", "value", "unit"}
    prediction_error: float | None  # the final run's p50 / the cost model's - 1
    config: SearchConfig
    # The final run's figures on the test split (read once, after the choice): the target's
    # figure, the paired drop, and whether each meets. The calibration split decides; with
    # 1,000 images its drop's interval is about ±1 point, the test split's ±0.4.
    on_test: dict = dataclasses.field(default_factory=dict)

    @property
    def summary(self) -> str:
        """The outcome: the chain, its figures, whether it met both, and on the test split."""
        text = _describe(self.chosen, self.target, self.met, self.config.max_drop)
        if not self.on_test:
            return text
        t, drop = self.on_test, self.on_test["drop"]
        figure = "not measured" if t["figure"] is None else f"{t['figure']:.4g} {t['unit']}"
        if not drop:  # evaluate.accuracy off: no test-split accuracy to judge by
            return f"{text}. The final run: {self.target['metric']} {figure}"
        verdict = {
            (True, True): "meets both",
            (True, False): "meets the target, not the floor",
            (False, True): "meets the floor, not the target",
            (False, False): "meets neither",
        }[t["meets_target"], t["meets_floor"]]
        low, high = drop["interval"]
        return (
            f"{text}. The final run on the test split: {self.target['metric']} {figure},"
            f" drop {drop['points']:+.2f} points"
            f" [{low:+.2f}, {high:+.2f}]: {verdict}"
        )


def search(
    recipe: Recipe | str | Path,
    config: SearchConfig | dict | None = None,
    *,
    out: str | Path | None = None,
    overrides: list[str] = (),
    **options,
) -> SearchResult:
    """Find the chain (prune → distill → quantize, each optional) that meets a target, and
    run it. The recipe gives the model, data, training and evaluation settings, and its
    prune / distill / quantize stages, when it has them, the options the search starts from.

    Example:
        >>> found = search("recipes/resnet_full.yaml", target_latency_x=0.3, max_drop=0.5)
        >>> found.chosen["format"], found.chosen["keep"], found.report.run_dir
    """
    started = time.monotonic()
    if not isinstance(config, SearchConfig):
        config = coerce(SearchConfig, {**(config or {}), **options}, "search")
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, list(overrides))
    if out is not None:
        refuse_used_out(out)  # said before the search, not after it
    device = resolve_device(recipe.device)
    torch.manual_seed(recipe.seed)
    data = build_data(recipe.data, seed=recipe.seed)
    baseline = baseline_model(recipe, data, device).cpu().eval()
    templates = _templates(recipe)
    runtimes = [config.runtime] if config.runtime else _runtimes(recipe)

    def context() -> StageContext:  # what a run hands each stage: its seed, the teacher
        return StageContext(device=device, seed=recipe.seed, baseline=baseline)

    progress = tqdm(desc="search", total=5, unit="phase", dynamic_ncols=True, leave=False)

    task = get_task(data.task)
    base_rows = example_scores(baseline, data, "cpu", "calibration", shard=False)
    base_cost = _measured(baseline, data, recipe, runtimes)
    target = _target(config, base_cost)
    log.info("search: target %s %.4g %s", target["metric"], target["value"], target["unit"])
    progress.update()

    candidates, models = _grid(baseline, data, config, templates, context)
    progress.update()

    _fit_cost_model(candidates, models, data, recipe, templates, runtimes, context, base_cost)
    _mark_predicted(candidates, target)
    progress.update()

    base_score = task.summarize(base_rows)[task.metric]

    def score(candidate: dict) -> None:
        """Train the candidate as its recipe would, then score and measure it."""
        begun = time.monotonic()
        distill = _stretched(templates["distill"], candidate["stretch"])
        model = models[candidate["keep"], candidate["format"]]
        model = _trained(
            model, data, {**templates, "distill": distill}, candidate["format"], context
        )
        rows = example_scores(model, data, "cpu", "calibration", shard=False)
        cost = _measured(model, data, recipe, runtimes)
        candidate.update(
            trained=True,
            distill_train=distill["train"],
            calibration_score=task.summarize(rows)[task.metric],
            calibration_drop=dict(task.drop(base_rows, rows), metric=task.metric),
            latency_ms=cost["latency_ms"],
            runtime=cost["runtime"],
            size_mb=cost["size_mb"],
        )
        candidate["meets_target"] = _value(candidate, target, "measured") <= target["value"]
        candidate["meets_floor"] = candidate["calibration_drop"]["points"] <= config.max_drop
        candidate["minutes"] = (time.monotonic() - begun) / 60
        progress.set_postfix_str(_best_so_far(candidates))

    queue, last_minutes = _to_train(candidates, target), 0.0
    while queue:
        candidate = queue.pop(0)
        elapsed = (time.monotonic() - started) / 60
        if last_minutes and elapsed + 2 * last_minutes > config.budget_minutes:
            candidate["skipped"] = "budget"  # it and the final run would not fit
            continue
        score(candidate)
        last_minutes = candidate["minutes"]
        smaller = None if candidate["meets_target"] else _next_smaller(candidates, candidate)
        if smaller is not None:  # one queued per format at a time: never a duplicate
            queue.append(smaller)
    progress.update()

    stretched = _to_stretch(candidates, config, (time.monotonic() - started) / 60)
    if stretched is not None:
        candidates.append(stretched)
        score(stretched)
    progress.update()

    trained = [c for c in candidates if c["trained"]]
    met = [c for c in trained if c["meets_target"] and c["meets_floor"]]
    if met:
        chosen = min(met, key=lambda c: (c["calibration_drop"]["points"], c["latency_ms"]))
    else:
        chosen = min(trained, key=lambda c: _shortfall(c, target, config.max_drop))
    chosen["chosen"] = True
    plain = _plain_recipe(recipe, chosen, templates)
    progress.close()
    log.info(
        "search: %s; running its recipe", _describe(chosen, target, bool(met), config.max_drop)
    )
    report = run(plain, out=out)
    final = report.final
    measured_p50 = (
        final.runtimes.get(config.runtime, {}).get("latency_ms", {}).get("p50")
        if config.runtime
        else final.latency_ms["p50"]
    )
    error = (
        measured_p50 / chosen["latency_ms_predicted"] - 1.0
        if measured_p50 and chosen.get("latency_ms_predicted")
        else None
    )
    on_test = _on_test(report, target, config, measured_p50)
    result = SearchResult(report, candidates, chosen, bool(met), target, error, config, on_test)
    _write(result, config, base_score, base_cost, time.monotonic() - started)
    (log.info if met else log.warning)("search: %s", result.summary)
    return result


# ------------------------------------------------------------------------------ pieces


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
        "quantize": {**quantize, "method": "int8_static"},
    }


def _runtimes(recipe: Recipe) -> list[str]:
    return list(recipe.evaluate.runtimes or available_runtimes())


def _grid(baseline, data, config, templates, context) -> tuple[list[dict], dict]:
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
            candidates.append(
                {
                    "keep": keep,
                    "format": fmt,
                    "macs": macs,
                    "macs_x": macs / base_macs,
                    "params": params,
                    "stretch": 1,  # the distillation's length, in the recipe's epochs
                    "trained": False,
                }
            )
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


def _measured(model: nn.Module, data: Data, recipe: Recipe, runtimes: list[str]) -> dict:
    """p50 in the fastest of ``runtimes`` (and which), and the size on disk: the shared
    evaluator's figures, without the accuracy (the search scores the calibration split)."""
    config = dataclasses.replace(recipe.evaluate, accuracy=False, profile=False, runtimes=runtimes)
    result = evaluate(model, data, config, name="candidate")
    if result.runtime not in runtimes:
        raise ExportError(f"search: the model runs in none of {', '.join(runtimes)}")
    return {
        "runtime": result.runtime,
        "latency_ms": result.latency_ms["p50"],
        "size_mb": result.size_bytes / 1e6,
    }


def _target(config: SearchConfig, base: dict) -> dict:
    """The target in absolute units (ms, MB, or a fraction of the baseline's MACs)."""
    if config.target_latency_ms is not None:
        return {"metric": "latency", "value": config.target_latency_ms, "unit": "ms"}
    if config.target_latency_x is not None:
        value = config.target_latency_x * base["latency_ms"]
        return {
            "metric": "latency",
            "value": value,
            "unit": "ms",
            "of_baseline": config.target_latency_x,
        }
    if config.target_size_mb is not None:
        return {"metric": "size", "value": config.target_size_mb, "unit": "MB"}
    if config.target_size_x is not None:
        value = config.target_size_x * base["size_mb"]
        return {"metric": "size", "value": value, "unit": "MB", "of_baseline": config.target_size_x}
    return {"metric": "macs", "value": config.target_macs, "unit": "x the baseline's MACs"}


def _fit_cost_model(
    candidates, models, data, recipe, templates, runtimes, context, base_cost
) -> None:
    """Measure PROBES candidates per format, spread over the grid; predict p50 by straight
    lines between the measured MACs (extended along the end segments) and size = c +
    d*params by least squares, for every candidate (``*_predicted``; the measured ones
    keep their measurement too). The unpruned float candidate is the baseline, measured
    already (``base_cost``)."""
    for fmt in {c["format"] for c in candidates}:
        mine = sorted((c for c in candidates if c["format"] == fmt), key=lambda c: -c["keep"])
        spread = np.linspace(0, len(mine) - 1, PROBES).round().astype(int)
        probes = {id(mine[i]): mine[i] for i in spread}.values()
        for c in probes:
            if fmt == "float" and c["keep"] >= 1.0:
                c["probe"] = base_cost
                continue
            model = models[c["keep"], fmt]
            if fmt == "int8_static":
                model = _stage("quantize", model, data, templates["quantize"], context())
            c["probe"] = _measured(model, data, recipe, runtimes)
        measured = [c for c in mine if "probe" in c]
        latency = _segments(
            [c["macs"] for c in measured], [c["probe"]["latency_ms"] for c in measured]
        )
        size = _line([c["params"] for c in measured], [c["probe"]["size_mb"] for c in measured])
        for c in mine:
            c["latency_ms_predicted"] = max(latency(c["macs"]), 1e-6)
            c["size_mb_predicted"] = max(size(c["params"]), 1e-6)


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


def _value(candidate: dict, target: dict, which: str) -> float:
    """The candidate's figure for the target's metric, ``predicted`` or ``measured``."""
    if target["metric"] == "macs":
        return candidate["macs_x"]
    key = "latency_ms" if target["metric"] == "latency" else "size_mb"
    return candidate[f"{key}_predicted"] if which == "predicted" else candidate[key]


def _mark_predicted(candidates: list[dict], target: dict) -> None:
    """Whether each candidate is predicted to meet the target, and to come within reach."""
    for c in candidates:
        predicted = _value(c, target, "predicted")
        c["meets_predicted"] = predicted <= target["value"]
        c["within_reach"] = predicted <= target["value"] * _slack(target)


def _to_train(candidates: list[dict], target: dict) -> list[dict]:
    """Per format, the least-pruned candidate predicted within reach of the target (see
    :func:`_slack`); where no candidate of any format is, the one predicted closest."""
    chosen = []
    for fmt in dict.fromkeys(c["format"] for c in candidates):
        meeting = [c for c in candidates if c["format"] == fmt and c["within_reach"]]
        if meeting:
            chosen.append(max(meeting, key=lambda c: c["keep"]))
    if not chosen:
        chosen = [min(candidates, key=lambda c: _value(c, target, "predicted"))]
    # The one predicted most accurate first (the least pruned), so a tight budget trains it.
    return sorted(chosen, key=lambda c: -c["keep"])


def _slack(target: dict) -> float:
    """How far over a latency target a prediction may be and still be trained first: the
    latency model errs by 10-20 % near the target (ResNet-18: -12 %, +19 %), and the
    baseline's p50, which a relative target scales, read 0.539, 0.579 and 0.612 ms in three
    searches (13 % apart). A candidate that then misses as measured hands its turn to the next
    more-pruned one. MACs are exact and sizes follow parameters closely: no slack."""
    return 1.0 + LATENCY_SLACK if target["metric"] == "latency" else 1.0


def _next_smaller(candidates: list[dict], candidate: dict) -> dict | None:
    """The untrained candidate of the same format with the next fewer MACs, if any (keeps
    that pruned to the same MACs are the same network)."""
    smaller = [
        c
        for c in candidates
        if c["format"] == candidate["format"]
        and c["macs"] < candidate["macs"]
        and not c["trained"]
        and c["stretch"] == 1
    ]
    return max(smaller, key=lambda c: (c["macs"], c["keep"])) if smaller else None


def _to_stretch(candidates: list[dict], config: SearchConfig, elapsed: float) -> dict | None:
    """When no trained candidate meets both, a copy of the one that meets the target with
    the least drop, to be distilled ``stretch`` times longer: the largest multiple up to
    ``max_distill_stretch`` whose training and final run fit in the budget (its first
    training's minutes times the multiple, twice). None when no multiple of 2 or more fits."""
    trained = [c for c in candidates if c["trained"]]
    if any(c["meets_target"] and c["meets_floor"] for c in trained):
        return None
    near = [c for c in trained if c["meets_target"]]
    if not near:
        return None
    best = min(near, key=lambda c: c["calibration_drop"]["points"])
    fits = int((config.budget_minutes - elapsed) / (2 * max(best["minutes"], 1e-3)))
    stretch = min(config.max_distill_stretch, fits)
    if stretch < 2:
        return None
    grid = ("keep", "format", "macs", "macs_x", "params", "latency_ms_predicted")
    grid += ("size_mb_predicted", "meets_predicted", "within_reach")
    return {**{k: best[k] for k in grid}, "stretch": stretch, "trained": False}


def _shortfall(candidate: dict, target: dict, max_drop: float) -> float:
    """How far a candidate misses: relative excess over the target plus over the floor."""
    over = max(0.0, _value(candidate, target, "measured") / max(target["value"], 1e-12) - 1.0)
    drop = candidate["calibration_drop"]["points"]
    return over + max(0.0, drop - max_drop) / max(max_drop, 0.1)


def _plain_recipe(recipe: Recipe, chosen: dict, templates: dict) -> Recipe:
    """The chosen chain as an ordinary recipe: ``compress run`` reproduces it unsearched."""
    stages = []
    if chosen["keep"] < 1.0:
        stages.append({"prune": {**templates["prune"], "target_macs": chosen["keep"]}})
    stages.append({"distill": _stretched(templates["distill"], chosen["stretch"])})
    if chosen["format"] == "int8_static":
        stages.append({"quantize": templates["quantize"]})
    plain = recipe.to_dict()
    plain.update(name=f"{recipe.name}-searched", stages=stages)
    return parse_recipe(json.loads(json.dumps(plain)), "<search>")


def _best_so_far(candidates: list[dict]) -> str:
    done = [c for c in candidates if c["trained"]]
    best = min(done, key=lambda c: c["calibration_drop"]["points"])
    return f"best: {best['format']} keep {best['keep']:g} x{best['stretch']}, drop {best['calibration_drop']['points']:+.2f}"


def _describe(chosen: dict, target: dict, met: bool, max_drop: float) -> str:
    chain = "distill"
    if chosen["keep"] < 1:  # the MACs reached, not the keep asked for: round_to's staircase
        chain = f"prune to {chosen['macs_x']:.3g}x MACs (keep {chosen['keep']:g}) → " + chain
    if chosen["stretch"] > 1:
        chain += f" ({chosen['stretch']}x the recipe's epochs)"
    if chosen["format"] == "int8_static":
        chain += " → int8_static"
    figure = _value(chosen, target, "measured")
    drop = chosen["calibration_drop"]["points"]
    unit = _unit(target)
    text = (
        f"{chain}: {target['metric']} {figure:.4g} {unit} (target {target['value']:.4g}"
        f" {unit}), calibration drop {drop:+.2f} points (floor {max_drop:g})"
    )
    if not met:
        text = (
            "no candidate met both the target and the accuracy floor within the budget;"
            f" the closest is written: {text}"
        )
    return text


def _on_test(report: Report, target: dict, config: SearchConfig, p50: float | None) -> dict:
    """The final run's figures (the test split's one use) against the target and the floor.
    A latency target given as a fraction of the baseline's is judged by the report's paired
    ratio (alternating rounds in one process, each model in its fastest runtime), not by two
    p50s taken minutes apart: the baseline's p50 alone read 0.539-0.612 ms in three searches."""
    final = report.final
    drop = final.drop or {}
    ratio = (final.latency_ratio or {}).get("p50")
    if target["metric"] == "latency" and "of_baseline" in target and ratio and not config.runtime:
        figure, limit, unit = ratio, target["of_baseline"], "x the baseline's in paired rounds"
    else:
        if target["metric"] == "latency":
            figure = p50
        elif target["metric"] == "size":
            figure = final.size_bytes / 1e6
        else:
            figure = final.macs / report.baseline.macs
        limit, unit = target["value"], _unit(target)
    return {
        "figure": figure,
        "limit": limit,
        "unit": unit,
        "drop": drop,
        "meets_target": figure is not None and figure <= limit,
        "meets_floor": bool(drop) and drop["points"] <= config.max_drop,
    }


def _unit(target: dict) -> str:
    return "x" if target["metric"] == "macs" else target["unit"]


def _write(result: SearchResult, config: SearchConfig, base_score, base_cost, seconds) -> None:
    folder = result.report.run_dir
    metric = result.report.baseline.metric
    summary = {
        "config": dataclasses.asdict(config),
        "target": result.target,
        "met": result.met,
        "baseline": {"calibration_score": base_score, "metric": metric, **base_cost},
        "chosen": result.chosen,
        "latency_prediction_error": result.prediction_error,
        "on_test": result.on_test,
        "final": {
            "p50_ms": result.report.final.latency_ms["p50"],
            "runtime": result.report.final.runtime,
            "score": result.report.final.score,
        },
        "minutes": seconds / 60,
        "candidates": result.candidates,
    }
    write_atomic(folder / "search.json", json.dumps(summary, indent=1, default=float))
    lines = [
        f"# Search: {result.report.recipe}",
        "",
        result.summary + ".",
        "",
        f"Baseline: {metric} {base_score:.2f} on the calibration split, p50 {base_cost['latency_ms']:.3f}"
        f" ms in {base_cost['runtime']}, {base_cost['size_mb']:.2f} MB. Searched in"
        f" {seconds / 60:.1f} minutes. The chosen chain is `recipe.yaml`; `compress run`"
        " reproduces it; its test-split figures are in `report.md`.",
        "",
    ]
    if result.prediction_error is not None:
        lines += [
            f"Latency model: predicted {result.chosen['latency_ms_predicted']:.3f} ms for the"
            f" chosen chain, measured {result.report.final.latency_ms['p50']:.3f} ms by the final"
            f" run ({result.prediction_error:+.0%}).",
            "",
        ]
    lines += [
        "| keep MACs | format | distill x | MACs x | p50 ms predicted | p50 ms measured | size MB predicted"
        f" | size MB measured | calibration {metric} | drop pts [95 % CI] | chosen |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in result.candidates:
        probe = c.get("probe", {})
        latency = c.get("latency_ms", probe.get("latency_ms"))
        size = c.get("size_mb", probe.get("size_mb"))
        drop = c.get("calibration_drop")
        lines.append(
            f"| {c['keep']:g} | {c['format']} | {c['stretch']} | {c['macs_x']:.3f}"
            f" | {c['latency_ms_predicted']:.3f} | {_cell(latency, '.3f')}"
            f" | {c['size_mb_predicted']:.2f} | {_cell(size, '.2f')}"
            f" | {_cell(c.get('calibration_score'), '.2f')}"
            f" | {_drop_cell(drop) if drop else c.get('skipped', '')}"
            f" | {'yes' if c.get('chosen') else ''} |"
        )
    write_atomic(folder / "search.md", "\n".join(lines) + "\n")


def _cell(value, fmt: str) -> str:
    return (
        ""
        if value is None or (isinstance(value, float) and math.isnan(value))
        else format(value, fmt)
    )


def _drop_cell(drop: dict) -> str:
    low, high = drop["interval"]
    return f"{drop['points']:+.2f} [{low:+.2f}, {high:+.2f}]"


__all__ = ["SearchConfig", "SearchResult", "search"]
