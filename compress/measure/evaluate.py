"""The shared evaluator: one function measures the baseline and every compressed model.

Figures: parameters (total, non-zero), artifact size on disk, FLOPs/MACs
(``torch.utils.flop_counter``), memory-access bytes, latency percentiles, throughput,
achieved GFLOP/s, the task's metric (compress.spec.tasks: top-1 for classification, mIoU for
segmentation, the user's own) and its paired drop against a baseline.

A compressed model tells the evaluator about itself (its notes, the reference module to
count FLOPs on when what runs is compiled, its stored parameter counts and element width)
through the protocol in traits.py.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn

from compress.core import distributed
from compress.core.stats import Drop, pack_rows
from compress.core.traits import traits
from compress.data import Data
from compress.measure.counts import artifact_size, count_flops, count_params
from compress.measure.decode import has_decoder, measure_decode, paired_decode_ratio
from compress.measure.deploy import available_runtimes
from compress.measure.evaluation import Evaluation
from compress.measure.latency import (
    LatencyRatio,
    measure_latency,
    measure_runtimes,
    network_note,
    paired_latency_ratio,
    time_network,
)
from compress.measure.profile import count_memory_access, profile_summary
from compress.measure.scores import example_scores
from compress.models.build import check_fits_data
from compress.models.detector import split_detector
from compress.spec.recipe import EvaluateConfig, as_config
from compress.spec.tasks import Task, get_task

# A compressed model whose p50 is at least this fraction of the baseline's is "not faster":
# below ~5 % the difference is within run-to-run noise on a shared machine.
NOT_FASTER_RATIO = 0.95


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

    ``artifact``: the saved model's folder or file (else it is saved to a temporary folder
    for its size); ``deploy_to``: a path stem for the exported files (else a temporary
    folder). The headline latency is the fastest runtime's (``result.runtime``).

    Example:
        >>> base = evaluate(model, data, name="baseline")
        >>> after = evaluate(quantized, data, baseline=base, name="quantize")
        >>> after.latency_ms.p50 / base.latency_ms.p50
    """
    config = as_config("evaluate", config or {})
    # Each rank scores its share of the test split on its cores; rank 0 alone times.
    own_threads = config.threads or distributed.rank_threads()
    threads = config.threads or distributed.usable_cores()
    torch.set_num_threads(own_threads)
    check_fits_data(model.eval(), data)  # data.context beyond a GPT's: one line
    about = traits(model)
    notes = list(about.notes)
    if about.cpu_only and device != "cpu":
        device = "cpu"
        notes.append("measured on the CPU: this model's kernels are CPU-only")
    one_image = data.example_input(1).to(device)
    flops = count_flops(about.reference, one_image)  # the reference: what runs may be compiled
    memory = count_memory_access(about.reference, one_image, about.element_bytes)
    total, nonzero = about.param_counts or count_params(model)
    task = get_task(data.task)
    score, examples, figures = _scores(model, data, config, device, task)
    measured, (deployment, decoding) = _rank0_figures(
        model, data, config, device, (threads, own_threads), deploy_to, notes, score, artifact
    )
    latency = measured["runtimes"][measured["best"]]["latency_ms"]
    p50_s, pair = latency.p50 / 1e3, (threads, own_threads)
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
        higher_is_better=task.higher_is_better,
        metrics=figures,
        deployment=deployment,
        decoding=decoding,
    )
    if config.profile and distributed.is_main() and device == "cpu":
        with _threads(threads, own_threads):
            result.details["profile"] = profile_summary(
                model, one_image, result.gflops_per_s, threads
            )
    if baseline is not None:
        result.latency_ratio = _paired_ratio(baseline, deployment, config, pair)
        result.decode_ratio = _paired_decoding(baseline, decoding, config, pair)
        against_baseline(result, baseline, about.not_faster_reason, task)
    return result


def _paired_ratio(baseline: Evaluation, deployment, config, threads) -> LatencyRatio | None:
    """The two models' best deployments timed in turns by rank 0 (the headline p50 ratio
    and its interval); every rank gets it."""
    ratio = None
    if deployment is not None and baseline.deployment is not None:  # rank 0
        with _threads(*threads):
            ratio = paired_latency_ratio(baseline.deployment, deployment, config)
    return distributed.broadcast_object(ratio)


