"""Recipes: the YAML schema as typed configs, loading, validation and ``--set`` overrides.

A recipe is read with PyYAML's safe loader only (plain data; a key given twice is an
error) and validated into the dataclasses below.
Every problem is a :class:`RecipeError` naming the file, the key path
(``stages[0].quantize.observer``), the bad value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml


class RecipeError(ValueError):
    """A recipe (or an override, or an option) that is not valid."""


# An integer option without its own upper bound takes at most this (a C int, what torch's
# and numpy's consumers of counts and sizes accept).
INT_MAX = 2**31 - 1
# A recipe's name names its run folder: a plain name, never a path.
RUN_NAME = r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}"
# Values a recipe may hold in all (aliases counted each time they are used): a recipe is a
# page of settings; this stops a small file that expands to millions of values.
MAX_RECIPE_VALUES = 100_000
MAX_RECIPE_DEPTH = 32
MAX_RECIPE_BYTES = 1 << 20


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a mapping that gives a key twice (which PyYAML would
    silently resolve to the last value)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                mark = key_node.start_mark
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice", mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


def read_yaml(text: str, source: str):
    """Plain data from YAML ``text``: a :class:`RecipeError` naming ``source`` and the line
    for anything that is not valid YAML, repeats a key, or nests or expands too far."""
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise RecipeError(f"{source}: not valid YAML{where}: {problem}") from None
    except RecursionError:
        raise RecipeError(f"{source}: nested too deeply to be a recipe") from None
    _check_size(data, source)
    return data


def _check_size(data, source: str) -> None:
    budget = [MAX_RECIPE_VALUES]

    def walk(value, depth):
        budget[0] -= 1
        if budget[0] < 0 or depth > MAX_RECIPE_DEPTH:
            raise RecipeError(
                f"{source}: nested too deeply (over {MAX_RECIPE_DEPTH} levels) or too large (over"
                f" {MAX_RECIPE_VALUES} values, aliases counted where used): not a recipe"
            )
        if isinstance(value, dict):
            for key, item in value.items():
                walk(key, depth + 1)
                walk(item, depth + 1)
        elif isinstance(value, list):
            for item in value:
                walk(item, depth + 1)

    walk(data, 0)


def _range(low: float | None = None, high: float | None = None) -> dict:
    return {"min": low, "max": high}


@dataclass
class ModelConfig:
    """Which model to start from."""

    # A torchvision classification builder ("resnet18", "mobilenet_v2", ...) or an import
    # path "package.module:factory" called with `kwargs`.
    name: str = "resnet18"
    # A local state_dict (.pt/.pth, loaded with weights_only=True) or a compress artifact
    # folder. When absent on Fashion-MNIST, `run` trains the baseline once and caches it.
    checkpoint: str | None = None
    # torchvision weights enum name, e.g. "DEFAULT". Downloads: for users with a network only.
    weights: str | None = None
    kwargs: dict = field(default_factory=dict)
    # A checkpoint folder whose spec names an import path runs that code when loaded:
    # refused unless this is true (as Hugging Face's trust_remote_code) or the path is
    # this recipe's own `name`.
    trust_code: bool = False


@dataclass
class DataConfig:
    """Which data, how it is split and batched."""

    name: Literal["fashion_mnist", "cifar10", "imagefolder", "synthetic"] = "fashion_mnist"
    root: str | None = None  # folder holding the dataset; searched first
    download: bool = False  # let torchvision fetch the dataset into `root` (needs a network)
    batch_size: int = field(default=128, metadata=_range(1, 65536))  # training batch
    eval_batch_size: int = field(
        default=250, metadata=_range(1, 65536)
    )  # 250 divides 10,000 evenly
    workers: int = field(default=0, metadata=_range(0, 256))  # DataLoader worker processes
    image_size: int | None = field(default=None, metadata=_range(8, 4096))  # pixels; None = native
    mean: list[float] | None = None  # per channel; default: the dataset's statistics
    std: list[float] | None = None
    calibration_size: int = field(default=1000, metadata=_range(1))  # images held out of train
    train_subset: int | None = field(default=None, metadata=_range(1))  # first N, for quick runs
    test_subset: int | None = field(default=None, metadata=_range(1))
    synthetic_size: int = field(default=512, metadata=_range(1))  # images per synthetic split
    synthetic_classes: int = field(default=10, metadata=_range(2))
    synthetic_channels: int = field(default=3, metadata=_range(1))


@dataclass
class TrainConfig:
    """The one training loop's settings (baseline training; later fine-tunes)."""

    epochs: int = field(
        default=4, metadata=_range(0)
    )  # resnet18 on Fashion-MNIST: ~91 % in ~4 min on 2 cores
    max_steps: int | None = field(default=None, metadata=_range(1))  # stop early, for quick runs
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = field(default=0.05, metadata=_range(0.0))  # peak learning rate
    momentum: float = field(default=0.9, metadata=_range(0.0, 1.0))  # sgd only
    weight_decay: float = field(default=5e-4, metadata=_range(0.0))
    schedule: Literal["onecycle", "cosine", "step", "constant"] = "onecycle"
    label_smoothing: float = field(default=0.0, metadata=_range(0.0, 0.5))
    grad_clip: float | None = field(default=None, metadata=_range(0.0))  # max grad L2 norm
    # Mixed precision on CUDA (autocast; fp16 adds loss scaling). CPU runs train in fp32.
    amp: Literal["off", "fp16", "bf16"] = "off"
    validate: bool = True  # top-1 on the calibration split (held out of train) each epoch
    use_best: bool = False  # end with the epoch that validated best, not the last one
    # Micro-batches of data.batch_size whose gradients add up to one optimizer step: the
    # batch of N x data.batch_size x processes in the memory of one micro-batch. Under
    # torchrun the ranks exchange gradients once per step, not once per micro-batch.
    accumulate: int = field(default=1, metadata=_range(1, 1024))
    # Intra-op threads per process. None: this machine's cores shared among the processes
    # of the run on it (all of them for a single process).
    threads: int | None = field(default=None, metadata=_range(1, 1024))


