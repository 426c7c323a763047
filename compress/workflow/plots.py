"""Charts (matplotlib, an optional extra that `make setup` installs): a run's chain of
stages, the Pareto plot across runs, and the per-layer sensitivity bars.

Every function returns the path it wrote, or None (with a line on stderr) when
matplotlib is missing: a chart is never worth failing a run for.
"""

from __future__ import annotations

import sys
from pathlib import Path

from compress.core.storage import write_atomic


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt
    except ImportError:
        print(
            "matplotlib is not installed: no chart (pip install 'compress[plot]')", file=sys.stderr
        )
        return None
    return plt


def _save(fig, plt, path: Path) -> Path:
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)
    return path


def chain_chart(evaluations: list, path: str | Path, title: str) -> Path | None:
    """The task's metric and p50 latency after each step of one run (baseline first).

    Example:
        >>> chain_chart(report.evaluations, "runs/x/chain.png", "resnet_full")
    """
    plt = _pyplot()
    if plt is None:
        return None
    names = [e.name for e in evaluations]
    steps = range(len(names))
    fig, accuracy_axis = plt.subplots(figsize=(max(5.0, 1.6 * len(names)), 3.6))
    scores = [e.score if e.score is not None else float("nan") for e in evaluations]
    metric = evaluations[0].metric
    accuracy_axis.plot(steps, scores, "o-", color="tab:blue", label=metric)
    lower = "" if evaluations[0].higher_is_better else ", lower is better"
    accuracy_axis.set_ylabel(f"{metric} (test split{lower})", color="tab:blue")
    latency_axis = accuracy_axis.twinx()
    latency_axis.plot(
        steps, [e.latency_ms.p50 for e in evaluations], "s--", color="tab:red", label="p50 ms"
    )
    latency_axis.set_ylabel(f"p50 latency (ms, batch {evaluations[0].batch_size})", color="tab:red")
    latency_axis.set_ylim(bottom=0)
    accuracy_axis.set_xticks(list(steps), names, rotation=20, ha="right")
    accuracy_axis.set_title(title)
    return _save(fig, plt, Path(path))


def pareto_chart(rows: list[dict], path: str | Path) -> Path | None:
    """The task's metric against p50 latency, one point per run (marker area by artifact
    size), the baselines marked, and each metric's Pareto front (no other point both faster
    and better: higher top-1 or mIoU, lower loss).

    ``rows`` are the summary's: ``run``, ``metric``, ``score``, ``higher_is_better``
    (True where absent), ``p50_ms``, ``size_mb``, ``baseline``.
    """
    plt = _pyplot()
    if plt is None:
        return None
    points = [r for r in rows if r["score"] is not None]
    fig, axis = plt.subplots(figsize=(7.5, 5))
    largest = max((r["size_mb"] for r in points), default=1.0) or 1.0
    for r in points:
        area = 30 + 400 * r["size_mb"] / largest
        if r["baseline"]:
            axis.scatter(r["p50_ms"], r["score"], s=area, marker="*", color="black", zorder=3)
        else:
            axis.scatter(r["p50_ms"], r["score"], s=area, alpha=0.6, zorder=2)
    on_front: set[tuple[float, float]] = set()
    metrics = sorted({_better(r) for r in points})
    for metric, higher in metrics:  # runs of different metrics never beat one another
        mine = [(r["p50_ms"], r["score"]) for r in points if _better(r) == (metric, higher)]
        front = pareto_front(mine, higher_is_better=higher)
        on_front.update(front)
        if front:
            xs, ys = zip(*front, strict=True)
            label = "Pareto front" + (f" ({metric})" if len(metrics) > 1 else "")
            axis.step(xs, ys, where="post", color="tab:green", label=label)
    if on_front:
        axis.legend(loc="best")
    axis.set_xscale("log")
    axis.set_xlabel("p50 latency (ms, log scale; each model in its fastest runtime)")
    axis.set_ylabel(
        " / ".join(f"{m} ({'higher' if h else 'lower'} is better)" for m, h in metrics) or "score"
    )
    axis.set_title("metric against latency (marker area: artifact size; star: baseline)")
    # Runs on the front and baselines are labelled first, so they get the nearest places.
    points.sort(key=lambda r: (r["p50_ms"], r["score"]) not in on_front and not r["baseline"])
    _label_apart(fig, axis, [(r["run"], (r["p50_ms"], r["score"])) for r in points])
    return _save(fig, plt, Path(path))


def _better(row: dict) -> tuple[str, bool]:
    """A summary row's metric and whether higher is better (summaries from before: top-1)."""
    return row.get("metric", "top-1"), bool(row.get("higher_is_better", True))


