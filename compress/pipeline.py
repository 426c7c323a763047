"""Runs a recipe: baseline → each stage in order → the shared evaluator after each.

Writes the run directory: ``recipe.yaml`` (resolved), ``report.json``, ``report.md``,
``run.log`` and one model folder per stage (the last stage's is ``model``).
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import hashlib
import importlib
import json
import logging
import shutil
import time
from pathlib import Path

import torch
import yaml
from torch import nn

from compress import artifact, distributed
from compress.data import Data, build_data
from compress.deploy import missing_runtimes
from compress.errors import RecipeError, RunDirError
from compress.evaluate import (
    Evaluation,
    compare_with_input,
    describe_drop,
    evaluate,
    example_scores,
    metric_drop,
)
from compress.memory import memory_guard
from compress.models import build_model
from compress.paths import cache_dir, references_dir
from compress.profile import environment
from compress.recipe import Recipe, TrainConfig, load_recipe, section
from compress.registry import STAGES, StageContext
from compress.report import Report
from compress.schema import read_yaml
from compress.storage import write_atomic
from compress.tasks import get_task
from compress.train import cooldown_config, train

log = logging.getLogger("compress")


def _stage_modules() -> list[str]:
    """compress's modules (or packages) with a top-level ``@register_stage(...)`` function,
    found by reading the package's own source: a new stage is one new module, registered
    next to its code, with no list to extend here."""
    package = Path(__file__).resolve().parent
    found = []
    for path in sorted([*package.glob("*.py"), *package.glob("*/__init__.py")]):
        tree = ast.parse(path.read_text(), str(path))
        decorators = [
            d.func.id
            for node in tree.body
            if isinstance(node, ast.FunctionDef)
            for d in node.decorator_list
            if isinstance(d, ast.Call) and isinstance(d.func, ast.Name)
        ]
        if "register_stage" in decorators:
            name = path.parent.name if path.name == "__init__.py" else path.stem
            found.append(f"compress.{name}")
    return found


for _module in _stage_modules():  # importing a stage registers it (registry.STAGES)
    importlib.import_module(_module)


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
    overrides: list[str] = (),
    resume: str | Path | None = None,
) -> Report:
    """Run a recipe end to end and return its report; writes the run directory.

    ``resume`` names the directory of an interrupted run of the same recipe: finished
    stages are loaded from their saved models, and a training cut short goes on from its
    last checkpoint. Under torchrun every process calls this; rank 0 alone writes.

    Example:
        >>> report = run("recipes/resnet_int8.yaml")
        >>> report.final.latency_ms["p50"] / report.baseline.latency_ms["p50"]
    """
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, list(overrides))
    device = distributed.init_from_env(resolve_device(recipe.device))
    main = distributed.is_main()
    if resume is not None:
        if out is not None:
            raise RunDirError("give --out or --resume, not both: a resumed run keeps its folder")
        run_dir = resumable_run_dir(recipe, resume)
    else:
        # Rank 0 picks the (new) folder; the others learn its name.
        run_dir = Path(
            distributed.broadcast_object(str(make_run_dir(recipe.name, out)) if main else None)
        )
    handler = _log_to(run_dir / "run.log") if main else None
    try:
        if main and resume is None:
            write_atomic(run_dir / "recipe.yaml", yaml.safe_dump(recipe.to_dict(), sort_keys=False))
        torch.manual_seed(recipe.seed)
        data = build_data(recipe.data, seed=recipe.seed)
        model = baseline = baseline_model(recipe, data, device)
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
        _, base = _evaluated(run_dir, "baseline", lambda: (model, None), recipe, data, device, None)
        report.evaluations.append(base)
        report.environment["threads"] = base.threads
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
                )
                with memory_guard(f"stage {index} ({stage.name}) of {recipe.model.name}"):
                    model = STAGES[stage.kind].function(model, data, stage.config, context=context)
                log.info(
                    "stage %d done in %.1f s; evaluating", index, time.perf_counter() - started
                )
                if main:  # before the model: a resumed run must know what the stage trained
                    write_atomic(_training_record(run_dir, index), json.dumps(context.budget))
                saved = artifact.save(model, folder, data.example_input(2)) if main else None
                distributed.barrier()
                return model, saved

            model, evaluation = _evaluated(
                run_dir, f"stage{index}", run_stage, recipe, data, device, base, stage.name, folder
            )
            evaluation.deployment = None  # only the baseline's is timed again, against others
            if index:
                compare_with_input(evaluation, report.evaluations[-1])
            report.evaluations.append(evaluation)
        trained = sum(t["steps"] for e in report.evaluations for t in e.training)
        if recipe.evaluate.control and trained:
            report.control = compute_matched_control(
                recipe, data, device, baseline, report, run_dir
            )
        elif trained:
            report.notes.append(
                f"no compute-matched control (evaluate.control is off): the stages trained"
                f" {trained} steps the baseline did not, so a gain may come from that training"
                " rather than from compression"
            )
        _check_targets(recipe, report)
        if main:
            report.write(run_dir)
            log.info("report written to %s", run_dir)
        report.run_dir = run_dir
        return report
    except Exception as error:
        log.error("run failed: %s: %s", type(error).__name__, error)
        raise
    finally:
        if handler is not None:
            logging.getLogger("compress").removeHandler(handler)
            handler.close()


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
        model = _load_own(folder, recipe).to(device) if folder is not None else None
        return model, _read_record(record)
    if saved_model:  # killed after saving, before its evaluation was kept: measure it now
        log.info("%s: saved in the interrupted run; evaluating it", name)
        model, saved = _load_own(folder, recipe).to(device), folder
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
    task = get_task(data.task)
    steps = 0
    for evaluation in report.evaluations[1:]:
        for training in evaluation.training:
            config = section("train", training["config"])
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
        matched = {"steps": steps, "score": task.summarize(control_rows)[task.metric]}
        mine = evaluation.example_rows()
        if mine is not None and mine.shape == control_rows.shape:
            matched["drop"] = dict(task.drop(control_rows, mine), metric=task.metric)
            _say_against_control(evaluation, matched)
        evaluation.control = matched
    with memory_guard(f"evaluating the control of {recipe.model.name}"):
        # Its latency is the baseline's (the same network): only its accuracy is compared.
        control = evaluate(
            model, data, recipe.evaluate, name=f"control: baseline + {steps} steps", device=device
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
    over_baseline = (evaluation.drop or {}).get("points")
    text = (
        f"against the compute-matched control (the baseline trained {matched['steps']} more"
        f" steps: {evaluation.metric} {matched['score']:.2f}) it {describe_drop(drop)}"
    )
    if over_baseline is not None and over_baseline < 0 and not drop["points"] < 0:
        text += ": its gain over the baseline comes from the extra training, not from compression"
    elif over_baseline is not None and over_baseline < 0 and drop["within_noise"]:
        text += ": its gain over the control is within noise"
    evaluation.notes.append(text)


def _read_record(record: Path) -> Evaluation:
    """An evaluation kept by an interrupted run; a malformed one is named, not a traceback."""
    try:
        return Evaluation.from_dict(json.loads(record.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError, RecursionError) as error:
        raise RunDirError(
            f"--resume: {record} is not an evaluation compress wrote"
            f" ({type(error).__name__}: {str(error).strip()[:200]}); delete it to measure again"
        ) from None


def _load_own(folder: Path, recipe: Recipe) -> nn.Module:
    """A model this run saved: its spec may name the recipe's own import paths."""
    return artifact.load(folder, trusted_imports=recipe_imports(recipe))