# How a quantization-aware fine-tune trains by default: short, gentle, from the trained model.
QAT_TRAINING = {"epochs": 1, "lr": 1e-3, "schedule": "cosine", "weight_decay": 0.0}


@dataclass
class QuantizeConfig:
    """`stages: - quantize: {...}`. Each method reads only some options (METHOD_OPTIONS)."""

    method: Literal[
        "int8_static", "int8_dynamic", "int8_qat", "fp16", "bf16", "int4_weight_only"
    ] = "int8_static"
    calibration_batches: int = field(default=16, metadata=_range(1))  # of data.eval_batch_size
    # Activation range estimator: histogram (torchao's x86 default, minimises the L2 error),
    # minmax, moving_average (of per-batch min/max), percentile (clips outliers).
    observer: Literal["minmax", "moving_average", "histogram", "percentile"] = "histogram"
    percentile: float = field(default=99.99, metadata=_range(90.0, 100.0))  # observer: percentile
    per_channel: bool = True  # one weight scale per output channel (else one per tensor)
    symmetric: bool = False  # activations' zero point fixed mid-range (else fitted to the range)
    # Layers kept in float: dotted module names, or "re:<regex>" patterns.
    skip: list[str] = field(default_factory=list)
    # Points of top-1 the stage may lose (measured on the calibration split); beyond it the
    # most sensitive layers go back to float one by one. Default: evaluate.max_accuracy_drop.
    max_accuracy_drop: float | None = field(default=None, metadata=_range(0.0))
    group_size: int = field(
        default=128, metadata=_range(8, 65536)
    )  # int4: weights sharing one scale
    fine_tune: TrainConfig = field(  # int8_qat: the shared training loop's settings
        default_factory=lambda: TrainConfig(**QAT_TRAINING), metadata={"defaults": QAT_TRAINING}
    )


