"""The report: ``report.json`` (the schema in the README), ``report.md`` and the console table."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from compress.artifact import write_atomic
from compress.evaluate import Evaluation


@dataclass
class Report:
    """Every evaluation of one run, baseline first, with where they were measured."""

    recipe: str
    environment: dict
    evaluations: list[Evaluation] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # run-level remarks (targets missed, ...)
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
            "notes": self.notes,
        }

    def rows(self) -> list[dict[str, str]]:
        """One row per evaluation with figures and ratios against the baseline, as text."""
        base = self.baseline
        rows = []
        for e in self.evaluations:
            drop = e.accuracy_drop["points"] if e.accuracy_drop else None
            rows.append(
                {
                    "step": e.name,
                    "top-1 %": _num(e.accuracy_top1, ".2f"),
                    "drop pts": _num(drop, "+.2f") if e is not base else "",
                    "size MB": f"{e.size_bytes / 1e6:.2f}",
                    "size x": _ratio(e.size_bytes, base.size_bytes),
                    "params": _count(e.params),
                    "non-zero": _count(e.nonzero_params),
                    "MACs": f"{_count(e.macs)} {e.compute_dtype}",
                    "MACs x": _ratio(e.macs, base.macs),
                    "mem access MB": f"{e.memory_access_bytes / 1e6:.2f}",
                    "p50 ms": f"{e.latency_ms['p50']:.3f}",
                    "p90 ms": f"{e.latency_ms['p90']:.3f}",
                    "p99 ms": f"{e.latency_ms['p99']:.3f}",
                    "p50 x": _ratio(e.latency_ms["p50"], base.latency_ms["p50"]),
                    "img/s": f"{e.throughput_per_s:.0f}",
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
        lines += [f"note ({e.name}): {n}" for e in self.evaluations for n in e.notes]
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
            "Ratios (x) are against the baseline: below 1 is smaller or faster.",
            "",
            "| " + " | ".join(headers) + " |",
            "|" + "---|" * len(headers),
        ]
        out += ["| " + " | ".join(r[h] for h in headers) + " |" for r in rows]
        notes = [f"- **{e.name}**: {n}" for e in self.evaluations for n in e.notes]
        notes += [f"- {n}" for n in self.notes]
        if notes:
            out += ["", "## Notes", "", *notes]
        for e in self.evaluations:
            layers = e.details.get("layers")
            if layers:
                out += [
                    "",
                    f"## {e.name}: per layer",
                    "",
                    "| layer | channels before | channels after | sparsity before | sparsity after |",
                    "|---|---|---|---|---|",
                ]
                out += [
                    f"| {r['layer']} | {r['channels_before']} | {r['channels_after']} |"
                    f" {100 * r['sparsity_before']:.1f} % | {100 * r['sparsity_after']:.1f} % |"
                    for r in layers
                ]
        return "\n".join(out) + "\n"

    def write(self, folder: str | Path) -> None:
        """Write ``report.json`` and ``report.md`` into ``folder``, each atomically."""
        folder = Path(folder)
        write_atomic(folder / "report.json", json.dumps(self.to_dict(), indent=2))
        write_atomic(folder / "report.md", self.markdown())


def _num(value: float | None, fmt: str) -> str:
    return "n/a" if value is None else format(value, fmt)


def _ratio(value: float, base: float) -> str:
    return f"{value / base:.2f}" if base else "n/a"


def _count(n: int) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)