def recipe_imports(recipe: Recipe) -> set[str]:
    """The import paths a recipe names as models: code its author chose to run."""
    names = {recipe.model.name}
    for stage in recipe.stages:
        for config in (
            getattr(stage.config, "teacher", None),
            getattr(stage.config, "student", None),
        ):
            if config is not None:
                names.add(config.name)
    return {name for name in names if ":" in name}


def resumable_run_dir(recipe: Recipe, path: str | Path) -> Path:
    """The folder of an interrupted run of the same recipe (checked key by key)."""
    path = Path(path)
    saved = path / "recipe.yaml"
    if not saved.is_file():
        raise RunDirError(f"--resume {path}: not a run directory (no recipe.yaml in it)")
    if (path / "report.json").is_file():
        raise RunDirError(
            f"--resume {path}: that run finished (report.json exists); nothing to resume"
        )
    try:
        before = read_yaml(saved.read_text(encoding="utf-8"), str(saved))
    except (RecipeError, UnicodeDecodeError) as error:
        raise RunDirError(f"--resume {path}: its recipe.yaml is unreadable ({error})") from None
    now = json.loads(json.dumps(recipe.to_dict()))  # tuples as lists, as YAML has them
    differences = _differences(before, now)
    if differences:
        key, old, new = differences[0]
        raise RunDirError(
            f"--resume {path}: the recipe differs from the run's recipe.yaml at {key}"
            f" ({old!r} there, {new!r} now); resume with the same recipe and --set values"
        )
    return path


