"""Markdown tables and their cells, as every report, summary and profile writes them."""

from __future__ import annotations

from collections.abc import Sequence

from compress.core.stats import Drop


def markdown_table(headers: list[str], rows: list[list[str]]) -> list[str]:
    """The lines of a markdown table (cells already formatted as text).

    Example:
        >>> markdown_table(["a", "b"], [["1", "2"]])
        ['| a | b |', '|---|---|', '| 1 | 2 |']
    """
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def cell(column: str, value) -> str:
    """A per-layer table cell: fractions of zeros as percentages, counts in k/M."""
    if isinstance(value, float):
        return f"{100 * value:.1f} %" if "sparsity" in column else f"{value:.3g}"
    if isinstance(value, int) and not isinstance(value, bool) and column != "bits":
        return count(value)
    return str(value)


def interval(bounds: Sequence[float] | None, fmt: str) -> str:
    if not bounds:
        return ""
    return f"[{format(bounds[0], fmt)}, {format(bounds[1], fmt)}]"


def flips(drop: Drop | None) -> str:
    return f"{drop.lost}/{drop.gained}" if drop and drop.lost is not None else ""


def num(value: float | None, fmt: str) -> str:
    return "n/a" if value is None else format(value, fmt)


def ratio(value: float, base: float) -> str:
    return f"{value / base:.2f}" if base else "n/a"


def count(n: int) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)
