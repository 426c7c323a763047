"""The shared evaluator: one function measures the baseline and every compressed model.

Figures: parameters (total, non-zero), artifact size on disk, FLOPs/MACs
(``torch.utils.flop_counter``), memory-access bytes, latency percentiles, throughput,
achieved GFLOP/s, the task's metric (compress.tasks: top-1 for classification, mIoU for
segmentation, the user's own) and its paired drop against a baseline.

A compressed model tells the evaluator about itself (its notes, the reference module to
count FLOPs on when what runs is compiled, its stored parameter counts and element width)
through the protocol in traits.py.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from compress import distributed
from compress.artifact import save
from compress.data import Data
from compress.deploy import ExportError, available_runtimes, deployed, deployed_files
from compress.profile import count_memory_access, flop_counter, summary
from compress.recipe import EvaluateConfig, section
from compress.stats import median_interval, pack_rows, unpack, unpack_rows
from compress.tasks import Task, get_task
from compress.traits import traits

# A compressed model whose p50 is at least this fraction of the baseline's is "not faster":
# below ~5 % the difference is within run-to-run noise on a shared machine.
NOT_FASTER_RATIO = 0.95
# Seconds each turn of a paired latency round warms its model first: long enough for the
# other runtime's threads to go idle (50 ms removed the bias measured with 10-call rounds).
ROUND_WARMUP_S = 0.05
# A deployed model whose top-1 strays further than this (points) from the torch model's
# gets a note: on 10,000 test images 0.1 points is 10 images.
RUNTIME_TOP1_TOLERANCE = 0.1


@dataclass
class Evaluation:
    """What the evaluator measured for one model (one row of the report)."""

    name: str
    params: int
    nonzero_params: int
    size_bytes: int
    flops: int  # per image, at batch 1
    macs: int  # multiply-accumulates per image (flops / 2 for conv and matmul)
    memory_access_bytes: int  # weights + activations read and written per image
    compute_dtype: str  # what the MACs run in: float32, int8, ...
    latency_ms: dict[str, float]  # p50, p90, p99, mean of one call at `batch_size`
    batch_size: int
    threads: int
    throughput_per_s: float  # images per second at `batch_size` (from the p50)
    gflops_per_s: float  # achieved, from the p50
    # The task's metric on the test split (`metric` names it: top-1 % for classification,
    # mIoU % for segmentation); `metrics` holds it and the task's other figures.
    score: float | None
    # Against the baseline, paired example by example (compress.tasks, Task.drop): points
    # of the metric (positive: worse), percent, its 95 % interval, within_noise; exact
    # McNemar with images lost and gained and p_value for classification, a seeded paired
    # bootstrap (examples, resamples) for the other tasks.
    drop: dict | None = None
    notes: list[str] = field(default_factory=list)
    details: dict = field(
        default_factory=dict
    )  # what the stage reports itself (per-layer tables, ...)
    # Where `latency_ms` was measured: the fastest of the runtimes below.
    runtime: str = "torch"
    # runtime -> {latency_ms, score, drop_points, max_abs_diff (logits vs
    # torch), precision, file, size_bytes}; "torch" is the model as model(x) runs it.
    runtimes: dict[str, dict] = field(default_factory=dict)
    # The task's per-example rows on the test split, in its order (compress.stats.pack_rows):
    # what pairs this model's drop with another's.
    examples: dict | None = None
    # p50 against the baseline's, from alternating rounds in each one's fastest runtime:
    # {"p50": median round ratio, "interval": [low, high] (95 %), "rounds": n}.
    latency_ratio: dict | None = None
    # The compute-matched control (evaluate.control): the baseline trained for the same
    # steps as the stages so far; {"steps", "score", "drop": paired, as above}.
    control: dict | None = None
    # The trainings of the step that made this model: {"steps", "config"} each, in order.
    training: list[dict] = field(default_factory=list)
    task: str = "classification"
    metric: str = "top-1"  # the name of `score`
    metrics: dict[str, float] = field(default_factory=dict)
    # The fastest deployment, kept in memory for the paired latency rounds; never saved.
    deployment: Any = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict:
        return {
            k: v for k, v in asdict(replace(self, deployment=None)).items() if k != "deployment"
        }

    def example_rows(self) -> np.ndarray | None:
        """The task's per-example rows on the test split, or None where they were not kept."""
        return unpack_rows(self.examples) if self.examples else None

    @classmethod
    def from_dict(cls, raw: dict) -> Evaluation:
        """An evaluation as report.json holds it; one written before tasks (top-1 and its
        per-image correctness bits) reads as classification."""
        raw = dict(raw)
        if "accuracy_top1" in raw:
            raw["score"] = raw.pop("accuracy_top1")
            top5 = raw.pop("accuracy_top5", None)
            raw["metrics"] = {"top-1": raw["score"], "top-5": top5} if raw["score"] else {}
            raw["drop"] = raw.pop("accuracy_drop", None)
            correct = raw.pop("correct", None)
            if correct:  # top-1 bits only: its top-5 column repeats top-1 (pairing reads top-1)
                hits = unpack(correct["top1"], correct["images"]).astype(np.uint8)
                raw["examples"] = pack_rows(np.stack([hits, hits, np.ones_like(hits)], 1))
            for row in raw.get("runtimes", {}).values():
                row["score"] = row.pop("accuracy_top1", None)
                if "accuracy_drop_points" in row:
                    row["drop_points"] = row.pop("accuracy_drop_points")
            if raw.get("control"):
                raw["control"] = dict(raw["control"])
                raw["control"]["score"] = raw["control"].pop("accuracy_top1", None)
        return cls(**raw)