_STATIC = {
    "calibration_batches",
    "observer",
    "percentile",
    "per_channel",
    "symmetric",
    "skip",
    "max_accuracy_drop",
}
# The options each method reads; setting another one is an error rather than a silent no-op.
METHOD_OPTIONS = {
    "int8_static": _STATIC,
    "int8_dynamic": {"skip", "max_accuracy_drop"},
    "int8_qat": {"skip", "fine_tune"},
    "fp16": set(),
    "bf16": set(),
    "int4_weight_only": {"group_size", "skip", "max_accuracy_drop"},
}
# Methods whose accuracy can be traded back layer by layer (they honour `skip`, cheaply).
FALLBACK_METHODS = {m for m, options in METHOD_OPTIONS.items() if "max_accuracy_drop" in options}


# A fine-tune after pruning: off unless asked (epochs: N), then a cosine decay from 0.01.
PRUNE_TRAINING = {"epochs": 0, "lr": 0.01, "schedule": "cosine"}


@dataclass
class PruneConfig:
    """`stages: - prune: {...}`. Each method reads only some options (PRUNE_METHOD_OPTIONS)."""

    method: Literal["magnitude", "structured"] = "structured"
    sparsity: float = field(default=0.5, metadata=_range(0.0, 0.99))  # magnitude: fraction of zeros
    scope: Literal["layer", "global"] = "layer"  # rank weights/channels per layer or all together
    steps: int = field(default=1, metadata=_range(1))  # magnitude: gradual steps, fine-tune between
    importance: Literal["l1", "l2", "taylor", "bn_scale", "random"] = (
        "l1"  # structured: channel ranking
    )
    # structured: one target at most — fraction of channels removed, fraction of the baseline's
    # MACs kept, or measured p50 ms at batch 1. None of them: ratio 0.5.
    ratio: float | None = field(default=None, metadata=_range(0.0, 0.99))
    target_macs: float | None = field(default=None, metadata=_range(0.01, 1.0))
    target_latency_ms: float | None = field(default=None, metadata=_range(0.0))
    iterative_steps: int = field(
        default=1, metadata=_range(1)
    )  # structured: ratio reached in N steps
    round_to: int | None = field(default=None, metadata=_range(1))  # channel counts a multiple of N
    max_layer_ratio: float = field(default=0.9, metadata=_range(0.0, 1.0))  # no layer pruned beyond
    # Modules never pruned (dotted names or "re:" patterns); structured default: the classifier head.
    ignore: list[str] = field(default_factory=list)
    # structured, when torch-pruning cannot handle the model: stop with an error, or go on
    # with the model unpruned and a warning in the report.
    on_unprunable: Literal["error", "skip"] = "error"
    fine_tune: TrainConfig = field(
        default_factory=lambda: TrainConfig(**PRUNE_TRAINING), metadata={"defaults": PRUNE_TRAINING}
    )


@dataclass
class LayerPair:
    """A student layer matched with a teacher layer (dotted module names), for the feature
    and attention losses."""

    student: str
    teacher: str
    weight: float = field(default=1.0, metadata=_range(0.0))  # this pair's loss weight


@dataclass
class DistillConfig:
    """`stages: - distill: {...}`: knowledge distillation through the shared training loop."""

    method: Literal["kd"] = "kd"  # Hinton's logit distillation, plus the losses below
    teacher: ModelConfig | None = None  # default: the run's baseline model
    student: ModelConfig | None = None  # default: the model coming out of the previous stage
    temperature: float = field(default=4.0, metadata=_range(1.0))  # softens both distributions
    alpha: float = field(
        default=0.9, metadata=_range(0.0, 1.0)
    )  # weight of the soft (teacher) term
    # Hint losses (FitNets): MSE between a student layer's output, through a 1x1 adapter
    # where channel counts differ, and a teacher layer's output.
    features: list[LayerPair] = field(default_factory=list)
    # Attention transfer (Zagoruyko & Komodakis, 2017): match the normalised spatial maps
    # of squared activations; the paper weighs each pair by about 1000.
    attention: list[LayerPair] = field(default_factory=list)
    # Compute the teacher's logits once, before training, instead of every step: the train
    # split has no random augmentation, so they never change. Logit distillation only.
    cache_teacher: bool = True
    train: TrainConfig = field(default_factory=TrainConfig)  # the student's training settings


