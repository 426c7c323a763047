"""Runs a recipe: baseline → each stage in order → the shared evaluator after each.

Writes the run directory: ``recipe.yaml`` (resolved), ``report.json``, ``report.md``,
``run.log`` and one model folder per stage (the last stage's is ``model``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch
import yaml
from torch import nn

from compress import artifact
from compress.artifact import write_atomic
from compress.data import Data, build_data
from compress.distill import distill
from compress.evaluate import environment, evaluate
from compress.models import build_model
from compress.prune import prune
from compress.quantize import quantize
from compress.recipe import Recipe, load_recipe
from compress.report import Report
from compress.train import train

log = logging.getLogger("compress")

# Stage name -> function(model, data, config) -> model. STAGE_CONFIGS in recipe.py holds
# the matching option types; a new stage registers in both.
STAGES: dict[str, Callable[..., nn.Module]] = {
    "quantize": quantize,
    "prune": prune,
    "distill": distill,
}


class RunDirError(ValueError):
    """A run directory that exists already: runs are never written over."""


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            "device: cuda was asked for, but torch sees no CUDA device; use auto or cpu"
        )
    return device


def run(
    recipe: Recipe | str | Path, out: str | Path | None = None, overrides: list[str] = ()
) -> Report:
    """Run a recipe end to end and return its report; writes the run directory.

    Example:
        >>> report = run("recipes/resnet_int8.yaml")
        >>> report.final.latency_ms["p50"] / report.baseline.latency_ms["p50"]
    """
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, list(overrides))
    run_dir = make_run_dir(recipe.name, out)
    handler = _log_to(run_dir / "run.log")
    try:
        write_atomic(run_dir / "recipe.yaml", yaml.safe_dump(recipe.to_dict(), sort_keys=False))
        device = resolve_device(recipe.device)
        torch.manual_seed(recipe.seed)
        data = build_data(recipe.data, seed=recipe.seed)
        model = baseline = baseline_model(recipe, data, device)
        report = Report(recipe.name, environment(device))
        log.info("evaluating the baseline")
        # The baseline's size is measured on a temporary copy: the run keeps only new models.
        base = evaluate(model, data, recipe.evaluate, name="baseline", device=device)
        report.evaluations.append(base)
        report.environment["threads"] = base.threads
        for index, stage in enumerate(recipe.stages):
            log.info("stage %d: %s", index, stage.name)
            started = time.perf_counter()
            # The baseline is distillation's default teacher; other stages need only the model.
            context = {"teacher": baseline} if stage.kind == "distill" else {}
            model = STAGES[stage.kind](model, data, stage.config, **context)
            log.info("stage %d done in %.1f s; evaluating", index, time.perf_counter() - started)
            last = index == len(recipe.stages) - 1
            folder = run_dir / ("model" if last else f"stage{index}_{stage.kind}")
            report.evaluations.append(
                evaluate(
                    model,
                    data,
                    recipe.evaluate,
                    baseline=base,
                    name=stage.name,
                    artifact=artifact.save(model, folder),
                    device=device,
                )
            )
        _check_targets(recipe, report)
        report.write(run_dir)
        report.run_dir = run_dir
        log.info("report written to %s", run_dir)
        return report
    except Exception as error:
        log.error("run failed: %s: %s", type(error).__name__, error)
        raise
    finally:
        logging.getLogger("compress").removeHandler(handler)
        handler.close()


def make_run_dir(name: str, out: str | Path | None) -> Path:
    """Create the run directory; an existing one is an error, never reused."""
    if out is not None:
        path = Path(out)
        if path.exists() and any(path.iterdir()):
            raise RunDirError(
                f"--out {path}: the folder exists and is not empty; compress never writes"
                " over a run. Choose a new folder."
            )
        path.mkdir(parents=True, exist_ok=True)
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
    everything that changes it (model, data, seed, training settings).
    """
    needs_training = (
        not recipe.model.checkpoint
        and not recipe.model.weights
        and recipe.data.name != "synthetic"
        and (recipe.train.epochs > 0 or recipe.train.max_steps is not None)
    )
    cached = cache_dir() / "baselines" / baseline_key(recipe)
    if needs_training and (cached / artifact.MANIFEST).is_file():
        log.info("using the cached baseline %s", cached)
        return artifact.load(cached).to(device)
    model = build_model(recipe.model, data.num_classes, data.input_shape[0])
    if not needs_training:
        return model.to(device).eval()
    log.info(
        "training the baseline (%s on %s, %d epochs); cached in %s for later runs",
        recipe.model.name,
        recipe.data.name,
        recipe.train.epochs,
        cached,
    )
    model = train(model, data, recipe.train, seed=recipe.seed, device=device, desc="baseline")
    try:
        artifact.save(model.cpu(), cached)
    except artifact.ArtifactError:  # another run cached it meanwhile: keep theirs
        pass
    return model.to(device).eval()


def baseline_key(recipe: Recipe) -> str:
    """A hash of everything that changes the trained baseline."""
    d = recipe.to_dict()
    data = {
        k: v for k, v in d["data"].items() if k not in ("eval_batch_size", "workers", "test_subset")
    }
    material = {
        "model": d["model"],
        "data": data,
        "seed": recipe.seed,
        "train": d["train"],
        "format": artifact.FORMAT_VERSION,
    }
    digest = hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:16]
    return f"{recipe.model.name.replace(':', '_').replace('.', '_')}-{recipe.data.name}-{digest}"


def cache_dir() -> Path:
    """Where trained baselines are kept: $COMPRESS_CACHE, else ~/.cache/compress."""
    return Path(os.environ.get("COMPRESS_CACHE", Path.home() / ".cache" / "compress"))


def _check_targets(recipe: Recipe, report: Report) -> None:
    limit = recipe.evaluate.max_accuracy_drop
    if limit is None:
        return
    for e in report.evaluations[1:]:
        if e.accuracy_drop and e.accuracy_drop["points"] > limit:
            report.notes.append(
                f"{e.name} misses evaluate.max_accuracy_drop={limit}:"
                f" it loses {e.accuracy_drop['points']:.2f} points"
            )


def _log_to(path: Path) -> logging.Handler:
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logger = logging.getLogger("compress")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    return handler