def evaluate(
    model: nn.Module,
    data: Data,
    config: EvaluateConfig | dict | None = None,
    baseline: Evaluation | None = None,
    name: str = "model",
    artifact: str | Path | None = None,
    device: str = "cpu",
    deploy_to: str | Path | None = None,
) -> Evaluation:
    """Measure ``model`` on ``data``; compare with ``baseline`` when given.

    ``artifact`` is the saved model's folder or file; without it the model is saved to a
    temporary folder to measure its size. ``deploy_to`` is a path stem for the exported
    files (``<stem>.onnx``, ``<stem>.xml``/``.bin``); without it they go to a temporary
    folder. The headline latency is the fastest runtime's (``result.runtime``).

    Example:
        >>> base = evaluate(model, data, name="baseline")
        >>> after = evaluate(quantized, data, baseline=base, name="quantize")
        >>> after.latency_ms["p50"] / base.latency_ms["p50"]
    """
    config = section("evaluate", config or {})
    # Each rank scores its share of the test split with its share of the cores; rank 0
    # alone then times the model with the threads a deployment has (all cores, or
    # evaluate.threads) while the others wait, so that measuring never shares the cores.
    own_threads = config.threads or distributed.rank_threads()
    threads = config.threads or distributed.usable_cores()
    torch.set_num_threads(own_threads)
    model.eval()
    about = traits(model)
    notes = list(about.notes)
    if about.cpu_only and device != "cpu":
        device = "cpu"
        notes.append("measured on the CPU: this model's kernels are CPU-only")
    reference = about.reference
    one_image = data.example_input(1).to(device)
    flops = count_flops(reference, one_image)
    element_bytes = about.element_bytes
    memory = count_memory_access(reference, one_image, element_bytes)
    total, nonzero = about.param_counts or count_params(model)
    task = get_task(data.task)
    score = examples = None
    figures = {}  # the task's metric and its other figures
    if config.accuracy:
        rows = example_scores(model, data, device)
        figures = task.summarize(rows)
        score, examples = figures[task.metric], pack_rows(rows)
    measured = deployment = None
    if distributed.is_main():
        torch.set_num_threads(threads)
        try:
            measured, deployment = _measure(
                model, data, config, device, threads, deploy_to, notes, score
            )
            measured["size_bytes"] = artifact_size(model, artifact, one_image.cpu(), notes)
        finally:
            torch.set_num_threads(own_threads)
    measured = distributed.broadcast_object(measured)  # the other ranks wait for rank 0
    latency = measured["runtimes"][measured["best"]]["latency_ms"]
    p50_s = latency["p50"] / 1e3
    result = Evaluation(
        name=name,
        params=total,
        nonzero_params=nonzero,
        size_bytes=measured["size_bytes"],
        flops=flops,
        macs=flops // 2,
        memory_access_bytes=memory,
        compute_dtype=about.compute_dtype,
        latency_ms=latency,
        batch_size=config.latency_batch_size,
        threads=threads,
        throughput_per_s=config.latency_batch_size / p50_s,
        gflops_per_s=flops * config.latency_batch_size / p50_s / 1e9,
        score=score,
        notes=measured["notes"],
        details=about.details,
        runtime=measured["best"],
        runtimes=measured["runtimes"],
        examples=examples,
        task=task.name,
        metric=task.metric,
        metrics=figures,
        deployment=deployment,
    )
    if config.profile and distributed.is_main() and device == "cpu":
        torch.set_num_threads(threads)
        try:
            result.details["profile"] = summary(model, one_image, result.gflops_per_s, threads)
        finally:
            torch.set_num_threads(own_threads)
    if baseline is not None:
        if deployment is not None and baseline.deployment is not None:  # rank 0
            torch.set_num_threads(threads)
            try:
                result.latency_ratio = paired_latency_ratio(baseline.deployment, deployment, config)
            finally:
                torch.set_num_threads(own_threads)
        result.latency_ratio = distributed.broadcast_object(result.latency_ratio)
        compare(result, baseline, about.not_faster_reason, task)
    return result