# How weight sharing fine-tunes its codebooks by default: Adam, because each centroid's
# gradient is the sum over every weight in its cluster (thousands), which SGD would overshoot.
SHARE_TRAINING = {
    "epochs": 1,
    "optimizer": "adamw",
    "lr": 1e-4,
    "schedule": "cosine",
    "weight_decay": 0.0,
}


@dataclass
class ShareBits:
    """Codebook bits per layer type: 2^bits shared values per layer (null: not shared)."""

    conv: int | None = field(default=4, metadata=_range(1, 8))
    linear: int | None = field(default=5, metadata=_range(1, 8))


@dataclass
class ShareConfig:
    """`stages: - share: {...}`: k-means weight sharing (Deep Compression, Han et al. 2016)."""

    method: Literal["kmeans"] = "kmeans"
    bits: ShareBits = field(default_factory=ShareBits)
    # Where the centroids start: evenly over [min, max] (linear, best in Deep Compression),
    # at quantiles of the weights (density), or at seeded random weights (random).
    init: Literal["linear", "density", "random"] = "linear"
    iterations: int = field(default=30, metadata=_range(1))  # Lloyd iterations per layer
    skip: list[str] = field(default_factory=list)  # dotted names or "re:" patterns kept as they are
    fine_tune: TrainConfig = field(  # trains the centroids (weights stay on the codebook)
        default_factory=lambda: TrainConfig(**SHARE_TRAINING), metadata={"defaults": SHARE_TRAINING}
    )


@dataclass
class FactorizeConfig:
    """`stages: - factorize: {...}`: standard convolutions replaced by depthwise + pointwise
    pairs (and optionally Linear layers by two thin ones), fitted to the original weights.
    Recover the accuracy with a `distill` stage after it."""

    method: Literal["depthwise_separable"] = "depthwise_separable"
    # Which k x k convolutions (k > 1, groups 1): dotted names or "re:" patterns. Empty: every
    # such convolution with at least `min_in_channels` inputs whose replacement saves at
    # least `min_macs_saved` of the model's MACs.
    layers: list[str] = field(default_factory=list)
    min_in_channels: int = field(default=16, metadata=_range(1))  # a 1-channel stem fits badly
    min_macs_saved: float = field(default=0.005, metadata=_range(0.0, 1.0))  # of the model's
    # Linear layers too: rank of the split as a fraction of min(in, out); null: Linear kept.
    linear_rank: float | None = field(default=None, metadata=_range(0.01, 1.0))
    skip: list[str] = field(default_factory=list)  # never replaced


_STRUCTURED = {
    "importance",
    "scope",
    "ratio",
    "target_macs",
    "target_latency_ms",
    "iterative_steps",
    "round_to",
    "max_layer_ratio",
    "ignore",
    "fine_tune",
}
PRUNE_METHOD_OPTIONS = {
    "magnitude": {"sparsity", "scope", "steps", "ignore", "fine_tune"},
    "structured": _STRUCTURED,
}

# Stage name -> config class. A stage's module registers its function under the same name.
STAGE_CONFIGS: dict[str, type] = {
    "quantize": QuantizeConfig,
    "prune": PruneConfig,
    "distill": DistillConfig,
    "share": ShareConfig,
    "factorize": FactorizeConfig,
}
# Stage name -> method -> the options that method reads.
STAGE_METHOD_OPTIONS = {
    "quantize": METHOD_OPTIONS,
    "prune": PRUNE_METHOD_OPTIONS,
    "share": {"kmeans": {"bits", "init", "iterations", "skip", "fine_tune"}},
    "factorize": {
        "depthwise_separable": {
            "layers",
            "min_in_channels",
            "min_macs_saved",
            "linear_rank",
            "skip",
        }
    },
    "distill": {
        "kd": {
            "teacher",
            "student",
            "temperature",
            "alpha",
            "features",
            "attention",
            "cache_teacher",
            "train",
        }
    },
}


