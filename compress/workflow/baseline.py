"""The baseline: the model before any stage. A checkpoint or pretrained weights where the
recipe names them; else trained once, cached under a key of everything that changes it,
or read from the references the repository ships.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import shutil
from pathlib import Path

from torch import nn

from compress.core import distributed
from compress.core.memory import memory_guard
from compress.core.paths import cache_dir, references_dir
from compress.data import Data
from compress.models import artifact
from compress.models.build import build_model
from compress.spec.recipe import Recipe, TrainConfig
from compress.training.schedule import cooldown_config
from compress.training.train import train
from compress.workflow.rundir import load_own

log = logging.getLogger("compress")


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
        model = load_own(stored, recipe)
        distributed.broadcast_state(model)
        return model.to(device).eval()
    model = build_model(recipe.model, data=data)  # refused with one line if it cannot take data
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
    scheduled, cooldown = _scheduled_baseline(recipe), cooldown_config(recipe.train)
    if scheduled is not None and cooldown is not None:
        log.info("the schedule's baseline is %s: training only its cooldown", scheduled)
        model = load_own(scheduled, recipe)
        config = cooldown
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
    for key, default in (
        ("classes", None),
        ("kwargs", {}),
        ("task", None),
        ("context", 256),
        ("tokenizer", None),
    ):
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