def paired_latency_ratio(baseline, model, config: EvaluateConfig | dict | None = None) -> dict:
    """p50 of ``model`` against ``baseline`` from alternating rounds, with a 95 % interval.

    Each is a ``(callable, batch)`` pair. Every round times both, in turn (the order
    alternates from round to round, so a slow drift of the machine weighs on both alike),
    and takes the ratio of their medians; the result is the median round ratio and a
    distribution-free interval for it (compress.stats.median_interval). Each turn first
    warms its model for ROUND_WARMUP_S: another runtime's threads keep the cores busy for
    tens of milliseconds after its last call (ONNX Runtime's spin), which made whichever
    model came second look slower (measured: ORT FP32 against OpenVINO FP32 read 0.74x in
    10-call rounds, 1.13x alone and with the warm-up).

    Example:
        >>> paired_latency_ratio((model, x), (quantized, x))["interval"]
    """
    config = section("evaluate", config or {})
    calls = max(10, config.iterations // config.latency_rounds)
    ratios = []
    for round_ in range(config.latency_rounds):
        order = (baseline, model) if round_ % 2 == 0 else (model, baseline)
        p50 = {
            id(f): measure_latency(f[0], f[1], 2, calls, warmup_s=ROUND_WARMUP_S)["p50"]
            for f in order
        }
        ratios.append(p50[id(model)] / p50[id(baseline)])
    low, high = median_interval(ratios)
    return {"p50": float(np.median(ratios)), "interval": [low, high], "rounds": len(ratios)}


def _measure(model, data, config, device, threads, deploy_to, notes, score) -> tuple[dict, tuple]:
    """Rank 0's part of an evaluation: latency in every runtime wanted, and which is best;
    and the best deployment as ``(callable, batch)``, for the paired latency rounds."""
    latency = measure_latency(
        model,
        data.example_input(config.latency_batch_size).to(device),
        config.warmup,
        config.iterations,
    )
    runtimes = {"torch": {"latency_ms": latency, "score": score}}
    wanted = config.runtimes if config.runtimes is not None else available_runtimes()
    others = [r for r in wanted if r != "torch"]
    modules = {}
    if others and device == "cpu":
        runtimes.update(
            measure_runtimes(
                model, data, config, others, threads, deploy_to, notes, score, modules=modules
            )
        )
    elif others:
        notes.append(f"measured in torch on {device} only: {', '.join(others)} run on the CPU")
    candidates = [r for r in runtimes if r in wanted] or ["torch"]
    best = min(candidates, key=lambda r: runtimes[r]["latency_ms"]["p50"])
    batch = data.example_input(config.latency_batch_size)
    deployment = (modules[best], batch) if best in modules else (model, batch.to(device))
    return {"runtimes": runtimes, "best": best, "notes": notes}, deployment


def compare(
    result: Evaluation,
    baseline: Evaluation,
    not_faster_reason: str | None = None,
    task: Task | None = None,
) -> None:
    """Fill in the accuracy drop and the plain-words notes against the baseline.

    Latency compares best deployment with best deployment (each one's fastest runtime);
    each runtime's metric is compared with the baseline's in the same runtime.
    """
    if result.score is not None and baseline.score is not None:
        result.drop = drop = metric_drop(result, baseline, task)
        changed = drop.get("lost", 0) + drop.get("gained", 0) if "lost" in drop else drop["points"]
        if drop.get("within_noise") and changed:
            result.notes.append(
                f"its {result.metric} change against the baseline is within noise:"
                f" {describe_drop(drop)}"
            )
    for name, row in result.runtimes.items():
        base_score = baseline.runtimes.get(name, {}).get("score")
        if row.get("score") is not None and base_score is not None:
            sign = 1.0 if (task or get_task(result.task)).higher_is_better else -1.0
            row["drop_points"] = sign * (base_score - row["score"])
    ratio = result.latency_ms["p50"] / baseline.latency_ms["p50"]
    if result.latency_ratio:  # measured side by side: the better estimate
        ratio = result.latency_ratio["p50"]
    interval = (result.latency_ratio or {}).get("interval")
    spread = (
        f"; 95 % interval {interval[0]:.2f}x to {interval[1]:.2f}x over"
        f" {result.latency_ratio['rounds']} alternating rounds"
        if interval
        else ""
    )
    if ratio >= NOT_FASTER_RATIO:
        reason = f"; {not_faster_reason}" if not_faster_reason else ""
        result.notes.append(
            f"not faster than the baseline on this machine: p50 in {result.runtime} is"
            f" {ratio:.2f}x the baseline's in {baseline.runtime} (each at its fastest) at"
            f" batch {result.batch_size}, {result.threads} threads{spread}{reason}"
        )
    elif interval and interval[1] >= 1.0:
        result.notes.append(f"faster by its median ratio ({ratio:.2f}x) but within noise{spread}")


def compare_with_input(result: Evaluation, previous: Evaluation) -> None:
    """In a chain, say when a step is not faster than the model it was given (each in its
    fastest runtime): its ratio against the baseline alone would hide it.

    Example:
        >>> compare_with_input(report.evaluations[2], report.evaluations[1])
    """
    shape = ("params", "nonzero_params", "macs", "compute_dtype")
    if all(getattr(result, k) == getattr(previous, k) for k in shape):
        return  # the step only trained the weights (distillation into the same network)
    ratio = result.latency_ms["p50"] / previous.latency_ms["p50"]
    if ratio < NOT_FASTER_RATIO:
        return
    changed = [
        f"the {what} {mine / theirs:.2f}x"
        for what, mine, theirs in (
            ("size", result.size_bytes, previous.size_bytes),
            ("MACs", result.macs, previous.macs),
        )
        if theirs  # a model torch's counter finds no MACs in has no ratio to give
    ]
    result.notes.append(
        f"not faster than its input ({previous.name}): p50 {result.latency_ms['p50']:.3f} ms"
        f" in {result.runtime} against {previous.latency_ms['p50']:.3f} ms in"
        f" {previous.runtime} ({ratio:.2f}x, p50s timed apart)"
        + (f"; this step changed {' and '.join(changed)}" if changed else "")
    )


def metric_drop(result: Evaluation, reference: Evaluation, task: Task | None = None) -> dict:
    """Points of the task's metric ``result`` loses against ``reference`` (negative: a
    gain), paired example by example where both kept their rows, with its 95 % interval:
    exact McNemar for classification (with the images lost and gained), a seeded paired
    bootstrap otherwise (compress.tasks).

    Example:
        >>> metric_drop(quantized, baseline)["interval"]
    """
    task = task or get_task(reference.task)
    mine, theirs = result.example_rows(), reference.example_rows()
    if mine is not None and theirs is not None and mine.shape == theirs.shape:
        drop = task.drop(theirs, mine)
    else:  # unpaired (an evaluation kept before its rows were): the figure alone
        sign = 1.0 if task.higher_is_better else -1.0
        drop = {"points": sign * (reference.score - result.score)}
    drop["percent"] = 100.0 * drop["points"] / max(abs(reference.score), 1e-9)
    drop["metric"] = reference.metric
    return drop


def describe_drop(drop: dict) -> str:
    """A drop in words: "loses 0.06 points (95 % interval -0.10 to +0.22; 31 images lost,
    25 gained)"."""
    verb = "loses" if drop["points"] >= 0 else "gains"
    text = f"{verb} {abs(drop['points']):.2f} points"
    if drop.get("metric", "top-1") != "top-1":
        text += f" of {drop['metric']}"
    if "interval" in drop:
        low, high = drop["interval"]
        paired = (
            f"{drop['lost']} images lost, {drop['gained']} gained"
            if "lost" in drop
            else drop.get("method", "paired bootstrap over test examples")
            .replace("test examples", f"{drop['examples']} test examples")
            .replace("test batches", f"{drop['examples']} test batches")
        )
        text += f" (95 % interval {low:+.2f} to {high:+.2f}; {paired})"
    return text


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
        expected = task.output(model(batch)).float()
    folder = Path(tempfile.mkdtemp(prefix="compress-deploy-")) if deploy_to is None else None
    rows = {}
    try:
        for runtime in runtimes:
            if runtime == "inductor" and getattr(model, "compiles_itself", False):
                continue  # the torch row already is the compiled model
            stem = Path(deploy_to) if deploy_to is not None else folder / "model"
            try:
                module = deployed(model, runtime, threads, batch, stem)
                latency = measure_latency(module, batch, config.warmup, config.iterations)
                with torch.inference_mode():
                    difference = (task.output(module(batch)).float() - expected).abs().max().item()
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
            if hasattr(module, "file"):
                files = deployed_files(module.file)
                row["file"] = module.file.name if deploy_to is not None else None
                row["size_bytes"] = sum(f.stat().st_size for f in files)
            rows[runtime] = row
            if modules is not None:
                modules[runtime] = module
            if score is not None and abs(score - torch_score) > RUNTIME_TOP1_TOLERANCE:
                notes.append(
                    f"{task.metric} in {runtime} is {score - torch_score:+.2f} points from torch's"
                    f" ({score:.2f} vs {torch_score:.2f} %): it runs in {row['precision']},"
                    " with its own rounding of activations"
                )
    finally:
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
    return rows


def count_params(model: nn.Module) -> tuple[int, int]:
    """(total, non-zero) parameter elements."""
    total = nonzero = 0
    for p in model.parameters():
        total += p.numel()
        nonzero += int(torch.count_nonzero(p).item())
    return total, nonzero


def count_flops(model: nn.Module, example: torch.Tensor) -> int:
    """FLOPs of one forward pass on ``example`` (per image), via torch.utils.flop_counter."""
    with torch.inference_mode(), flop_counter() as counter:
        model(example)
    return counter.get_total_flops() // example.shape[0]


def measure_latency(
    model: nn.Module,
    batch: torch.Tensor,
    warmup: int = 10,
    iterations: int = 100,
    warmup_s: float = 0.0,
) -> dict[str, float]:
    """Per-call wall time in ms (p50, p90, p99, mean) after ``warmup`` untimed calls, and
    more of them until ``warmup_s`` seconds have passed.

    Example:
        >>> measure_latency(model, torch.randn(1, 1, 28, 28), iterations=50)["p50"]
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
    return {"p50": float(p50), "p90": float(p90), "p99": float(p99), "mean": float(np.mean(times))}


def metrics(
    model: nn.Module, data: Data, device: str = "cpu", split: str = "test", shard: bool = True
) -> dict[str, float]:
    """The task's metric (first) and its other figures on a split (the test split by
    default): ``{"top-1": ..., "top-5": ...}`` for classification, ``{"mIoU": ...,
    "pixel accuracy": ...}`` for segmentation.

    Under torchrun each rank scores its own share and the shares are combined, so every
    example counts once whatever the number of processes; ``shard=False`` scores the whole
    split in this process alone (no collective).

    Example:
        >>> metrics(model, data)["top-1"]
    """
    return get_task(data.task).summarize(example_scores(model, data, device, split, shard))


def example_scores(
    model: nn.Module, data: Data, device: str = "cpu", split: str = "test", shard: bool = True
) -> np.ndarray:
    """The task's row for each example of ``split`` (in the split's order; for
    classification: top-1 hit, top-5 hit, 1): what a paired comparison of two models needs
    (compress.tasks).

    Example:
        >>> rows = example_scores(model, data)
        >>> get_task(data.task).summarize(rows)
    """
    task = get_task(data.task)
    rows = []
    with torch.inference_mode():
        for batch in data.loader(split, shard=shard):
            inputs, targets, _ = task.split(batch)
            output = task.output(model(_to(inputs, device))).float()
            rows.append(task.scores(output, _to(targets, device)))
    rows = np.concatenate(rows)
    if shard:
        rows = distributed.gather_shards(rows, len(getattr(data, split)))
    return rows


def _to(value, device: str):
    """Tensors (in a tuple, list or dict too) moved to ``device``."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(_to(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value