def _differences(a, b, path: str = "") -> list[tuple[str, object, object]]:
    """Where ``b`` (the recipe now) differs from ``a`` (a run's recipe.yaml). A key only
    ``a`` has is an option its method does not read, which older runs wrote: not a change."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in b:
            if key not in a and b[key] in (None, False):
                continue  # an option added since that run, at its off default
            out += _differences(a.get(key), b.get(key), f"{path}.{key}" if path else str(key))
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [
            d
            for i, (x, y) in enumerate(zip(a, b, strict=True))
            for d in _differences(x, y, f"{path}[{i}]")
        ]
    return [] if a == b else [(path, a, b)]


# Created (exclusively) in a run folder given as --out: the run that created it owns it.
CLAIMED = ".claimed"


def refuse_used_out(out: str | Path) -> Path:
    """``out`` as a path, if a run may write there (new, or an empty folder)."""
    path = Path(out)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise RunDirError(
            f"--out {path}: the folder exists and is not empty; compress never writes"
            " over a run. Choose a new folder."
        )
    return path


def make_run_dir(name: str, out: str | Path | None) -> Path:
    """Create the run directory; an existing one is an error, never reused.

    The default folder is created in one step that fails if it exists; a folder given as
    ``--out`` (new, or empty: nothing in it can be lost) is claimed by creating a marker
    file exclusively. Either way two runs started at the same moment never share one.
    """
    if out is not None:
        path = refuse_used_out(out)
        path.mkdir(parents=True, exist_ok=True)
        try:  # of two runs started together on one folder, one alone creates the marker
            (path / CLAIMED).open("x").close()
        except FileExistsError:
            raise RunDirError(f"--out {path}: another run took this folder") from None
        return path
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = Path("runs") / name / stamp
    for suffix in range(1000):
        path = base.with_name(f"{stamp}-{suffix}") if suffix else base
        try:
            path.mkdir(parents=True)
            return path
        except FileExistsError:
            continue
    raise RunDirError(f"cannot create a new run directory under {base.parent}")


def baseline_model(recipe: Recipe, data: Data, device: str) -> nn.Module:
    """The model before any stage: the checkpoint, or a baseline trained once and cached.

    Training happens when the recipe names neither a checkpoint nor pretrained weights and
    the data is real (not synthetic); the result is cached under the cache folder, keyed by
    everything that changes it (model, data, seed, training settings). A key the repository
    ships under ``references/`` (the converged reference) is read from there, not trained.
    """
    needs_training = (
        not recipe.model.checkpoint
        and not recipe.model.weights
        and recipe.data.name != "synthetic"
        and (recipe.train.epochs > 0 or recipe.train.max_steps is not None)
    )
    cached = cache_dir() / "baselines" / baseline_key(recipe)
    stored = _stored_baseline(cached)
    # Rank 0's cache decides; a rank on another machine without it gets rank 0's weights.
    use_cache = distributed.broadcast_object(needs_training and stored is not None)
    if use_cache and stored is not None:
        log.info("using the %s baseline %s", "cached" if stored == cached else "shipped", stored)
        model = _load_own(stored, recipe)
        distributed.broadcast_state(model)
        return model.to(device).eval()
    model = build_model(recipe.model, data.num_classes, data.input_shape[0])
    if use_cache:
        distributed.broadcast_state(model)
        return model.to(device).eval()
    if not needs_training:
        return model.to(device).eval()
    log.info(
        "training the baseline (%s on %s, %s); cached in %s for later runs",
        recipe.model.name,
        recipe.data.name,
        _training_length(recipe.train),
        cached,
    )
    # Checkpoints beside the cache entry: an interrupted baseline training resumes.
    checkpoints = cached.with_name(cached.name + ".training")
    config = recipe.train
    # A cooldown after a schedule already trained (cached or shipped) trains only itself.
    scheduled = _scheduled_baseline(recipe)
    if scheduled is not None:
        log.info("the schedule's baseline is %s: training only its cooldown", scheduled)
        model = _load_own(scheduled, recipe)
        config = cooldown_config(recipe.train)
    with memory_guard(f"training the baseline {recipe.model.name}"):
        model = train(
            model,
            data,
            config,
            seed=recipe.seed,
            device=device,
            desc="baseline",
            checkpoint_dir=checkpoints,
        )
    if distributed.is_main():
        try:
            artifact.save(copy.deepcopy(model).cpu(), cached)
            shutil.rmtree(checkpoints, ignore_errors=True)
        except artifact.ArtifactError:  # another run cached it meanwhile: keep theirs
            pass
    distributed.barrier()
    return model.to(device).eval()


def _stored_baseline(cached: Path) -> Path | None:
    """The trained baseline for this key: the cache's, else the one the repository ships."""
    for folder in (cached, references_dir() / cached.name):
        if (folder / artifact.MANIFEST).is_file():
            return folder
    return None