@dataclass
class Stage:
    """One item of `stages:`: its kind and its typed options."""

    kind: str
    config: Any

    @property
    def name(self) -> str:
        method = getattr(self.config, "method", None)
        return f"{self.kind}:{method}" if method else self.kind


@dataclass
class EvaluateConfig:
    """What the shared evaluator measures, and how."""

    latency_batch_size: int = field(default=1, metadata=_range(1, 4096))  # images per timed call
    warmup: int = field(default=10, metadata=_range(0))  # untimed calls before timing
    iterations: int = field(default=100, metadata=_range(1))  # timed calls
    # Threads for the timings (rank 0 alone, the others waiting). None: all usable cores, as
    # a deployment has; under torchrun each rank's accuracy share then uses cores / ranks.
    threads: int | None = field(default=None, metadata=_range(1, 1024))
    accuracy: bool = True  # False for latency-only runs (synthetic data)
    max_accuracy_drop: float | None = field(default=None, metadata=_range(0.0))  # points
    # Per-layer cost breakdown against this machine's measured peaks (report.md section).
    profile: bool = True
    # Where latency and top-1 are measured; the headline latency is the fastest of them, so
    # every ratio compares best deployment with best deployment. torch: the model as
    # `model(x)` runs it (eager float; INT8 compiles itself); inductor: torch.compile with
    # freezing; onnxruntime / openvino: exported and run there (compress[deploy]).
    # None: every installed one.
    runtimes: list[Literal["torch", "inductor", "onnxruntime", "openvino"]] | None = None


@dataclass
class Recipe:
    """A whole recipe. Build one with :func:`load_recipe` or :func:`parse_recipe`."""

    name: str = "recipe"  # a plain name: the run folder is runs/<name>/<timestamp>
    seed: int = field(default=0, metadata=_range(0, 2**32 - 1))  # numpy takes 32 bits
    device: Literal["auto", "cpu", "cuda"] = "auto"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    stages: list[Stage] = field(default_factory=list)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)

    def to_dict(self) -> dict:
        """The resolved recipe as plain data (what `recipe.yaml` in a run holds)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for key in ("model", "data", "train", "evaluate"):
            out[key] = dataclasses.asdict(out[key])
        out["stages"] = [{s.kind: dataclasses.asdict(s.config)} for s in self.stages]
        return out


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Read and validate a recipe file, applying ``key.path=value`` overrides.

    Example:
        >>> recipe = load_recipe("recipes/resnet_int8.yaml", ["data.batch_size=64"])
    """
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: no such recipe file")
    if path.stat().st_size > MAX_RECIPE_BYTES:
        raise RecipeError(f"{path}: {path.stat().st_size} bytes, too large to be a recipe")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise RecipeError(
            f"{path}: not UTF-8 text (byte {error.start}); save it as UTF-8"
        ) from None
    raw = read_yaml(text, str(path))
    raw = {} if raw is None else raw
    for override in overrides:
        raw = apply_override(raw, override, source=str(path))
    return parse_recipe(raw, source=str(path))


def parse_recipe(raw: Any, source: str = "<recipe>") -> Recipe:
    """Validate plain data (a parsed YAML document) into a :class:`Recipe`."""
    recipe = _parse_dataclass(Recipe, raw, "", source)
    _check_stage_order(recipe, source)
    for stage in recipe.stages:  # a quantize stage's target defaults to the run's
        if (
            stage.kind == "quantize"
            and stage.config.max_accuracy_drop is None
            and stage.config.method in FALLBACK_METHODS
        ):
            stage.config.max_accuracy_drop = recipe.evaluate.max_accuracy_drop
    from compress.models import check_model_name  # here: models imports this module

    try:
        check_model_name(recipe.model.name)
    except RecipeError as error:
        raise RecipeError(f"{source}: {error}") from None
    return recipe


def _check_stage_order(recipe: Recipe, source: str) -> None:
    """Order rules, checked before any work: a quantized model is final (QAT converts at its
    own end), so no stage may follow a quantize stage."""
    for index, stage in enumerate(recipe.stages):
        if stage.kind == "quantize" and index < len(recipe.stages) - 1:
            after = recipe.stages[index + 1]
            raise _fail(
                source,
                f"stages[{index + 1}].{after.kind}",
                f"cannot follow stages[{index}].quantize ({stage.config.method}): a quantized model"
                " is not trained, pruned or quantized again; put quantize last"
                " (e.g. prune → distill → quantize)",
            )


