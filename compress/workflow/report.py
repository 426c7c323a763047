"""The report: ``report.json`` (the schema in the README), ``report.md`` and the console table."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from compress.core.errors import ReportError
from compress.core.storage import write_atomic
from compress.measure.evaluation import Evaluation
from compress.measure.machine import describe_isa
from compress.spec.tasks import TASKS, get_task
from compress.workflow.plots import chain_chart, roofline_chart
from compress.workflow.tables import cell, count, flips, interval, markdown_table, num, ratio


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
            drop, control = e.drop, (e.control or {}).get("drop")
            rows.append(
                {
                    "step": e.name,
                    _metric_column(base): num(e.score, ".2f"),
                    "drop pts": num(drop.points, "+.2f") if drop and e is not base else "",
                    "95 % CI": interval(drop.interval if drop else None, "+.2f"),
                    "lost/gained": flips(drop),
                    "drop vs control": num(control.points, "+.2f") if control else "",
                    "size MB": f"{e.size_bytes / 1e6:.2f}",
                    "size x": ratio(e.size_bytes, base.size_bytes),
                    "params": count(e.params),
                    "non-zero": count(e.nonzero_params),
                    "MACs": f"{count(e.macs)} {e.compute_dtype}",
                    "MACs x": ratio(e.macs, base.macs),
                    "mem access MB": f"{e.memory_access_bytes / 1e6:.2f}",
                    "runtime": e.runtime,
                    "p50 ms": f"{e.latency_ms.p50:.3f}",
                    "p90 ms": f"{e.latency_ms.p90:.3f}",
                    "p99 ms": f"{e.latency_ms.p99:.3f}",
                    "p50 x": _latency_ratio(e, base),
                    "img/s": f"{e.throughput_per_s:.0f}",
                    "torch p50 ms": num(_runtime_p50(e, "torch"), ".3f"),
                    **_decode_columns(e, base),
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
            f"Measured on {env.get('cpu')} ({_where(env)}), {base.threads} threads,"
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
        out += self._profile_section()
        out += self._layer_sections()
        return "\n".join(out) + "\n"

    def _profile_section(self) -> list[str]:
        """Where the time goes: each profiled model against this machine's peaks, and its
        costliest layers."""
        out: list[str] = []
        profiled = [e for e in self.evaluations if e.details.get("profile")]
        if not profiled:
            return out
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
                                count(r["macs"]),
                                f"{r['intensity']:.1f}",
                                f"{100 * r['time_share']:.1f} %",
                                r["bound"],
                            ]
                            for r in layers
                        ],
                    ),
                ]
        return out

    def _layer_sections(self) -> list[str]:
        """What a stage did per layer (pruned widths, factorized layers), one table each."""
        out = []
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
                        [[cell(c, r.get(c)) for c in columns] for r in layers],
                    ),
                ]
        return out

    def _runtime_section(self) -> list[str]:
        """Each model in each runtime: latency, the task's metric and its drop against the
        baseline in the same runtime, the largest output difference from torch, the file."""
        rows = [
            [
                e.name,
                name,
                f"{r['latency_ms'].p50:.3f}",
                ratio(r["latency_ms"].p50, self.baseline.latency_ms.p50),
                num(r.get("score"), ".2f"),
                num(r.get("drop_points"), "+.2f"),
                num(r.get("max_abs_diff"), ".2g"),
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
        except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as error:
            reason = f"{type(error).__name__}: {str(error).strip()[:200]}"
            raise ReportError(f"{file} is not a report compress wrote ({reason})") from None
        report.run_dir = Path(folder)
        return report


def _metric_column(evaluation: Evaluation) -> str:
    """The table column of the task's metric: "top-1 %", "mIoU %"."""
    unit = get_task(evaluation.task).unit if evaluation.task in TASKS else ""
    return f"{evaluation.metric} {unit}".strip()


def _where(env: dict) -> str:
    """The device, and on a CPU the ISA that decides INT8 and bf16 speed."""
    features = describe_isa(env.get("isa"))
    return f"{env.get('device')}; {features}" if features else str(env.get("device"))


def _decode_columns(e: Evaluation, base: Evaluation) -> dict[str, str]:
    """A language model's decoding speed (its fastest runtime), where the baseline's was timed."""
    theirs = base.best_decode()
    if theirs is None:
        return {}
    mine, paired = e.best_decode(), e.decode_ratio
    speedup = ""
    if paired:  # alternating rounds against the baseline: the figure to read
        speedup = f"{paired['x']:.2f} {interval(paired['interval'], '.2f')}"
    elif mine:
        speedup = f"{mine[1] / theirs[1]:.2f}"
    return {"decode tok/s": f"{mine[1]:.0f} {mine[0]}" if mine else "", "decode x": speedup}


def _runtime_p50(e: Evaluation, runtime: str) -> float | None:
    row = e.runtimes.get(runtime)
    return row["latency_ms"].p50 if row else None


def _latency_ratio(e: Evaluation, base: Evaluation) -> str:
    """The paired ratio with its interval where the run timed both side by side."""
    if e.latency_ratio:
        return f"{e.latency_ratio.p50:.2f} {interval(e.latency_ratio.interval, '.2f')}"
    return ratio(e.latency_ms.p50, base.latency_ms.p50)


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