def _scheduled_baseline(recipe: Recipe) -> Path | None:
    """With a cooldown, the stored baseline of the same recipe without it, if any."""
    # Under max_steps the cooldown's share depends on the schedule's steps: train it all.
    if cooldown_config(recipe.train) is None or recipe.train.max_steps is not None:
        return None
    without = dataclasses.replace(
        recipe, train=dataclasses.replace(recipe.train, cooldown_epochs=0)
    )
    return _stored_baseline(cache_dir() / "baselines" / baseline_key(without))


def _training_length(train: TrainConfig) -> str:
    length = f"{train.epochs} epochs" if train.epochs else f"{train.max_steps} steps"
    if train.epochs and train.max_steps:
        length += f", at most {train.max_steps} steps"
    if cooldown_config(train) is not None:
        length += f", then {train.cooldown_epochs} cooldown epochs"
    return length


def baseline_description(recipe: Recipe) -> str:
    """Where the baseline comes from, in words (the report and results/summary.md say it)."""
    if recipe.model.checkpoint:
        return f"{recipe.model.name} from {recipe.model.checkpoint}"
    if recipe.model.weights:
        return f"{recipe.model.name} with torchvision weights {recipe.model.weights}"
    train = recipe.train
    if recipe.data.name == "synthetic" or not (train.epochs or train.max_steps):
        return f"{recipe.model.name}, untrained (random weights)"
    return (
        f"{recipe.model.name} trained on {recipe.data.name}: {_training_length(train)},"
        f" {train.optimizer}"
        f" {train.schedule} lr {train.lr:g}, augment {train.augment}, label smoothing"
        f" {train.label_smoothing:g}"
        + (
            f"; cooldown at lr {train.cooldown_lr:g} without augmentation or smoothing"
            if cooldown_config(train) is not None
            else ""
        )
        + f" (cached as {baseline_key(recipe)})"
    )


def baseline_key(recipe: Recipe) -> str:
    """A hash of everything that changes the trained baseline."""
    d = recipe.to_dict()
    data = {
        k: v for k, v in d["data"].items() if k not in ("eval_batch_size", "workers", "test_subset")
    }
    # Keys at the defaults they had before they existed leave the key as it was: the
    # shipped references and earlier caches hold.
    for key, default in (("classes", None), ("kwargs", {}), ("task", None)):
        if data.get(key, default) == default:
            data.pop(key, None)
    # Validation reads the weights, never changes them. How ranks share BatchNorm
    # statistics under torchrun, like how many ranks there are, is not in the key: the
    # shipped reference serves a torchrun with sync_batchnorm as it serves one process.
    training = {k: v for k, v in d["train"].items() if k not in ("validate", "sync_batchnorm")}
    if training["augment"] == "none":  # as before augmentation existed: earlier caches hold
        del training["augment"], training["crop_padding"]
    # Likewise for keys from before the cooldown existed, and when max_steps leaves none.
    if cooldown_config(recipe.train) is None:
        del training["cooldown_epochs"], training["cooldown_lr"]
    material = {
        "model": d["model"],
        "data": data,
        "seed": recipe.seed,
        "train": training,
        "format": artifact.FORMAT_VERSION,
    }
    digest = hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:16]
    return f"{recipe.model.name.replace(':', '_').replace('.', '_')}-{recipe.data.name}-{digest}"


def _check_targets(recipe: Recipe, report: Report) -> None:
    """The run's accuracy target holds for what it delivers: the last step. (A step in the
    middle of a chain, e.g. pruning before distillation, may lose more on the way.)"""
    limit = recipe.evaluate.max_accuracy_drop
    final = report.final
    if limit is None or final is report.baseline or not final.drop:
        return
    if final.drop["points"] > limit:
        report.notes.append(
            f"{final.name} misses evaluate.max_accuracy_drop={limit}:"
            f" it loses {final.drop['points']:.2f} points"
        )


def _log_to(path: Path) -> logging.Handler:
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logger = logging.getLogger("compress")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    return handler
