"""The report: ``report.json`` (the schema in the README), ``report.md`` and the console table."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

from compress.errors import ReportError
from compress.evaluate import Evaluation
from compress.plots import chain_chart, pareto_chart, roofline_chart
from compress.storage import write_atomic
from compress.tasks import TASKS, get_task


@dataclass
class Report:
    """Every evaluation of one run, baseline first, with where they were measured."""

    recipe: str
    environment: dict
    evaluations: list[Evaluation] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # run-level remarks (targets missed, ...)
    # The baseline trained for the stages' steps (evaluate.control), or None.
    control: Evaluation | None = None
    run_dir: Path | None = None  # where `run` wrote it; not part of report.json

    @property
    def baseline(self) -> Evaluation:
        return self.evaluations[0]

    @property
    def final(self) -> Evaluation:
        return self.evaluations[-1]

    def to_dict(self) -> dict:
        return {
            "recipe": self.recipe,
            "environment": self.environment,
            "evaluations": [e.to_dict() for e in self.evaluations],
            "control": self.control.to_dict() if self.control else None,
            "notes": self.notes,
        }

    @property
    def rows_evaluated(self) -> list[Evaluation]:
        """Every evaluation of the tables: the steps, then the control when there is one."""
        return self.evaluations + ([self.control] if self.control else [])

    def rows(self) -> list[dict[str, str]]:
        """One row per evaluation with figures and ratios against the baseline, as text."""
        base = self.baseline
        rows = []
        for e in self.rows_evaluated:
            drop = e.drop or {}
            control = (e.control or {}).get("drop") or {}
            rows.append(
                {
                    "step": e.name,
                    _metric_column(base): _num(e.score, ".2f"),
                    "drop pts": _num(drop.get("points"), "+.2f") if e is not base else "",
                    "95 % CI": _interval(drop.get("interval"), "+.2f"),
                    "lost/gained": _flips(drop),
                    "drop vs control": _num(control.get("points"), "+.2f") if control else "",
                    "size MB": f"{e.size_bytes / 1e6:.2f}",
                    "size x": _ratio(e.size_bytes, base.size_bytes),
                    "params": _count(e.params),
                    "non-zero": _count(e.nonzero_params),
                    "MACs": f"{_count(e.macs)} {e.compute_dtype}",
                    "MACs x": _ratio(e.macs, base.macs),
                    "mem access MB": f"{e.memory_access_bytes / 1e6:.2f}",
                    "runtime": e.runtime,
                    "p50 ms": f"{e.latency_ms['p50']:.3f}",
                    "p90 ms": f"{e.latency_ms['p90']:.3f}",
                    "p99 ms": f"{e.latency_ms['p99']:.3f}",
                    "p50 x": _latency_ratio(e, base),
                    "img/s": f"{e.throughput_per_s:.0f}",
                    "torch p50 ms": _num(_runtime_p50(e, "torch"), ".3f"),
                }
            )
        return rows

    def table(self) -> str:
        """A fixed-width table for the console."""
        rows = self.rows()
        headers = list(rows[0])
        widths = {h: max(len(h), *(len(r[h]) for r in rows)) for h in headers}
        lines = ["  ".join(h.rjust(widths[h]) for h in headers)]
        lines += ["  ".join(r[h].rjust(widths[h]) for h in headers) for r in rows]
        lines += [f"note ({e.name}): {n}" for e in self.rows_evaluated for n in e.notes]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def markdown(self) -> str:
        rows = self.rows()
        headers = list(rows[0])
        base = self.baseline
        env = self.environment
        out = [
            f"# {self.recipe}",
            "",
            f"Measured on {env.get('cpu')} ({env.get('device')}), {base.threads} threads,"
            f" latency at batch {base.batch_size}; torch {env.get('torch')}, torchao {env.get('torchao')}.",
            "Ratios (x) are against the baseline: below 1 is smaller or faster. Latency is"
            " each model's fastest runtime (named), so p50 x compares best deployment with"
            " best deployment; `torch p50 ms` is the model as PyTorch runs it uncompiled"
            " (INT8 models compile themselves), for reference. A drop, in points of"
            f" {base.metric}, is paired example by example with the baseline: its 95 %"
            f" interval is {get_task(base.task).interval_method if base.task in TASKS else 'paired'}"
            " (for top-1, exact McNemar conditional on the images that flipped; lost/gained"
            " count them), and p50 x is the median of alternating rounds with its 95 %"
            " interval where both were timed in this run.",
            "",
            *markdown_table(headers, [[r[h] for h in headers] for r in rows]),
        ]
        out += self._runtime_section()
        notes = [f"- **{e.name}**: {n}" for e in self.rows_evaluated for n in e.notes]
        notes += [f"- {n}" for n in self.notes]
        if notes:
            out += ["", "## Notes", "", *notes]
        profiled = [e for e in self.evaluations if e.details.get("profile")]
        if profiled:
            peaks = profiled[0].details["profile"]["peaks"]
            out += [
                "",
                "## Where the time goes",
                "",
                f"Peaks measured on this machine ({peaks['threads']} threads): FP32 GEMM"
                f" {peaks['fp32_gflops']:.0f} GFLOP/s, INT8 GEMM {peaks['int8_gops']:.0f} GOP/s,"
                f" copy {peaks['bandwidth_gbs']:.1f} GB/s. Achieved, from the p50:",
                "",
            ]
            out += [
                f"- **{e.name}**: {e.gflops_per_s:.2f} GFLOP/s,"
                f" {100 * e.details['profile']['peak_share']:.1f} % of the"
                f" {'INT8' if e.compute_dtype == 'int8' else 'FP32'} peak"
                for e in profiled
            ]
            for e in profiled:
                layers = e.details["profile"]["layers"]
                if layers:
                    out += [
                        "",
                        f"{e.name}, the costliest layers (`python -m compress profile` for all):",
                        "",
                        *markdown_table(
                            ["layer", "type", "output", "MACs", "FLOP/byte", "time share", "bound"],
                            [
                                [
                                    r["layer"],
                                    r["type"],
                                    r["output"],
                                    _count(r["macs"]),
                                    f"{r['intensity']:.1f}",
                                    f"{100 * r['time_share']:.1f} %",
                                    r["bound"],
                                ]
                                for r in layers
                            ],
                        ),
                    ]
        for e in self.evaluations:
            layers = e.details.get("layers")
            if layers:
                columns = list(layers[0])
                out += [
                    "",
                    f"## {e.name}: per layer",
                    "",
                    *markdown_table(
                        [c.replace("_", " ") for c in columns],
                        [[_cell(c, r.get(c)) for c in columns] for r in layers],
                    ),
                ]
        return "\n".join(out) + "\n"

    def _runtime_section(self) -> list[str]:
        """Each model in each runtime: latency, the task's metric and its drop against the
        baseline in the same runtime, the largest output difference from torch, the file."""
        rows = [
            [
                e.name,
                name,
                f"{r['latency_ms']['p50']:.3f}",
                _ratio(r["latency_ms"]["p50"], self.baseline.latency_ms["p50"]),
                _num(r.get("score"), ".2f"),
                _num(r.get("drop_points"), "+.2f"),
                _num(r.get("max_abs_diff"), ".2g"),
                str(r.get("precision", "")),
                f"{r['file']} ({r['size_bytes'] / 1e6:.2f} MB)" if r.get("file") else "",
            ]
            for e in self.evaluations
            for name, r in e.runtimes.items()
        ]
        if len(rows) <= len(self.evaluations):  # torch alone: the main table says it all
            return []
        return [
            "",
            "## Per runtime",
            "",
            "p50 x is against the baseline's fastest runtime; the drop is against the baseline"
            " in the same runtime; max |Δ| is the largest logit difference from the torch model"
            " on the latency batch.",
            "",
            *markdown_table(
                [
                    "step",
                    "runtime",
                    "p50 ms",
                    "p50 x",
                    _metric_column(self.baseline),
                    "drop pts",
                    "max |Δ|",
                    "precision",
                    "file",
                ],
                rows,
            ),
        ]

    def write(self, folder: str | Path) -> None:
        """Write ``report.md``, (for a chain of stages) ``chain.png`` — the accuracy and
        latency after each step, embedded in ``report.md`` — and last ``report.json``, the
        file that marks a run finished."""
        folder = Path(folder)
        markdown = self.markdown()
        if len(self.evaluations) > 1 and chain_chart(
            self.evaluations, folder / "chain.png", f"{self.recipe}: after each step"
        ):
            title_end = markdown.index("\n") + 1
            markdown = (
                markdown[:title_end]
                + "\n![accuracy and latency after each step](chain.png)\n"
                + markdown[title_end:]
            )
        write_atomic(folder / "report.md", markdown)
        write_atomic(folder / "report.json", json.dumps(self.to_dict(), indent=2))

    @classmethod
    def read(cls, folder: str | Path) -> Report:
        """The report a run wrote into ``folder``.

        Example:
            >>> report = Report.read("runs/resnet_int8/20261128-120000")
        """
        file = Path(folder) / "report.json"
        try:
            raw = json.loads(file.read_text())
            report = cls(raw["recipe"], raw["environment"], notes=list(raw.get("notes", [])))
            report.evaluations = [Evaluation.from_dict(e) for e in raw["evaluations"]]
            report.control = Evaluation.from_dict(raw["control"]) if raw.get("control") else None
            if not report.evaluations:
                raise ValueError("no evaluations")
        except (OSError, ValueError, KeyError, TypeError, RecursionError) as error:
            reason = f"{type(error).__name__}: {str(error).strip()[:200]}"
            raise ReportError(f"{file} is not a report compress wrote ({reason})") from None
        report.run_dir = Path(folder)
        return report


def _metric_column(evaluation: Evaluation) -> str:
    """The table column of the task's metric: "top-1 %", "mIoU %"."""
    unit = get_task(evaluation.task).unit if evaluation.task in TASKS else ""
    return f"{evaluation.metric} {unit}".strip()


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
    rows, baselines = [], {}
    for report in reports:
        base, final = report.baseline, report.final
        drop = final.drop or {}
        control = final.control or {}
        rows.append(
            {
                "run": report.run_dir.name if report.run_dir else report.recipe,
                "chain": " → ".join(e.name for e in report.evaluations[1:]) or "baseline",
                "metric": final.metric,
                "score": final.score,
                "drop_pts": drop.get("points"),
                "drop_ci": _interval(drop.get("interval"), "+.2f"),
                "lost_gained": _flips(drop),
                "control_score": control.get("score") if control.get("steps") else None,
                "drop_vs_control": (control.get("drop") or {}).get("points")
                if control.get("steps")
                else None,
                "p50_ms": final.latency_ms["p50"],
                "runtime": final.runtime,
                "size_mb": final.size_bytes / 1e6,
                "macs_m": final.macs / 1e6,
                "p50_x": (final.latency_ratio or {}).get("p50")
                or final.latency_ms["p50"] / base.latency_ms["p50"],
                "p50_x_ci": _interval((final.latency_ratio or {}).get("interval"), ".2f"),
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
                "p50_ms": base.latency_ms["p50"],
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
            f"- {b['run']}, {b['metric']} {_num(b['score'], '.2f')}:"
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


def markdown_table(headers: list[str], rows: list[list[str]]) -> list[str]:
    """The lines of a markdown table (cells already formatted as text).

    Example:
        >>> markdown_table(["a", "b"], [["1", "2"]])
        ['| a | b |', '|---|---|', '| 1 | 2 |']
    """
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _cell(column: str, value) -> str:
    """A per-layer table cell: fractions of zeros as percentages, counts in k/M."""
    if isinstance(value, float):
        return f"{100 * value:.1f} %" if "sparsity" in column else f"{value:.3g}"
    if isinstance(value, int) and not isinstance(value, bool) and column != "bits":
        return _count(value)
    return str(value)


def _runtime_p50(e: Evaluation, runtime: str) -> float | None:
    row = e.runtimes.get(runtime)
    return row["latency_ms"]["p50"] if row else None


def _interval(bounds: list[float] | None, fmt: str) -> str:
    if not bounds:
        return ""
    return f"[{format(bounds[0], fmt)}, {format(bounds[1], fmt)}]"


def _flips(drop: dict) -> str:
    return f"{drop['lost']}/{drop['gained']}" if "lost" in drop else ""


def _latency_ratio(e: Evaluation, base: Evaluation) -> str:
    """The paired ratio with its interval where the run timed both side by side."""
    if e.latency_ratio:
        return f"{e.latency_ratio['p50']:.2f} {_interval(e.latency_ratio['interval'], '.2f')}"
    return _ratio(e.latency_ms["p50"], base.latency_ms["p50"])


def _num(value: float | None, fmt: str) -> str:
    return "n/a" if value is None else format(value, fmt)


def _ratio(value: float, base: float) -> str:
    return f"{value / base:.2f}" if base else "n/a"


def _count(n: int) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def profile_markdown(result: dict) -> str:
    """The breakdown as a markdown section."""
    peaks, whole = result["peaks"], result["model"]
    headers = ["layer", "type", "output", "params", "MACs", "bytes", "FLOP/byte", "time share"]
    headers += ["GFLOP/s", "% of roof", "bound", "downsamples"]
    rows = [
        [
            r["layer"],
            r["type"],
            r["output"],
            f"{r['params']:,}",
            f"{r['macs']:,}",
            f"{r['bytes']:,}",
            f"{r['intensity']:.1f}",
            f"{100 * r['time_share']:.1f} %",
            f"{r['gflops']:.2f}",
            f"{100 * r['roof_share']:.1f} %",
            r["bound"],
            "" if r["downsamples"] == 1.0 else f"{r['downsamples']:.0f}x",
        ]
        for r in result["layers"]
    ]
    lines = [
        f"Measured peaks on this machine ({peaks['threads']} threads): FP32 GEMM"
        f" {peaks['fp32_gflops']:.0f} GFLOP/s, INT8 GEMM {peaks['int8_gops']:.0f} GOP/s, copy"
        f" bandwidth {peaks['bandwidth_gbs']:.1f} GB/s; ridge point"
        f" {result['ridge_flops_per_byte']:.1f} FLOP/byte. The whole model"
        f" ({whole['compute_dtype']}): {whole['gflops']:.2f} GFLOP/s in the profiled layers,"
        f" {100 * whole['peak_share']:.1f} % of the peak, arithmetic intensity"
        f" {whole['intensity']:.1f} FLOP/byte.",
        "",
        *([f"Note: {result['note']}.", ""] if result.get("note") else []),
        *markdown_table(headers, rows),
    ]
    return "\n".join(lines) + "\n"


def write_profile(result: dict, folder: str | Path, title: str) -> list[Path]:
    """``profile.md``, ``profile.json`` and ``roofline.png`` in ``folder``."""
    folder = Path(folder)
    written = [folder / "profile.md", folder / "profile.json"]
    write_atomic(written[0], f"# {title}: where the cost goes\n\n" + profile_markdown(result))
    write_atomic(written[1], json.dumps(result, indent=1))
    chart = roofline_chart(result, folder / "roofline.png", title)
    return written + ([chart] if chart else [])
