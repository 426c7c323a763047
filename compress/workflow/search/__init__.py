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
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal, cast

import torch
from tqdm import tqdm

from compress.core.registry import StageContext
from compress.core.schema import Config, FieldError, coerce, option
from compress.data import build_data
from compress.measure.scores import example_scores
from compress.spec.recipe import Recipe, load_recipe
from compress.spec.tasks import get_task
from compress.workflow.baseline import baseline_model
from compress.workflow.pipeline import resolve_device, run
from compress.workflow.report import Report
from compress.workflow.rundir import refuse_used_out
from compress.workflow.search._candidate import Candidate
from compress.workflow.search._files import _best_so_far, _describe, _on_test, _write
from compress.workflow.search._grid import (
    FORMATS,
    KEEP,
    _cost,
    _fit_cost_model,
    _grid,
    _mark_predicted,
    _next_smaller,
    _plain_recipe,
    _runtimes,
    _shortfall,
    _stretched,
    _target,
    _templates,
    _to_stretch,
    _to_train,
    _trained,
    _value,
)

log = logging.getLogger("compress")

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
        if not self.formats or len(set(self.formats)) != len(self.formats):
            raise FieldError(
                "formats", f"{self.formats!r}: give each of {', '.join(FORMATS)} at most once"
            )


@dataclass
class SearchResult:
    """What :func:`search` found: the final run's report, every candidate, the chosen one."""

    report: Report
    candidates: list[Candidate]
    chosen: Candidate
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
        low, high = drop.interval or (drop.points, drop.points)
        return (
            f"{text}. The final run on the test split: {self.target['metric']} {figure},"
            f" drop {drop.points:+.2f} points"
            f" [{low:+.2f}, {high:+.2f}]: {verdict}"
        )


def search(
    recipe: Recipe | str | Path,
    config: SearchConfig | dict | None = None,
    *,
    out: str | Path | None = None,
    overrides: Sequence[str] = (),
    **options,
) -> SearchResult:
    """Find the chain (prune → distill → quantize, each optional) that meets a target, and
    run it. The recipe gives the model, data, training and evaluation settings, and its
    prune / distill / quantize stages, when it has them, the options the search starts from.

    Example:
        >>> found = search("recipes/resnet_full.yaml", target_latency_x=0.3, max_drop=0.5)
        >>> found.chosen.format, found.chosen.keep, found.report.run_dir
    """
    started = time.monotonic()
    if not isinstance(config, SearchConfig):
        config = cast(SearchConfig, coerce(SearchConfig, {**(config or {}), **options}, "search"))
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, list(overrides))
    if out is not None:
        refuse_used_out(out)  # said before the search, not after it
    found = _Search(recipe, config, started)
    found.plan()  # phases 1-3: the baseline's cost and the target, the grid, the cost model
    found.train_queue()  # 4: candidates trained and measured, cheapest predicted first
    found.stretch()  # 5: the nearest one distilled longer where none met both
    return found.finish(out)


