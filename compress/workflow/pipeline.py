"""Runs a recipe: baseline → each stage in order → the shared evaluator after each → the
compute-matched control (control.py) where the stages trained.

Writes the run directory: ``recipe.yaml`` (resolved), ``report.json``, ``report.md``,
``run.log`` and one model folder per stage (the last stage's is ``model``).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import yaml

import compress.stages  # noqa: F401  (importing the package registers every stage)
from compress.core import distributed
from compress.core.errors import CompressError, RunDirError, UsageError
from compress.core.memory import memory_guard
from compress.core.registry import STAGES, StageContext
from compress.core.storage import write_atomic
from compress.data import build_data
from compress.measure.deploy import missing_runtimes
from compress.measure.evaluate import (
    compare_with_input,
    evaluate,
)
from compress.measure.machine import environment
from compress.models import artifact
from compress.spec.recipe import Recipe, load_recipe
from compress.workflow.baseline import baseline_description, baseline_model
from compress.workflow.control import compute_matched_control
from compress.workflow.report import Report
from compress.workflow.rundir import load_own, log_to, make_run_dir, read_record, resumable_run_dir

log = logging.getLogger("compress")


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            "device: cuda was asked for, but torch sees no CUDA device; use auto or cpu"
        )
    return device


def run(
    recipe: Recipe | str | Path,
    out: str | Path | None = None,
    overrides: Sequence[str] = (),
    resume: str | Path | None = None,
) -> Report:
    """Run a recipe end to end and return its report; writes the run directory.

    ``resume`` names the directory of an interrupted run of the same recipe: finished
    stages are loaded from their saved models, and a training cut short goes on from its
    last checkpoint. Under torchrun every process calls this; rank 0 alone writes.

    Example:
        >>> report = run("recipes/resnet_int8.yaml")
        >>> report.final.latency_ms.p50 / report.baseline.latency_ms.p50
    """
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, list(overrides))
    device = distributed.init_from_env(resolve_device(recipe.device))
    run_dir = _run_dir(recipe, out, resume)
    handler = log_to(run_dir / "run.log") if distributed.is_main() else None
    try:
        if distributed.is_main() and resume is None:
            write_atomic(run_dir / "recipe.yaml", yaml.safe_dump(recipe.to_dict(), sort_keys=False))
        torch.manual_seed(recipe.seed)
        data = build_data(recipe.data, seed=recipe.seed)
        baseline = baseline_model(recipe, data, device)
        report = _new_report(recipe, device)
        _, base = _evaluated(
            run_dir, "baseline", lambda: (baseline, None), recipe, data, device, None
        )
        report.evaluations.append(base)
        report.environment["threads"] = base.threads
        _run_stages(recipe, data, device, baseline, report, run_dir)
        _control_or_note(recipe, data, device, baseline, report, run_dir)
        _check_targets(recipe, report)
        if distributed.is_main():
            report.write(run_dir)
            log.info("report written to %s", run_dir)
        report.run_dir = run_dir
        return report
    except Exception as error:
        # The run's log says why it ended (with the traceback of an error compress did not
        # foresee, for its bug report); stderr gets one line, from the CLI.
        if handler is not None:
            why = (type(error).__name__, error)
            trace = None if isinstance(error, (CompressError, UsageError)) else sys.exc_info()
            handler.handle(
                log.makeRecord(log.name, logging.ERROR, "", 0, "run failed: %s: %s", why, trace)
            )
        raise
    finally:
        if handler is not None:
            logging.getLogger("compress").removeHandler(handler)
            handler.close()


def _run_dir(recipe: Recipe, out, resume) -> Path:
    """The interrupted run's folder to resume, or a new one (rank 0 picks it, the others
    learn its name)."""
    if resume is not None:
        if out is not None:
            raise RunDirError("give --out or --resume, not both: a resumed run keeps its folder")
        return resumable_run_dir(recipe, resume)
    made = str(make_run_dir(recipe.name, out)) if distributed.is_main() else None
    return Path(distributed.broadcast_object(made))


def _new_report(recipe: Recipe, device: str) -> Report:
    report = Report(recipe.name, environment(device))
    report.environment["processes"] = distributed.world_size()
    report.environment["baseline"] = baseline_description(recipe)
    missing = missing_runtimes()
    if recipe.evaluate.runtimes is None and missing:  # said once per run, not per step
        report.notes.append(
            f"{', '.join(missing)} not installed: measured in PyTorch only"
            " (pip install 'compress[deploy]' to measure where models are deployed)"
        )
        log.warning(report.notes[-1])
    return report


def _run_stages(recipe, data, device, baseline, report: Report, run_dir: Path) -> None:
    """Each stage on the previous one's model, saved and evaluated (or, resuming, read back)."""
    model, base = baseline, report.baseline
    for index, stage in enumerate(recipe.stages):
        last = index == len(recipe.stages) - 1
        folder = run_dir / ("model" if last else f"stage{index}_{stage.kind}")

        def run_stage(model=model, index=index, stage=stage, folder=folder):
            log.info("stage %d: %s", index, stage.name)
            started = time.perf_counter()
            context = StageContext(
                device=device,
                seed=recipe.seed,
                checkpoints=run_dir / "checkpoints" / f"stage{index}_{stage.kind}",
                baseline=baseline,
                evaluate=recipe.evaluate,
            )
            with memory_guard(f"stage {index} ({stage.name}) of {recipe.model.name}"):
                model = STAGES[stage.kind].function(model, data, stage.config, context=context)
            log.info("stage %d done in %.1f s; evaluating", index, time.perf_counter() - started)
            if distributed.is_main():  # before the model: a resume must know what it trained
                write_atomic(_training_record(run_dir, index), json.dumps(context.budget))
            saved = (
                artifact.save(model, folder, data.example_input(2))
                if distributed.is_main()
                else None
            )
            distributed.barrier()
            return model, saved

        model, evaluation = _evaluated(
            run_dir, f"stage{index}", run_stage, recipe, data, device, base, stage.name, folder
        )
        evaluation.deployment = None  # only the baseline's is timed again, against others
        if index:
            compare_with_input(evaluation, report.evaluations[-1])
        report.evaluations.append(evaluation)


