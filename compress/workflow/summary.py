"""The cross-run summary: one row per run of `make experiments` (or `compress compare`),
ratios against each run's own baseline, written as results/summary.{md,csv}.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from compress.core.storage import write_atomic
from compress.workflow.plots import pareto_chart
from compress.workflow.report import Report
from compress.workflow.tables import flips, interval, markdown_table, num

# Columns of results/summary.{md,csv}: one row per run, ratios against that run's baseline.
SUMMARY_COLUMNS = [
    "run",
    "chain",
    "metric",
    "score",
    "drop_pts",
    "drop_ci",
    "lost_gained",
    "control_score",
    "drop_vs_control",
    "p50_ms",
    "runtime",
    "size_mb",
    "macs_m",
    "p50_x",
    "p50_x_ci",
    "size_x",
    "macs_x",
    "baseline_score",
]


_SUMMARY_FORMATS = {
    "score": ".2f",
    "drop_pts": "+.2f",
    "control_score": ".2f",
    "drop_vs_control": "+.2f",
    "p50_ms": ".3f",
    "size_mb": ".2f",
    "macs_m": ".1f",
    "p50_x": ".3f",
    "size_x": ".3f",
    "macs_x": ".3f",
    "baseline_score": ".2f",
}


def summarize(reports: list[Report]) -> list[dict]:
    """One summary row per run (named by its folder), plus, for the Pareto plot, one row per
    distinct baseline (``baseline: True``).

    Example:
        >>> rows = summarize([Report.read(d) for d in ["runs/a", "runs/b"]])
    """
    rows: list[dict] = []
    baselines: dict[tuple, dict] = {}
    for report in reports:
        base, final = report.baseline, report.final
        drop, control = final.drop, final.control or {}
        paired = final.latency_ratio
        rows.append(
            {
                "run": report.run_dir.name if report.run_dir else report.recipe,
                "chain": " → ".join(e.name for e in report.evaluations[1:]) or "baseline",
                "metric": final.metric,
                "score": final.score,
                "higher_is_better": final.higher_is_better,  # a language model's loss: lower
                "drop_pts": drop.points if drop else None,
                "drop_ci": interval(drop.interval if drop else None, "+.2f"),
                "lost_gained": flips(drop),
                "control_score": control.get("score") if control.get("steps") else None,
                "drop_vs_control": control["drop"].points
                if control.get("steps") and control.get("drop")
                else None,
                "p50_ms": final.latency_ms.p50,
                "runtime": final.runtime,
                "size_mb": final.size_bytes / 1e6,
                "macs_m": final.macs / 1e6,
                "p50_x": paired.p50 if paired else final.latency_ms.p50 / base.latency_ms.p50,
                "p50_x_ci": interval(paired.interval if paired else None, ".2f"),
                "size_x": final.size_bytes / base.size_bytes if base.size_bytes else None,
                "macs_x": final.macs / base.macs if base.macs else None,
                "baseline_score": base.score,
                "baseline": False,
            }
        )
        key = (base.params, base.macs, base.score)
        baselines.setdefault(
            key,
            {
                "run": f"baseline ({base.params / 1e6:.1f}M params)",
                "metric": base.metric,
                "score": base.score,
                "higher_is_better": base.higher_is_better,
                "p50_ms": base.latency_ms.p50,
                "size_mb": base.size_bytes / 1e6,
                "baseline": True,
                "description": report.environment.get("baseline", "not recorded"),
            },
        )
    return rows + list(baselines.values())


def write_summary(rows: list[dict], folder: str | Path, title: str = "Experiments") -> list[Path]:
    """``summary.md``, ``summary.csv`` and ``pareto.png`` in ``folder``; returns the paths."""
    folder = Path(folder)
    runs = [r for r in rows if not r["baseline"]]

    def cell(row: dict, column: str) -> str:
        value = row[column]
        return "" if value is None else format(value, _SUMMARY_FORMATS.get(column, "s"))

    table = [[cell(r, c) for c in SUMMARY_COLUMNS] for r in runs]
    lines = [
        f"# {title}",
        "",
        "One row per run; ratios (x) against that run's own baseline, below 1 is smaller or"
        " faster; score: the task's metric on the test split (top-1 for classification);"
        " drop in points of it (negative: a gain), with its 95 % interval (exact McNemar, with"
        " the test images lost/gained, for top-1; a paired bootstrap for other metrics);"
        " control: the baseline trained for the same steps as the run's stages"
        " (evaluate.control), and the drop against it.",
        "",
        *markdown_table(SUMMARY_COLUMNS, table),
        "",
        "Baselines (each run's own, before any stage):",
        "",
        *[
            f"- {b['run']}, {b['metric']} {num(b['score'], '.2f')}:"
            f" {b.get('description', 'not recorded')}"
            for b in rows
            if b["baseline"]
        ],
    ]
    written = [folder / "summary.md", folder / "summary.csv"]
    write_atomic(written[0], "\n".join(lines) + "\n")
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(SUMMARY_COLUMNS)
    writer.writerows(table)
    write_atomic(written[1], buffer.getvalue())
    chart = pareto_chart(rows, folder / "pareto.png")
    return written + ([chart] if chart else [])