class _Search:
    """One search's shared state: the baseline and its calibration rows, the target, the
    grid's candidates (each phase replaces them with what it learnt) and their models."""

    def __init__(self, recipe: Recipe, config: SearchConfig, started: float):
        self.recipe, self.config, self.started = recipe, config, started
        self.device = resolve_device(recipe.device)
        torch.manual_seed(recipe.seed)
        self.data = build_data(recipe.data, seed=recipe.seed)
        self.baseline = baseline_model(recipe, self.data, self.device).cpu().eval()
        self.templates = _templates(recipe)
        self.runtimes: list[str] = [config.runtime] if config.runtime else _runtimes(recipe)
        self.task = get_task(self.data.task)
        self.progress = tqdm(desc="search", total=5, unit="phase", dynamic_ncols=True, leave=False)

    def context(self) -> StageContext:  # what a run hands each stage: its seed, the teacher
        return StageContext(device=self.device, seed=self.recipe.seed, baseline=self.baseline)

    def plan(self) -> None:
        data, recipe = self.data, self.recipe
        self.base_rows = example_scores(self.baseline, data, "cpu", "calibration", shard=False)
        self.base_cost = _cost(self.baseline, data, recipe, self.runtimes)
        self.target = target = _target(self.config, self.base_cost)
        log.info("search: target %s %.4g %s", target["metric"], target["value"], target["unit"])
        self.progress.update()
        candidates, self.models = _grid(
            self.baseline, data, self.config, self.templates, self.context
        )
        self.progress.update()
        candidates = _fit_cost_model(
            candidates,
            self.models,
            data,
            recipe,
            self.templates,
            self.runtimes,
            self.context,
            self.base_cost,
        )
        self.candidates = _mark_predicted(candidates, target)
        self.progress.update()

    def update(self, old: Candidate, new: Candidate) -> Candidate:
        """``new`` in ``old``'s place in the grid (the same object, not an equal one)."""
        index = next(i for i, c in enumerate(self.candidates) if c is old)
        self.candidates[index] = new
        return new

    def score(self, candidate: Candidate) -> Candidate:
        """Train the candidate as its recipe would, then score and measure it."""
        begun, task, data = time.monotonic(), self.task, self.data
        distill = _stretched(self.templates["distill"], candidate.stretch)
        model = self.models[candidate.keep, candidate.format]
        model = _trained(
            model, data, {**self.templates, "distill": distill}, candidate.format, self.context
        )
        rows = example_scores(model, data, "cpu", "calibration", shard=False)
        cost = _cost(model, data, self.recipe, self.runtimes)
        drop = task.drop(self.base_rows, rows)
        measured = replace(
            candidate,
            trained=True,
            distill_train=distill["train"],
            calibration_score=task.summarize(rows)[task.metric],
            calibration_drop=drop,
            latency_ms=cost.latency_ms,
            runtime=cost.runtime,
            size_mb=cost.size_mb,
            meets_floor=drop.points <= self.config.max_drop,
            minutes=(time.monotonic() - begun) / 60,
        )
        measured = replace(
            measured,
            meets_target=_value(measured, self.target, "measured") <= self.target["value"],
        )
        self.update(candidate, measured)
        self.progress.set_postfix_str(_best_so_far(self.candidates))
        return measured

    def train_queue(self) -> None:
        queue, last_minutes = _to_train(self.candidates, self.target), 0.0
        while queue:
            candidate = queue.pop(0)
            elapsed = (time.monotonic() - self.started) / 60
            if last_minutes and elapsed + 2 * last_minutes > self.config.budget_minutes:
                # It and the final run would not fit.
                self.update(candidate, replace(candidate, skipped="budget"))
                continue
            candidate = self.score(candidate)
            last_minutes = candidate.minutes or 0.0
            smaller = None if candidate.meets_target else _next_smaller(self.candidates, candidate)
            if smaller is not None:  # one queued per format at a time: never a duplicate
                queue.append(smaller)
        self.progress.update()

    def stretch(self) -> None:
        elapsed = (time.monotonic() - self.started) / 60
        stretched = _to_stretch(self.candidates, self.config, elapsed)
        if stretched is not None:
            self.candidates.append(stretched)
            self.score(stretched)
        self.progress.update()

    def finish(self, out) -> SearchResult:
        """The chosen candidate run as a plain recipe, its test figures and the search's files."""
        config, target = self.config, self.target
        trained = [c for c in self.candidates if c.trained]
        met = [c for c in trained if c.meets_target and c.meets_floor]
        if met:
            best = min(met, key=lambda c: (c.drop, c.latency_ms or 0.0))
        else:
            best = min(trained, key=lambda c: _shortfall(c, target, config.max_drop))
        chosen = self.update(best, replace(best, chosen=True))
        plain = _plain_recipe(self.recipe, chosen, self.templates)
        self.progress.close()
        log.info(
            "search: %s; running its recipe", _describe(chosen, target, bool(met), config.max_drop)
        )
        report = run(plain, out=out)
        final = report.final
        measured_p50: float | None = final.latency_ms.p50
        if config.runtime:
            row = final.runtimes.get(config.runtime)
            measured_p50 = row["latency_ms"].p50 if row else None
        error = (
            measured_p50 / chosen.latency_ms_predicted - 1.0
            if measured_p50 and chosen.latency_ms_predicted
            else None
        )
        on_test = _on_test(report, target, config, measured_p50)
        result = SearchResult(
            report, self.candidates, chosen, bool(met), target, error, config, on_test
        )
        base_score = self.task.summarize(self.base_rows)[self.task.metric]
        _write(result, config, base_score, self.base_cost, time.monotonic() - self.started)
        (log.info if met else log.warning)("search: %s", result.summary)
        return result


__all__ = ["SearchConfig", "SearchResult", "search"]
