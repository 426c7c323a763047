"""What a search says and writes: its progress line, the chosen chain in words, the
chosen model's figures on the test split, and search.json / search.md beside its run.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import TYPE_CHECKING

from compress.core.stats import Drop
from compress.core.storage import as_json, write_atomic
from compress.workflow.report import Report
from compress.workflow.search._candidate import Candidate, Cost
from compress.workflow.search._grid import _value

if TYPE_CHECKING:  # the package's own types; annotations only
    from compress.workflow.search import SearchConfig, SearchResult


def _best_so_far(candidates: list[Candidate]) -> str:
    best = min((c for c in candidates if c.trained), key=lambda c: c.drop)
    return f"best: {best.format} keep {best.keep:g} x{best.stretch}, drop {best.drop:+.2f}"


def _describe(chosen: Candidate, target: dict, met: bool, max_drop: float) -> str:
    chain = "distill"
    if chosen.keep < 1:  # the MACs reached, not the keep asked for: round_to's staircase
        chain = f"prune to {chosen.macs_x:.3g}x MACs (keep {chosen.keep:g}) → " + chain
    if chosen.stretch > 1:
        chain += f" ({chosen.stretch}x the recipe's epochs)"
    if chosen.format == "int8_static":
        chain += " → int8_static"
    figure = _value(chosen, target, "measured")
    drop = chosen.drop
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
    drop = final.drop
    ratio = final.latency_ratio.p50 if final.latency_ratio else None
    figure: float | None
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
        "drop": drop or {},  # search.json's form: {} where the final run kept no accuracy
        "meets_target": figure is not None and figure <= limit,
        "meets_floor": drop is not None and drop.points <= config.max_drop,
    }


def _unit(target: dict) -> str:
    return "x" if target["metric"] == "macs" else target["unit"]


def _write(
    result: SearchResult, config: SearchConfig, base_score, base_cost: Cost, seconds
) -> None:
    folder = result.report.run_dir
    assert folder is not None, "a search's final run has a run directory"
    metric = result.report.baseline.metric
    summary = {
        "config": dataclasses.asdict(config),
        "target": result.target,
        "met": result.met,
        "baseline": {"calibration_score": base_score, "metric": metric, **base_cost.to_dict()},
        "chosen": result.chosen,
        "latency_prediction_error": result.prediction_error,
        "on_test": result.on_test,
        "final": {
            "p50_ms": result.report.final.latency_ms.p50,
            "runtime": result.report.final.runtime,
            "score": result.report.final.score,
        },
        "minutes": seconds / 60,
        "candidates": result.candidates,
    }
    write_atomic(folder / "search.json", json.dumps(as_json(summary), indent=1, default=float))
    lines = [
        f"# Search: {result.report.recipe}",
        "",
        result.summary + ".",
        "",
        f"Baseline: {metric} {base_score:.2f} on the calibration split, p50 {base_cost.latency_ms:.3f}"
        f" ms in {base_cost.runtime}, {base_cost.size_mb:.2f} MB. Searched in"
        f" {seconds / 60:.1f} minutes. The chosen chain is `recipe.yaml`; `compress run`"
        " reproduces it; its test-split figures are in `report.md`.",
        "",
    ]
    if result.prediction_error is not None:
        lines += [
            f"Latency model: predicted {result.chosen.latency_ms_predicted:.3f} ms for the"
            f" chosen chain, measured {result.report.final.latency_ms.p50:.3f} ms by the final"
            f" run ({result.prediction_error:+.0%}).",
            "",
        ]
    lines += [
        "| keep MACs | format | distill x | MACs x | p50 ms predicted | p50 ms measured | size MB predicted"
        f" | size MB measured | calibration {metric} | drop pts [95 % CI] | chosen |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in result.candidates:
        latency, size = c.latency_ms, c.size_mb
        if c.probe is not None:
            latency = c.probe.latency_ms if latency is None else latency
            size = c.probe.size_mb if size is None else size
        lines.append(
            f"| {c.keep:g} | {c.format} | {c.stretch} | {c.macs_x:.3f}"
            f" | {_cell(c.latency_ms_predicted, '.3f')} | {_cell(latency, '.3f')}"
            f" | {_cell(c.size_mb_predicted, '.2f')} | {_cell(size, '.2f')}"
            f" | {_cell(c.calibration_score, '.2f')}"
            f" | {_drop_cell(c.calibration_drop) if c.calibration_drop else c.skipped or ''}"
            f" | {'yes' if c.chosen else ''} |"
        )
    write_atomic(folder / "search.md", "\n".join(lines) + "\n")


def _cell(value, fmt: str) -> str:
    return (
        ""
        if value is None or (isinstance(value, float) and math.isnan(value))
        else format(value, fmt)
    )


def _drop_cell(drop: Drop) -> str:
    low, high = drop.interval or (drop.points, drop.points)
    return f"{drop.points:+.2f} [{low:+.2f}, {high:+.2f}]"