def section(name: str, value: Any) -> Any:
    """One top-level section (``model``, ``data``, ``train``, ``evaluate``) as its config:
    a config is returned as is, a mapping (or a model name) is validated like a recipe's.

    Example:
        >>> section("train", {"epochs": 1}).epochs
        1
    """
    cls = {f.name: f.type for f in dataclasses.fields(Recipe)}[name]
    if isinstance(value, globals()[cls] if isinstance(cls, str) else cls):
        return value
    if name == "model" and isinstance(value, str):
        value = {"name": value}
    return getattr(parse_recipe({name: value}, source="<arguments>"), name)


def parse_stage_options(kind: str, options: dict, source: str = "<options>") -> Any:
    """Validate one stage's options (as the Python API receives them) into its config."""
    return _parse_stage({kind: options}, "stages[0]", source).config


def apply_override(raw: Any, override: str, source: str = "<recipe>") -> dict:
    """Apply one ``key.path=value`` (value parsed as YAML) to the raw recipe data."""
    if "=" not in override:
        raise RecipeError(f"--set {override!r}: expected key.path=value, e.g. data.batch_size=64")
    key_path, value_text = override.split("=", 1)
    value = read_yaml(value_text, f"{source}: --set {key_path}")
    keys = [k for k in key_path.replace("[", ".").replace("]", "").split(".") if k]
    if not keys:
        raise RecipeError(f"--set {override!r}: empty key path")
    raw = {} if raw is None else raw
    node = raw
    for depth, key in enumerate(keys):
        last = depth == len(keys) - 1
        if isinstance(node, list):
            if not key.isdigit() or int(key) >= len(node):
                raise RecipeError(
                    f"{source}: --set {key_path}: index {key!r} is out of range"
                    f" (the list has {len(node)} items)"
                )
            key = int(key)
        elif not isinstance(node, dict):
            raise RecipeError(
                f"{source}: --set {key_path}: {'.'.join(keys[:depth])} is not a mapping"
            )
        if last:
            node[key] = value
        else:
            if isinstance(node, dict) and node.get(key) is None:
                node[key] = {}
            node = node[key]
    return raw


# ---------------------------------------------------------------------------- validation


def _fail(source: str, path: str, message: str) -> RecipeError:
    return RecipeError(f"{source}: {path or '<top>'}: {message}")