def artifact_size(
    model: nn.Module,
    artifact: str | Path | None = None,
    example: torch.Tensor | None = None,
    notes: list[str] | None = None,
) -> int:
    """Bytes on disk of the saved model (a file, or every file in a folder).

    Without ``artifact`` the model is saved to a temporary folder; a model that can be
    neither rebuilt from a spec nor exported is measured as a plain state_dict file, and
    ``notes`` says so.
    """
    if artifact is None:
        with tempfile.TemporaryDirectory() as folder:
            try:
                return artifact_size(model, save(model, Path(folder) / "model", example))
            except Exception as error:  # noqa: BLE001 - export failures are many and varied
                torch.save(model.state_dict(), Path(folder) / "state_dict.pt")
                if notes is not None:
                    notes.append(
                        "size is the state_dict's: the model could not be saved as an"
                        f" artifact ({str(error).strip().splitlines()[0][:120]})"
                    )
                return (Path(folder) / "state_dict.pt").stat().st_size
    path = Path(artifact)
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def sqnr_db(reference: torch.Tensor, approximation: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: how far ``approximation`` strays from ``reference``."""
    noise = (reference.float() - approximation.float()).pow(2).mean()
    if noise == 0:
        return float("inf")
    return (10 * torch.log10(reference.float().pow(2).mean() / noise)).item()
