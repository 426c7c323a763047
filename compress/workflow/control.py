"""The compute-matched control: the baseline trained as a run's stages trained, so that a
gain from the extra training is not credited to compression.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from pathlib import Path

from torch import nn

from compress.core.memory import memory_guard
from compress.core.registry import StageContext
from compress.data import Data
from compress.measure.evaluate import describe_drop, evaluate, metric_drop
from compress.measure.evaluation import Evaluation
from compress.measure.scores import example_scores
from compress.spec.recipe import Recipe, as_config
from compress.spec.tasks import get_task
from compress.training.train import train
from compress.workflow.report import Report

log = logging.getLogger("compress")


def compute_matched_control(
    recipe: Recipe, data: Data, device: str, baseline: nn.Module, report: Report, run_dir: Path
) -> Evaluation:
    """The baseline trained as the run's stages trained: the same trainings, settings and
    steps, in the same order, with the task's plain loss. Each step's evaluation gets the
    control at its own point of the budget (``evaluation.control``: the steps trained up to
    and including that stage, its score, and the step's paired drop against it); the
    control after the whole budget is evaluated like any step and returned.

    What is matched is compute, not method: a stage's gain that is no larger than its
    control's comes from the extra training, not from compression.
    """
    model = copy.deepcopy(baseline)
    context = StageContext(
        device=device, seed=recipe.seed, checkpoints=run_dir / "checkpoints" / "control"
    )
    control_rows = report.baseline.example_rows()
    if control_rows is None:  # evaluate.accuracy off: the baseline kept none
        control_rows = example_scores(model, data, device)
    task = get_task(data.task)
    steps = 0
    for evaluation in report.evaluations[1:]:
        for training in evaluation.training:
            config = as_config("train", training["config"])
            # The same settings and schedule, stopped at the same step count.
            config = dataclasses.replace(config, epochs=0, max_steps=training["steps"])
            log.info(
                "control: training the baseline %d steps as %s did",
                training["steps"],
                evaluation.name,
            )
            train(model, data, config, desc="control", context=context)
        steps = sum(t["steps"] for t in context.budget)
        if evaluation.training:
            control_rows = example_scores(model, data, device)
        matched: dict = {"steps": steps, "score": task.summarize(control_rows)[task.metric]}
        mine = evaluation.example_rows()
        if mine is not None and mine.shape == control_rows.shape:
            matched["drop"] = task.drop(control_rows, mine)
            _say_against_control(evaluation, matched)
        evaluation.control = matched
    with memory_guard(f"evaluating the control of {recipe.model.name}"):
        # Its latency is the baseline's (the same network): only its accuracy is compared.
        # Nor is its decoding timed: one unpaired rate per runtime is noise (docs/results.md).
        unpaired = dataclasses.replace(recipe.evaluate, decode_tokens=0)
        control = evaluate(
            model, data, unpaired, name=f"control: baseline + {steps} steps", device=device
        )
    if control.score is not None and report.baseline.score is not None:
        control.drop = metric_drop(control, report.baseline, task)
    control.training = list(context.budget)
    control.deployment = None
    return control


def _say_against_control(evaluation: Evaluation, matched: dict) -> None:
    """A step's gain over the baseline is credited to compression only where it beats the
    compute-matched control."""
    drop = matched["drop"]
    over_baseline = evaluation.drop.points if evaluation.drop else None
    text = (
        f"against the compute-matched control (the baseline trained {matched['steps']} more"
        f" steps: {evaluation.metric} {matched['score']:.2f}) it {describe_drop(drop)}"
    )
    if over_baseline is not None and over_baseline < 0 and not drop.points < 0:
        text += ": its gain over the baseline comes from the extra training, not from compression"
    elif over_baseline is not None and over_baseline < 0 and drop.within_noise:
        text += ": its gain over the control is within noise"
    evaluation.notes.append(text)