def _control_or_note(recipe, data, device, baseline, report: Report, run_dir: Path) -> None:
    """Where the stages trained, the compute-matched control (or a note that there is none)."""
    trained = sum(t["steps"] for e in report.evaluations for t in e.training)
    if recipe.evaluate.control and trained:
        report.control = compute_matched_control(recipe, data, device, baseline, report, run_dir)
    elif trained:
        report.notes.append(
            f"no compute-matched control (evaluate.control is off): the stages trained"
            f" {trained} steps the baseline did not, so a gain may come from that training"
            " rather than from compression"
        )


def _evaluated(run_dir, key, make, recipe, data, device, base, name="baseline", folder=None):
    """(model, evaluation) of one step: made and measured, or, when resuming, read back
    (the model from ``folder``; None for the baseline, which has no folder).

    Each evaluation is kept in ``evaluations/<key>.json`` beside the stage's saved model,
    so a resumed run skips both the stage and its measurement.
    """
    record = run_dir / "evaluations" / f"{key}.json"
    saved_model = folder is not None and (folder / artifact.MANIFEST).is_file()
    if record.is_file() and (folder is None or saved_model):
        log.info("%s: done in the interrupted run; loaded from %s", name, folder or record)
        model = load_own(folder, recipe).to(device) if folder is not None else None
        return model, read_record(record)
    if saved_model:  # killed after saving, before its evaluation was kept: measure it now
        log.info("%s: saved in the interrupted run; evaluating it", name)
        model, saved = load_own(folder, recipe).to(device), folder
    else:
        model, saved = make()
    training = []
    trained = run_dir / "evaluations" / f"{key}.training.json"
    if trained.is_file():
        training = json.loads(trained.read_text(encoding="utf-8"))
    log.info("evaluating %s", name)
    # Without a saved model (the baseline) the size is measured on a temporary copy: the run
    # keeps only new models.
    # A stage's deployable files sit beside its model folder (model.onnx, model.xml/.bin).
    with memory_guard(f"evaluating {name} of {recipe.model.name}"):
        evaluation = evaluate(
            model,
            data,
            recipe.evaluate,
            baseline=base,
            name=name,
            artifact=saved,
            device=device,
            deploy_to=folder,
        )
    evaluation.training = training
    if distributed.is_main():
        write_atomic(record, json.dumps(evaluation.to_dict(), indent=1))
    return model, evaluation


def _training_record(run_dir: Path, index: int) -> Path:
    return run_dir / "evaluations" / f"stage{index}.training.json"


def _check_targets(recipe: Recipe, report: Report) -> None:
    """The run's accuracy target holds for what it delivers: the last step. (A step in the
    middle of a chain, e.g. pruning before distillation, may lose more on the way.)"""
    limit = recipe.evaluate.max_accuracy_drop
    final = report.final
    if limit is None or final is report.baseline or not final.drop:
        return
    if final.drop.points > limit:
        report.notes.append(
            f"{final.name} misses evaluate.max_accuracy_drop={limit}:"
            f" it loses {final.drop.points:.2f} points"
        )
