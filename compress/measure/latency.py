"""Latency: percentiles of one model's timed calls, and paired rounds that time two models
in turns, so that a shared machine's drifting speed cancels out of their ratio.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import cast

import numpy as np
import torch
from torch import nn

from compress.core.stats import median_interval
from compress.data import Data
from compress.measure.deploy import ExportError, deployed, deployed_files
from compress.measure.scores import metrics
from compress.models.detector import SplitDetector
from compress.spec.recipe import EvaluateConfig, as_config
from compress.spec.tasks import get_task

# Seconds each turn of a paired latency round warms its model first: long enough for the
# other runtime's threads to go idle (50 ms removed the bias measured with 10-call rounds).
ROUND_WARMUP_S = 0.05
# A deployed model whose top-1 strays further than this (points) from the torch model's
# gets a note: on 10,000 test images 0.1 points is 10 images.
RUNTIME_TOP1_TOLERANCE = 0.1


@dataclass(frozen=True)
class Latency:
    """Per-call wall time of one model, in ms, over the timed calls.

    Example:
        >>> Latency.from_dict({"p50": 0.5, "p90": 0.6, "p99": 0.9, "mean": 0.55}).p50
        0.5
    """

    p50: float
    p90: float
    p99: float
    mean: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> Latency:
        return cls(*(float(raw[k]) for k in ("p50", "p90", "p99", "mean")))


@dataclass(frozen=True)
class LatencyRatio:
    """One model's p50 against another's from alternating rounds: the median round ratio,
    its 95 % interval (distribution-free) and the number of rounds.

    Example:
        >>> LatencyRatio(0.8, (0.75, 0.86), 9).interval[1] < 1.0   # faster beyond noise
        True
    """

    p50: float
    interval: tuple[float, float]
    rounds: int

    def to_dict(self) -> dict:
        return {"p50": self.p50, "interval": list(self.interval), "rounds": self.rounds}

    @classmethod
    def from_dict(cls, raw: dict) -> LatencyRatio:
        low, high = raw["interval"]
        return cls(float(raw["p50"]), (float(low), float(high)), int(raw["rounds"]))


def paired_latency_ratio(
    baseline, model, config: EvaluateConfig | dict | None = None
) -> LatencyRatio:
    """p50 of ``model`` against ``baseline`` from alternating rounds, with a 95 % interval.

    Each is a ``(callable, batch)`` pair. Every round times both, in turn (the order
    alternates from round to round, so a slow drift of the machine weighs on both alike),
    and takes the ratio of their medians; the result is the median round ratio and a
    distribution-free interval for it (compress.core.stats.median_interval). Each turn first
    warms its model for ROUND_WARMUP_S: another runtime's threads keep the cores busy for
    tens of milliseconds after its last call (ONNX Runtime's spin), which made whichever
    model came second look slower (measured: ORT FP32 against OpenVINO FP32 read 0.74x in
    10-call rounds, 1.13x alone and with the warm-up).

    Example:
        >>> paired_latency_ratio((model, x), (quantized, x)).interval
    """
    config = as_config("evaluate", config or {})
    calls = max(10, config.iterations // config.latency_rounds)
    ratios = []
    for round_ in range(config.latency_rounds):
        order = (baseline, model) if round_ % 2 == 0 else (model, baseline)
        p50 = {
            id(f): measure_latency(f[0], f[1], 2, calls, warmup_s=ROUND_WARMUP_S).p50 for f in order
        }
        ratios.append(p50[id(model)] / p50[id(baseline)])
    low, high = median_interval(ratios)
    return LatencyRatio(float(np.median(ratios)), (low, high), len(ratios))


def measure_runtimes(
    model: nn.Module,
    data: Data,
    config: EvaluateConfig,
    runtimes: list[str],
    threads: int,
    deploy_to: str | Path | None,
    notes: list[str],
    torch_score: float | None = None,
    modules: dict | None = None,
) -> dict[str, dict]:
    """Latency (and, given torch's ``torch_score``, the task's metric on the test split) of
    ``model`` in each runtime of ``runtimes``.

    Each deployment's outputs are checked against the torch model's on the latency batch
    (``max_abs_diff``); a metric more than :data:`RUNTIME_TOP1_TOLERANCE` points from torch's
    gets a note naming the precision the runtime ran in. A runtime the model cannot reach
    gets one line in ``notes``. ``modules``, when given, keeps each runtime's deployment.
    """
    task = get_task(data.task)
    batch = data.example_input(config.latency_batch_size)
    with torch.inference_mode():
        expected = task.output(model(batch))
    scratch = Path(tempfile.mkdtemp(prefix="compress-deploy-")) if deploy_to is None else None
    rows: dict[str, dict] = {}
    try:
        for runtime in runtimes:
            if runtime == "inductor" and getattr(model, "compiles_itself", False):
                continue  # the torch row already is the compiled model
            stem = Path(deploy_to) if deploy_to is not None else cast(Path, scratch) / "model"
            try:
                module = deployed(model, runtime, threads, batch, stem)
                latency = measure_latency(module, batch, config.warmup, config.iterations)
                with torch.inference_mode():
                    difference = task.difference(task.output(module(batch)), expected)
                score = None
                if torch_score is not None and runtime != "inductor":  # inductor: torch's numbers
                    score = metrics(module, data, "cpu", shard=False)[task.metric]
            except ExportError as error:
                notes.append(f"not measured in {runtime}: {error}")
                continue
            row = {
                "latency_ms": latency,
                "score": score,
                "max_abs_diff": difference,
                "precision": getattr(module, "precision", "as in torch"),
            }
            file: Path | None = getattr(module, "file", None)  # a runtime's own model file
            if file is not None:
                row["file"] = file.name if deploy_to is not None else None
                row["size_bytes"] = sum(f.stat().st_size for f in deployed_files(file))
            rows[runtime] = row
            network = time_network(module, batch, config)
            if network is not None:
                row["network_p50_ms"] = network
            if modules is not None:
                modules[runtime] = module
            if (
                score is not None
                and torch_score is not None
                and abs(score - torch_score) > RUNTIME_TOP1_TOLERANCE
            ):
                notes.append(
                    f"{task.metric} in {runtime} is {score - torch_score:+.2f} points from torch's"
                    f" ({score:.2f} vs {torch_score:.2f} %): it runs in {row['precision']},"
                    " with its own rounding of activations"
                )
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    return rows


def time_network(module: nn.Module, batch: torch.Tensor, config: EvaluateConfig) -> float | None:
    """A split detector's network alone: its p50 in ms on the batch it takes (the images
    resized), or None for any other model."""
    if not isinstance(module, SplitDetector):
        return None
    network = module.network
    return measure_latency(network, module.resized(batch), config.warmup, config.iterations).p50


def network_note(runtimes: dict[str, dict]) -> str | None:
    """What a detector's post-processing costs in each runtime, in words, or None."""
    pairs = [
        f"{name} {row['network_p50_ms']:.2f}/{row['latency_ms'].p50:.2f}"
        for name, row in runtimes.items()
        if row.get("network_p50_ms") is not None
    ]
    if not pairs:
        return None
    return (
        f"network alone / end to end, p50 ms: {', '.join(pairs)} (resizing, anchors, box"
        " decoding and NMS run in torch after the network, in every runtime)"
    )


def measure_latency(
    model: nn.Module,
    batch: torch.Tensor,
    warmup: int = 10,
    iterations: int = 100,
    warmup_s: float = 0.0,
) -> Latency:
    """Per-call wall time in ms (p50, p90, p99, mean) after ``warmup`` untimed calls, and
    more of them until ``warmup_s`` seconds have passed.

    Example:
        >>> measure_latency(model, torch.randn(1, 1, 28, 28), iterations=50).p50
    """
    cuda = batch.is_cuda
    with torch.inference_mode():
        warm_until = time.perf_counter() + warmup_s
        calls = 0
        while calls < warmup or time.perf_counter() < warm_until:
            model(batch)
            calls += 1
        times = []
        for _ in range(iterations):
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            model(batch)
            if cuda:
                torch.cuda.synchronize()
            times.append((time.perf_counter() - start) * 1e3)
    p50, p90, p99 = np.percentile(times, [50, 90, 99])
    return Latency(float(p50), float(p90), float(p99), float(np.mean(times)))