def _label_apart(fig, axis, labels: list[tuple[str, tuple[float, float]]]) -> None:
    """Each label beside its point, at the nearest of a few places that overlaps no label
    placed before it, the legend or the frame; the first place when none is free."""
    fig.canvas.draw()  # final axis limits, and a renderer to measure text with
    renderer = fig.canvas.get_renderer()
    frame = axis.get_window_extent(renderer)
    legend = axis.get_legend()
    taken = [legend.get_window_extent(renderer)] if legend is not None else []
    places = [
        (dx, dy) for step in range(4) for dy in (3 + 10 * step, -9 - 10 * step) for dx in (4, -4)
    ]
    for text, xy in labels:
        for attempt, (dx, dy) in enumerate(places + [places[0]]):
            note = axis.annotate(
                text,
                xy,
                fontsize=7,
                xytext=(dx, dy),
                textcoords="offset points",
                ha="left" if dx > 0 else "right",
            )
            box = note.get_window_extent(renderer)
            inside = (
                frame.x0 <= box.x0
                and box.x1 <= frame.x1
                and frame.y0 <= box.y0
                and box.y1 <= frame.y1
            )
            free = inside and not any(box.overlaps(other) for other in taken)
            if free or attempt == len(places):
                break
            note.remove()
        taken.append(box)


def pareto_front(
    points: list[tuple[float, float]], higher_is_better: bool = True
) -> list[tuple[float, float]]:
    """The (latency, metric) points no other point beats on both, fastest first: a higher
    metric is better (top-1), or with ``higher_is_better=False`` a lower one (a loss).

    Example:
        >>> pareto_front([(1, 90), (2, 91), (3, 89)])
        [(1, 90), (2, 91)]
        >>> pareto_front([(1, 1.6), (2, 1.5), (3, 1.7)], higher_is_better=False)
        [(1, 1.6), (2, 1.5)]
    """
    sign = 1.0 if higher_is_better else -1.0  # the front of the metric made higher-is-better
    front, best = [], float("-inf")
    for latency, score in sorted(points, key=lambda p: (p[0], -sign * p[1])):
        if sign * score > best:
            front.append((latency, score))
            best = sign * score
    return front


def sensitivity_chart(rows: list[dict], path: str | Path, title: str) -> Path | None:
    """Accuracy drop and SQNR per layer, one layer quantized at a time."""
    plt = _pyplot()
    if plt is None:
        return None
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(6, 0.35 * len(rows)), 6), sharex=True)
    names = [r["layer"] for r in rows]
    top.bar(names, [r["drop"] for r in rows], color="tab:red")
    top.set_ylabel("accuracy drop (pts)")
    top.set_title(title)
    bottom.bar(names, [min(r["sqnr_db"], 99.0) for r in rows], color="tab:blue")
    bottom.set_ylabel("logits SQNR (dB)")
    bottom.tick_params(axis="x", labelrotation=90)
    return _save(fig, plt, Path(path))


def roofline_chart(result: dict, path: str | Path, title: str) -> Path | None:
    """Layers on this machine's measured roofline: achieved GFLOP/s against arithmetic
    intensity (log-log), marker area by time share; the whole model as a star."""
    plt = _pyplot()
    if plt is None:
        return None
    peaks = result["peaks"]
    bandwidth = peaks["bandwidth_gbs"]
    rows = [r for r in result["layers"] if r["intensity"] > 0 and r["gflops"] > 0]
    fig, axis = plt.subplots(figsize=(7.5, 5))
    low = min([r["intensity"] for r in rows] + [0.1]) / 2
    high = max([r["intensity"] for r in rows] + [1000.0]) * 2
    for label, peak, style in (
        ("FP32 GEMM peak", peaks["fp32_gflops"], "-"),
        ("INT8 GEMM peak", peaks["int8_gops"], ":"),
    ):
        ridge = peak / bandwidth
        axis.plot(
            [low, ridge, high], [low * bandwidth, peak, peak], style, color="gray", label=label
        )
    for r in rows:
        axis.scatter(r["intensity"], r["gflops"], s=20 + 600 * r["time_share"], alpha=0.5)
    for r in sorted(rows, key=lambda r: r["time_share"], reverse=True)[:6]:
        axis.annotate(r["layer"], (r["intensity"], r["gflops"]), fontsize=7)
    whole = result["model"]
    axis.scatter(
        whole["intensity"], whole["gflops"], marker="*", s=250, color="black", label="whole model"
    )
    axis.set_xscale("log")
    axis.set_yscale("log")
    axis.set_xlabel("arithmetic intensity (FLOP per byte moved)")
    axis.set_ylabel("achieved GFLOP/s")
    axis.set_title(f"{title}: roofline ({peaks['threads']} threads, measured peaks)")
    axis.legend(loc="lower right", fontsize=8)
    return _save(fig, plt, Path(path))
