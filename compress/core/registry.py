"""The stage registry: each stage registers itself once, next to its function, with
``@register_stage``; the recipe schema, ``compress list``, the pipeline, the generated
docs and the tests all read it from here.

Example:
    >>> @register_stage("prune", PruneConfig)
    ... def prune(model, data, config: PruneConfig, *, context: StageContext): ...
    >>> STAGES["prune"].methods
    ('magnitude', 'structured')
    >>> pruned = prune(model, data, method="magnitude", sparsity=0.8)  # options as keywords
"""

from __future__ import annotations

import functools
import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compress.core.errors import RecipeError
from compress.core.schema import FieldError, method_options, methods_of, parse_config, suggest


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

    def parse(self, options: dict, source: str = "<options>"):
        """``options`` (plain data) as this stage's config; a :class:`RecipeError` naming
        the key otherwise."""
        try:
            return parse_config(self.config, options, self.name)
        except FieldError as error:
            raise RecipeError(f"{source}: {error.key}: {error.message}") from None


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
    # The run's EvaluateConfig: how a stage that times its own result (quantize's goal:
    # speed) measures, in which runtimes; None: the evaluator's defaults.
    evaluate: Any = None
    trainings: int = field(default=0, repr=False)
    # What the stage's trainings ran, in order: {"steps", "config"} each (train() adds
    # them). A compute-matched control replays them on the baseline.
    budget: list = field(default_factory=list, repr=False)

    def checkpoint_dir(self, description: str) -> Path | None:
        """The folder for the stage's next training, numbered in call order, so a resumed
        stage (which trains in the same order) finds each training's checkpoints."""
        if self.checkpoints is None:
            return None
        self.trainings += 1
        slug = re.sub(r"[^a-z0-9]+", "-", description.lower()).strip("-")
        return Path(self.checkpoints) / f"{self.trainings:02d}-{slug}"


def register_stage(name: str, config: type, *, final: bool = False):
    """Decorator registering ``function(model, data, config, *, context) -> model`` as the
    stage ``name`` whose options are the dataclass ``config``; ``context`` is a
    :class:`StageContext`. The registered function also takes the options as keywords
    instead of a config (``prune(model, data, method="magnitude")``)."""

    def add(function: Callable) -> Callable:
        if name in STAGES:
            raise AssertionError(f"stage {name!r} is registered twice")  # a code bug
        own = set(inspect.signature(function).parameters) - {"model", "data", "config", "context"}

        @functools.wraps(function)
        def stage(model, data, config=None, *, context: StageContext | None = None, **options):
            # Called from Python, a stage takes its options as keywords (checked as a
            # recipe's are) or a config, and runs on the CPU with seed 0 without a context.
            extra = {key: options.pop(key) for key in list(options) if key in own}
            if config is None:
                config = STAGES[name].parse(options)
            elif options:
                raise TypeError(f"pass either a {type(config).__name__} or keyword options")
            return function(model, data, config, context=context or StageContext(), **extra)

        STAGES[name] = StageSpec(name, stage, config, final)
        return stage

    return add


def stage_spec(name: str) -> StageSpec:
    """The registered stage ``name``; a :class:`RecipeError` listing the stages otherwise."""
    if name not in STAGES:
        raise RecipeError(f"unknown stage {name!r}; {suggest(name, list(STAGES))}")
    return STAGES[name]


@dataclass(frozen=True)
class DatasetSpec:
    """A registered dataset: its recipe name, its loader and what a recipe is checked
    against before any file is read (None where only the files can tell)."""

    name: str
    # load(config, mean, std, seed) -> (train, test, num_classes): the two splits as
    # Datasets of (input, target), normalised with mean and std (one per channel).
    load: Callable
    channels: int | None = None  # image channels
    train_images: int | None = None  # size of the train split, before calibration is held out
    size: int | None = None  # native height and width
    mean: tuple[float, ...] | None = None  # normalisation, measured on the train split
    std: tuple[float, ...] | None = None
    task: str = "classification"  # a registered task (compress.spec.tasks)

    @property
    def summary(self) -> str:
        """The loader's first docstring line: what `compress list` says of it."""
        return (self.load.__doc__ or self.name).strip().splitlines()[0]


DATASETS: dict[str, DatasetSpec] = {}


def register_dataset(name: str, **facts: Any):
    """Decorator registering ``load(config, mean, std, seed) -> (train, test, num_classes)``
    as the dataset ``name`` of ``data.name``, with the :class:`DatasetSpec` facts.

    Example:
        >>> @register_dataset("stripes", channels=1, size=16, mean=(0.5,), std=(0.5,))
        ... def stripes(config, mean, std, seed):
        ...     \"\"\"Striped squares, labelled by orientation.\"\"\"
        ...     return train_split, test_split, 2
    """

    def add(load: Callable) -> Callable:
        if name in DATASETS:
            raise AssertionError(f"dataset {name!r} is registered twice")  # a code bug
        DATASETS[name] = DatasetSpec(name, load, **facts)
        return load

    return add


def dataset_spec(name: str) -> DatasetSpec:
    """The registered dataset ``name``; a :class:`RecipeError` listing the datasets otherwise."""
    if name not in DATASETS:
        raise RecipeError(
            f"data.name: unknown dataset {name!r}; {suggest(name, list(DATASETS))}"
            " or 'package.module:factory'"
        )
    return DATASETS[name]
