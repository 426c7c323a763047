"""The stage registry: each stage registers itself once, next to its function, with
``@register_stage``; the recipe schema, ``compress list``, the pipeline, the generated
docs and the tests all read it from here.

Example:
    >>> @register_stage("prune", PruneConfig)
    ... def prune(model, data, config=None, *, context=None, **options): ...
    >>> STAGES["prune"].methods
    ('structured', 'magnitude')
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compress.errors import RecipeError
from compress.schema import method_options, methods_of, suggest


@dataclass(frozen=True)
class StageSpec:
    """A registered stage: its recipe name, function and config type.

    ``final`` stages end a chain (nothing may follow a quantize stage).
    """

    name: str
    function: Callable
    config: type
    final: bool = False

    @property
    def methods(self) -> tuple[str, ...]:
        return methods_of(self.config)

    def options(self, method: str) -> set[str]:
        """The options ``method`` reads, ``method`` itself included."""
        return method_options(self.config, method)


STAGES: dict[str, StageSpec] = {}


@dataclass
class StageContext:
    """What a run hands each stage, explicitly: where and with which seed it trains, where
    its trainings keep their checkpoints, and the run's baseline (distillation's default
    teacher). Called from Python, a stage gets the default: CPU, seed 0, no checkpoints.

    Example:
        >>> context = StageContext(device="cuda", seed=1, checkpoints=Path("runs/x/ckpt"))
        >>> pruned = prune(model, data, method="magnitude", context=context)
    """

    device: str = "cpu"
    seed: int = 0
    checkpoints: Path | None = None  # one numbered folder per training inside the stage
    baseline: Any = None  # nn.Module
    trainings: int = field(default=0, repr=False)

    def checkpoint_dir(self, description: str) -> Path | None:
        """The folder for the stage's next training, numbered in call order, so a resumed
        stage (which trains in the same order) finds each training's checkpoints."""
        if self.checkpoints is None:
            return None
        self.trainings += 1
        slug = re.sub(r"[^a-z0-9]+", "-", description.lower()).strip("-")
        return Path(self.checkpoints) / f"{self.trainings:02d}-{slug}"


def register_stage(name: str, config: type, *, final: bool = False):
    """Decorator registering ``function(model, data, config, *, context, **options) -> model``
    as the stage ``name`` whose options are the dataclass ``config``; ``context`` is a
    :class:`StageContext`."""

    def add(function: Callable) -> Callable:
        if name in STAGES:
            raise AssertionError(f"stage {name!r} is registered twice")  # a code bug
        STAGES[name] = StageSpec(name, function, config, final)
        return function

    return add


def stage_spec(name: str) -> StageSpec:
    """The registered stage ``name``; a :class:`RecipeError` listing the stages otherwise."""
    if name not in STAGES:
        raise RecipeError(f"unknown stage {name!r}; {suggest(name, list(STAGES))}")
    return STAGES[name]