def _paired_decoding(baseline: Evaluation, decoding, config, threads) -> dict | None:
    """Both models' fastest decoding in turns by rank 0 (the decode ratio); every rank gets it."""
    ratio = None
    if decoding is not None and baseline.decoding is not None:  # rank 0, language models
        with _threads(*threads):
            ratio = paired_decode_ratio(baseline.decoding, decoding, config.latency_rounds)
    return distributed.broadcast_object(ratio)


def _scores(model, data, config, device, task) -> tuple[float | None, dict | None, dict]:
    """The task's metric, the packed per-example rows a paired drop needs, and the metric's
    companions (top-5, pixel accuracy); Nones where evaluate.accuracy is off."""
    if not config.accuracy:
        return None, None, {}
    rows = example_scores(model, data, device)
    figures = task.summarize(rows)
    return figures[task.metric], pack_rows(rows), figures


@contextlib.contextmanager
def _threads(count: int, restore: int):
    """Timing with ``count`` threads (a deployment's), then back to this rank's share."""
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(restore)


def _rank0_figures(model, data, config, device, threads, deploy_to, notes, score, saved):
    """Rank 0 times the model (with a deployment's threads) and measures its size on disk;
    every rank gets the figures, rank 0 alone its best deployment (else None)."""
    measured, deployment = None, (None, None)
    if distributed.is_main():
        with _threads(*threads):
            measured, deployment = _time_runtimes(
                model, data, config, device, threads[0], deploy_to, notes, score
            )
            example = data.example_input(1)
            measured["size_bytes"] = artifact_size(model, saved, example, notes)
    return distributed.broadcast_object(measured), deployment  # the others wait for rank 0


def _time_runtimes(
    model, data, config, device, threads, deploy_to, notes, score
) -> tuple[dict, tuple]:
    """Rank 0's part of an evaluation: latency in every runtime wanted, and which is best;
    and the best deployment as ``(callable, batch)``, for the paired latency rounds."""
    split = split_detector(model)  # a detector: timed as every runtime's (the same code)
    latency = measure_latency(
        split or model,
        data.example_input(config.latency_batch_size).to(device),
        config.warmup,
        config.iterations,
    )
    runtimes = {"torch": {"latency_ms": latency, "score": score}}
    if split is not None:  # its network alone too
        batch = data.example_input(config.latency_batch_size).to(device)
        runtimes["torch"]["network_p50_ms"] = time_network(split, batch, config)
    wanted = config.runtimes if config.runtimes is not None else available_runtimes()
    others = [r for r in wanted if r != "torch"]
    modules: dict = {}
    if others and device == "cpu":
        runtimes.update(
            measure_runtimes(
                model, data, config, others, threads, deploy_to, notes, score, modules=modules
            )
        )
    elif others:
        notes.append(f"measured in torch on {device} only: {', '.join(others)} run on the CPU")
    note = network_note(runtimes)
    if note is not None:
        notes.append(note)
    candidates = [r for r in runtimes if r in wanted] or ["torch"]
    best = min(candidates, key=lambda r: runtimes[r]["latency_ms"].p50)
    decoding = None
    if config.decode_tokens and device == "cpu" and has_decoder(model):
        rates, decoding = measure_decode(model, candidates, threads, config.decode_tokens, notes)
        for runtime, rate in rates.items():
            runtimes[runtime]["decode_tokens_per_s"] = rate
    batch = data.example_input(config.latency_batch_size)
    deployment = (modules[best], batch) if best in modules else (model, batch.to(device))
    return {"runtimes": runtimes, "best": best, "notes": notes}, (deployment, decoding)