def _suggest(bad: Any, allowed: list[str]) -> str:
    close = difflib.get_close_matches(str(bad), [str(a) for a in allowed], n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"{hint}(allowed: {', '.join(str(a) for a in allowed)})"


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _parse_dataclass(cls: type, raw: Any, path: str, source: str):
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise _fail(source, path, f"expected a mapping of keys, got {raw!r}")
    fields_by_name = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields_by_name:
            raise _fail(
                source,
                _join(path, str(key)),
                f"unknown key {key!r}; {_suggest(key, list(fields_by_name))}",
            )
    for name, spec in fields_by_name.items():
        missing = (
            spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING
        )
        if missing and name not in raw:
            raise _fail(source, _join(path, name), f"required key {name!r} is missing")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, value in raw.items():
        key_path = _join(path, name)
        if name == "stages" and cls is Recipe:
            if not isinstance(value, list):
                raise _fail(
                    source,
                    key_path,
                    "expected a list of stages, e.g. [{quantize: {method: int8_static}}]",
                )
            values[name] = [
                _parse_stage(item, f"{key_path}[{i}]", source) for i, item in enumerate(value)
            ]
            continue
        values[name] = _coerce(hints[name], value, key_path, source, fields_by_name[name].metadata)
    return cls(**values)


def _parse_stage(item: Any, path: str, source: str) -> Stage:
    if isinstance(item, str):
        item = {item: {}}
    if not isinstance(item, dict) or len(item) != 1:
        raise _fail(
            source,
            path,
            f"each stage is a mapping with one key, the stage name; got {item!r}"
            f" (allowed stages: {', '.join(STAGE_CONFIGS)})",
        )
    kind, options = next(iter(item.items()))
    if kind not in STAGE_CONFIGS:
        raise _fail(
            source,
            f"{path}.{kind}",
            f"unknown stage {kind!r}; {_suggest(kind, list(STAGE_CONFIGS))}",
        )
    config = _parse_dataclass(STAGE_CONFIGS[kind], options, f"{path}.{kind}", source)
    allowed = STAGE_METHOD_OPTIONS[kind][config.method] | {"method"}
    for key in options or {}:
        if key not in allowed:
            raise _fail(
                source,
                f"{path}.{kind}.{key}",
                f"not used by method {config.method!r} (its options: {', '.join(sorted(allowed))})",
            )
    if kind == "prune" and config.method == "structured":
        targets = [
            k
            for k in ("ratio", "target_macs", "target_latency_ms")
            if getattr(config, k) is not None
        ]
        if len(targets) > 1:
            raise _fail(
                source,
                f"{path}.{kind}.{targets[1]}",
                f"give one target, not {' and '.join(targets)} (allowed: ratio, target_macs,"
                " target_latency_ms)",
            )
        if not targets:
            config.ratio = 0.5
    return Stage(kind, config)


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", str(hint).replace("typing.", ""))


def _coerce(hint: Any, value: Any, path: str, source: str, limits: dict | Any = None):
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:
            return _coerce(options[0], value, path, source, limits)
        raise AssertionError(f"unsupported union {hint}")  # schema bug, not user input
    if value is None:
        raise _fail(source, path, f"a value is required ({_type_name(hint)}), got null")
    if origin is Literal:
        if value not in args:
            return_text = f"{value!r} is not a valid choice; {_suggest(value, list(args))}"
            raise _fail(source, path, return_text)
        return value
    if dataclasses.is_dataclass(hint):
        defaults = (limits or {}).get("defaults", {})  # a nested config with its own defaults
        if isinstance(value, dict):
            value = {**defaults, **value}
        return _parse_dataclass(hint, value, path, source)
    if origin is list:
        if not isinstance(value, list):
            raise _fail(source, path, f"expected a list, got {value!r}")
        return [_coerce(args[0], v, f"{path}[{i}]", source) for i, v in enumerate(value)]
    if hint is dict or origin is dict:
        if not isinstance(value, dict):
            raise _fail(source, path, f"expected a mapping, got {value!r}")
        return dict(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise _fail(source, path, f"expected true or false, got {value!r}")
        return value
    if hint in (int, float):
        ok = isinstance(value, int if hint is int else (int, float)) and not isinstance(value, bool)
        if not ok:
            raise _fail(
                source,
                path,
                f"expected {'an integer' if hint is int else 'a number'}, got {value!r}",
            )
        if not math.isfinite(value):
            raise _fail(source, path, f"{value!r} is not a finite number")
        low, high = (limits or {}).get("min"), (limits or {}).get("max")
        if hint is int and high is None:
            high = INT_MAX
        if (low is not None and value < low) or (high is not None and value > high):
            bounds = f">= {low}" if high is None else f"between {low} and {high}"
            raise _fail(source, path, f"{value!r} is out of range (must be {bounds})")
        return hint(value)
    if hint is str:
        if not isinstance(value, str):
            raise _fail(source, path, f"expected a string, got {value!r}")
        if value.startswith("re:"):  # a module pattern: compiled now, not when a stage runs
            try:
                re.compile(value[3:])
            except re.error as error:
                raise _fail(source, path, f"{value!r} is not a valid regex ({error})") from None
        if path == "name" and not re.fullmatch(RUN_NAME, value):
            raise _fail(
                source,
                path,
                f"{value!r} is not a plain name: letters, digits, '.', '_' or '-', no '/' and"
                " not starting with '.' (it names the folder runs/<name>/)",
            )
        return value
    raise AssertionError(f"unsupported schema type {hint} at {path}")  # schema bug