def against_baseline(
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
        changed = (drop.lost or 0) + (drop.gained or 0) if drop.lost is not None else drop.points
        if drop.within_noise and changed:
            result.notes.append(
                f"its {result.metric} change against the baseline is within noise:"
                f" {describe_drop(drop)}"
            )
    for name, row in result.runtimes.items():
        base_score = baseline.runtimes.get(name, {}).get("score")
        if row.get("score") is not None and base_score is not None:
            sign = 1.0 if (task or get_task(result.task)).higher_is_better else -1.0
            row["drop_points"] = sign * (base_score - row["score"])
    ratio = result.latency_ms.p50 / baseline.latency_ms.p50
    paired = result.latency_ratio  # measured side by side: the better estimate
    spread = ""
    if paired is not None:
        ratio = paired.p50
        spread = (
            f"; 95 % interval {paired.interval[0]:.2f}x to {paired.interval[1]:.2f}x over"
            f" {paired.rounds} alternating rounds"
        )
    if ratio >= NOT_FASTER_RATIO:
        reason = f"; {not_faster_reason}" if not_faster_reason else ""
        result.notes.append(
            f"not faster than the baseline on this machine: p50 in {result.runtime} is"
            f" {ratio:.2f}x the baseline's in {baseline.runtime} (each at its fastest) at"
            f" batch {result.batch_size}, {result.threads} threads{spread}{reason}"
        )
    elif paired is not None and paired.interval[1] >= 1.0:
        result.notes.append(f"faster by its median ratio ({ratio:.2f}x) but within noise{spread}")
    _decode_note(result, baseline)


def _decode_note(result: Evaluation, baseline: Evaluation) -> None:
    """A language model's decoding speed against the baseline's, each at its fastest."""
    mine, theirs = result.best_decode(), baseline.best_decode()
    if mine is None or theirs is None:
        return
    paired = result.decode_ratio
    speedup = paired["x"] if paired else mine[1] / theirs[1]
    how = "median of 3 each"
    if paired:
        low, high = paired["interval"]
        how = f"median of {paired['rounds']} alternating rounds, 95 % interval {low:.2f}x to {high:.2f}x"
    verdict = "" if speedup > 1 / NOT_FASTER_RATIO else "not faster at decoding: "
    result.notes.append(
        f"{verdict}decodes {mine[1]:.0f} tokens/s in {mine[0]}, {speedup:.2f}x the baseline's"
        f" {theirs[1]:.0f} in {theirs[0]} (each at its fastest, batch 1; {how})"
    )


def compare_with_input(result: Evaluation, previous: Evaluation) -> None:
    """In a chain, say when a step is not faster than the model it was given (each in its
    fastest runtime): its ratio against the baseline alone would hide it.

    Example:
        >>> compare_with_input(report.evaluations[2], report.evaluations[1])
    """
    shape = ("params", "nonzero_params", "macs", "compute_dtype")
    if all(getattr(result, k) == getattr(previous, k) for k in shape):
        return  # the step only trained the weights (distillation into the same network)
    ratio = result.latency_ms.p50 / previous.latency_ms.p50
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
        f"not faster than its input ({previous.name}): p50 {result.latency_ms.p50:.3f} ms"
        f" in {result.runtime} against {previous.latency_ms.p50:.3f} ms in"
        f" {previous.runtime} ({ratio:.2f}x, p50s timed apart)"
        + (f"; this step changed {' and '.join(changed)}" if changed else "")
    )


def metric_drop(result: Evaluation, reference: Evaluation, task: Task | None = None) -> Drop:
    """Points of the task's metric ``result`` loses against ``reference`` (negative: a
    gain), paired example by example where both kept their rows, with its 95 % interval:
    exact McNemar for classification (with the images lost and gained), a seeded paired
    bootstrap otherwise (compress.spec.tasks).

    Example:
        >>> metric_drop(quantized, baseline).interval
    """
    task = task or get_task(reference.task)
    mine, theirs = result.example_rows(), reference.example_rows()
    if mine is not None and theirs is not None and mine.shape == theirs.shape:
        drop = task.drop(theirs, mine)
        if isinstance(drop, dict):  # a user's Task written before drops were typed
            drop = Drop.from_dict(drop)
    else:  # unpaired (an evaluation kept before its rows were): the figure alone
        assert reference.score is not None and result.score is not None, "no scores to compare"
        sign = 1.0 if task.higher_is_better else -1.0
        drop = Drop(sign * (reference.score - result.score))
    return drop.about(reference.metric, reference.score)


def describe_drop(drop: Drop) -> str:
    """A drop in words: "loses 0.06 points (95 % interval -0.10 to +0.22; 31 images lost,
    25 gained)"."""
    verb = "loses" if drop.points >= 0 else "gains"
    text = f"{verb} {abs(drop.points):.2f} points"
    if (drop.metric or "top-1") != "top-1":
        text += f" of {drop.metric}"
    if drop.interval is not None:
        low, high = drop.interval
        paired = (
            f"{drop.lost} images lost, {drop.gained} gained"
            if drop.lost is not None
            else (drop.method or "paired bootstrap over test examples")
            .replace("test examples", f"{drop.examples} test examples")
            .replace("test batches", f"{drop.examples} test batches")
        )
        text += f" (95 % interval {low:+.2f} to {high:+.2f}; {paired})"
    return text
