"""The prune stage: unstructured magnitude pruning and structured channel pruning.

* ``magnitude``: the smallest |w| of every Conv/Linear weight set to zero, per layer or
  globally, optionally in gradual steps with fine-tuning between them
  (``torch.nn.utils.prune`` holds the masks while training; they are made permanent at
  the end, so no hooks or mask buffers remain).
* ``structured``: channels really removed, with torch-pruning's dependency graph keeping
  every coupled layer (residual adds, depthwise convolutions, norms) consistent. The
  target is a channel ``ratio``, a fraction of the baseline's MACs (``target_macs``) or a
  measured p50 latency (``target_latency_ms``). In a transformer whose attention layers
  have a ``heads`` count and q/k/v Linear layers (compress.models.gpt, the Llama form),
  whole heads go at the same ratio as the MLP's channels, and the residual width, tied to
  the embedding tables, stays. ``layers: N`` removes N whole blocks first (depth).

Over 400 lines because both methods share what a prune stage is: the layers it may touch,
its fine-tunes, the latency target's search over amounts and the per-layer report; apart,
each half would import the other's.

A pruned model keeps its spec, and ``compress.save`` stores the new per-layer shapes as
data next to the weights, so that ``compress.load`` rebuilds it without unpickling code.
"""

from __future__ import annotations

import copy
import logging
import math
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn
from torch.nn.utils import prune as torch_prune
from torchvision.ops import SqueezeExcitation

from compress.core import distributed
from compress.core.errors import PruningError, RecipeError
from compress.core.modules import forward_with_hooks, matching_modules
from compress.core.registry import StageContext, register_stage
from compress.core.schema import Config, FieldError, option
from compress.core.traits import add_note, set_traits
from compress.data import Data
from compress.measure.counts import count_flops
from compress.measure.latency import measure_latency
from compress.measure.machine import channel_block
from compress.models.artifact import mark_changed, register_architecture_change
from compress.models.detector import head_outputs, pyramid_backbone, split_detector
from compress.spec.recipe import TrainConfig
from compress.spec.tasks import get_task
from compress.training.train import train

log = logging.getLogger("compress")
PRUNABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)

# A fine-tune after pruning: off unless asked (epochs: N), then a cosine decay from 0.01.
PRUNE_TRAINING: dict[str, Any] = {"epochs": 0, "lr": 0.01, "schedule": "cosine"}
MAGNITUDE, STRUCTURED = ("magnitude",), ("structured",)
TARGETS = ("ratio", "target_macs", "target_latency_ms")
DEFAULT_RATIO = 0.5  # structured, when no target is given


@dataclass
class PruneConfig(Config):
    """`stages: - prune: {...}`. Each option says which methods read it."""

    # magnitude: the smallest weights set to zero (unstructured); structured: channels removed.
    method: Literal["magnitude", "structured"] = "structured"
    sparsity: float = option(0.5, min=0.0, max=0.99, methods=MAGNITUDE)  # fraction of zeros
    # Rank weights (magnitude) or channels (structured) per layer or all together.
    scope: Literal["layer", "global"] = "layer"
    steps: int = option(
        1, min=1, methods=MAGNITUDE
    )  # reach the sparsity in N steps, fine-tuning between
    # Channel ranking; taylor reads gradients of 4 training batches.
    importance: Literal["l1", "l2", "taylor", "bn_scale", "random"] = option(
        "l1", methods=STRUCTURED
    )
    # One target at most: the fraction of channels removed (ratio); the fraction of the
    # baseline's MACs kept (target_macs, pruned in 50 small steps until the count reaches
    # it, the last group by group where it would go 2 points past); or a p50 ms at batch 1
    # (target_latency_ms, measured after each step). None: ratio 0.5.
    ratio: float | None = option(None, min=0.0, max=0.99, methods=STRUCTURED)
    target_macs: float | None = option(None, min=0.01, max=1.0, methods=STRUCTURED)  # see ratio
    target_latency_ms: float | None = option(None, min=0.0, methods=STRUCTURED)  # see ratio
    iterative_steps: int = option(1, min=1, methods=STRUCTURED)  # ratio reached in N steps
    # Each layer's channels rounded to a multiple of N. Default (null): the block ONNX
    # Runtime's convolutions run channels in on this CPU (16 with AVX-512, 8 with AVX2; read
    # from the runtime), each layer to the nearest multiple: a layer between blocks falls off
    # its blocked kernels (pruned MobileNets ran 2-3x slower there unrounded). A number given
    # here rounds down for a ratio (at least the ratio goes), to the nearest for a MACs or
    # latency target. 1: counts as the ranking leaves them. A layer keeps one block at least
    # (one no wider stays whole); rounding may take a layer a block past max_layer_ratio.
    round_to: int | None = option(None, min=1, methods=STRUCTURED)
    # No layer loses more than this fraction of its channels.
    max_layer_ratio: float = option(0.9, min=0.0, max=1.0, methods=STRUCTURED)
    # Whole blocks removed from the model's longest stack of blocks that keep their input's
    # shape (a transformer's layers): the N whose output differs least from their input on
    # calibration data (ShortGPT's block influence), before any channel target, which then
    # applies to the blocks left (ratio: 0 for depth alone). Where a step's time is one
    # launch per layer (decoding a small model), only fewer layers make it faster.
    layers: int = option(0, min=0, methods=STRUCTURED)
    # Modules never pruned (dotted names or "re:" patterns). Default: the last Conv/Linear to
    # run, the classifier head (SqueezeNet's is a convolution).
    ignore: list[str] = option(default_factory=list)
    # When torch-pruning cannot handle the model: stop with an error, or go on with the
    # model unpruned and a warning in the report.
    on_unprunable: Literal["error", "skip"] = option("error", methods=STRUCTURED)
    # Training after pruning, through the shared loop: off unless epochs or max_steps is set.
    fine_tune: TrainConfig = option(
        default_factory=lambda: TrainConfig(**PRUNE_TRAINING), defaults=PRUNE_TRAINING
    )

    def check(self) -> None:
        if self.method != "structured":
            return
        targets = [key for key in TARGETS if getattr(self, key) is not None]
        if len(targets) > 1:
            raise FieldError(
                targets[1],
                f"give one target, not {' and '.join(targets)} (allowed: {', '.join(TARGETS)})",
            )
        if not targets:
            self.ratio = DEFAULT_RATIO


@register_stage("prune", PruneConfig)
def prune(
    model: nn.Module,
    data: Data,
    config: PruneConfig,
    *,
    context: StageContext,
) -> nn.Module:
    """Prune a copy of ``model`` as ``config`` (or keyword options) says; fine-tune if asked.

    Example:
        >>> pruned = prune(model, data, method="structured", target_macs=0.5)
        >>> sparse = prune(model, data, method="magnitude", sparsity=0.8, fine_tune={"epochs": 1})
    """
    if config.method == "magnitude":
        return _magnitude(copy.deepcopy(model).cpu().eval(), data, config, context)
    refusal = getattr(model, "structured_pruning_refusal", None)  # e.g. GPT-2's fused q/k/v
    if refusal:
        raise RecipeError(
            f"prune.method: 'structured' cannot prune this model: {refusal}; allowed:"
            " 'magnitude' (zeros in place, shapes kept)"
        )
    model = copy.deepcopy(model).cpu().eval()
    depth = _prune_depth(model, data, config.layers) if config.layers else None
    pruned = _structured(model, data, config, context)
    if depth is not None:
        mark_changed(pruned, "depth")
        details = getattr(pruned, "stage_details", None) or {}
        set_traits(pruned, stage_details={**details, "depth": depth})
        add_note(
            pruned,
            f"{config.layers} of the {depth['blocks_before']} blocks in {depth['stack']} removed"
            f" (block influence, the lowest): {', '.join(map(str, depth['removed']))}",
        )
    return pruned


def ignored_modules(
    model: nn.Module, patterns: list[str], example: torch.Tensor | None = None
) -> list[str]:
    """Names ``patterns`` select; with none given, the output layers (the classifier head).

    The output layer is the last Conv/Linear to run on ``example``: a Linear head for most
    models, a 1x1 convolution for SqueezeNet. Pruning it would drop classes. Every other
    layer with as many outputs as the model's output has channels goes with it: a
    segmenter's heads whose logits are summed (LR-ASPP's low and high classifiers).
    """
    if patterns:
        return matching_modules(model, patterns, key="prune.ignore")
    if example is None:
        linear = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
        return linear[-1:]
    order: list[tuple[str, int]] = []

    def record(name, module):
        if not isinstance(module, PRUNABLE):
            return None
        axis = -1 if isinstance(module, nn.Linear) else 1  # features, or channels
        return lambda _m, _i, output: order.append((name, output.shape[axis]))

    output = forward_with_hooks(model, example, record)
    output = output["out"] if isinstance(output, dict) else output
    if not order:
        return []
    last, _ = order[-1]
    width = output.shape[1] if isinstance(output, torch.Tensor) and output.ndim > 1 else None
    heads = {n for n, channels in order if channels == width and width}
    return [last, *sorted(heads - {last})]


def layer_table(before: nn.Module, after: nn.Module) -> list[dict]:
    """Per prunable layer: output channels and sparsity before and after."""
    old = {n: m for n, m in before.named_modules() if isinstance(m, PRUNABLE)}
    rows = []
    for name, module in after.named_modules():
        if name in old:
            rows.append(
                {
                    "layer": name,
                    "channels_before": old[name].weight.shape[0],
                    "channels_after": module.weight.shape[0],
                    "sparsity_before": _sparsity(old[name].weight),
                    "sparsity_after": _sparsity(module.weight),
                }
            )
    return rows


# ----------------------------------------------------------------------------- magnitude


def _magnitude(
    model: nn.Module, data: Data, config: PruneConfig, context: StageContext
) -> nn.Module:
    original = copy.deepcopy(model)
    skipped = set(ignored_modules(model, config.ignore)) if config.ignore else set()
    layers = [
        (n, m) for n, m in model.named_modules() if isinstance(m, PRUNABLE) and n not in skipped
    ]
    for step in range(1, config.steps + 1):
        target = config.sparsity * step / config.steps  # gradual: an even share per step
        _apply_magnitude_masks(layers, target, config.scope)
        if config.fine_tune.epochs or config.fine_tune.max_steps:
            fine_tune = copy.copy(config.fine_tune)
            fine_tune.epochs = (
                max(1, config.fine_tune.epochs // config.steps) if config.fine_tune.epochs else 0
            )
            train(model, data, fine_tune, desc=f"fine-tune {step}/{config.steps}", context=context)
    for _, module in layers:
        torch_prune.remove(module, "weight")  # masks made permanent: plain weights remain
    model.eval()
    dense_mb = sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 1e6
    set_traits(
        model,
        stage_details={"layers": layer_table(original, model)},
        notes=[
            f"unstructured sparsity: dense kernels multiply the zeros too, so there is no"
            f" latency gain; the weights are {dense_mb:.2f} MB dense, and the artifact (the"
            " size column) stores only the non-zero ones"
        ],
    )
    return model


def _graph_failure(error: Exception) -> str:
    """Why torch-pruning could not build its graph, in words a user can act on where the
    failure is a known one, else its first line."""
    frames = {frame.name for frame in traceback.extract_tb(error.__traceback__)}
    if "update_reshape_index_mapping" in frames:  # ZeroDivisionError inside torch-pruning
        return (
            "a view or reshape that splits the channels into groups (a channel shuffle, as"
            " in ShuffleNet) is not a dependency torch-pruning can follow (method: magnitude"
            " prunes such a model, unstructured)"
        )
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else type(error).__name__


def _apply_magnitude_masks(
    layers: Sequence[tuple[str, nn.Conv1d | nn.Conv2d | nn.Conv3d | nn.Linear]],
    sparsity: float,
    scope: str,
) -> None:
    weights = [m.weight.detach().abs() for _, m in layers]
    if scope == "global":
        everything = torch.cat([w.flatten() for w in weights])
        thresholds = [_kth(everything, sparsity)] * len(weights)
    else:
        thresholds = [_kth(w.flatten(), sparsity) for w in weights]
    for (_, module), weight, threshold in zip(layers, weights, thresholds, strict=True):
        torch_prune.custom_from_mask(module, "weight", (weight > threshold).to(weight.dtype))


def _kth(values: torch.Tensor, fraction: float) -> float:
    k = int(round(fraction * values.numel()))
    return -1.0 if k == 0 else values.kthvalue(k).values.item()


def _sparsity(weight: torch.Tensor) -> float:
    return 1.0 - torch.count_nonzero(weight).item() / weight.numel()


# ---------------------------------------------------------------------------- structured


def _structured(
    model: nn.Module, data: Data, config: PruneConfig, context: StageContext
) -> nn.Module:
    original = copy.deepcopy(model)
    try:
        net, example, ignored = _what_to_prune(model, data, config)
    except PruningError as error:  # a part torch-pruning cannot take, said up front
        return _unprunable(original, config, str(error))
    importance = {
        "l1": lambda: tp.importance.MagnitudeImportance(p=1),
        "l2": lambda: tp.importance.MagnitudeImportance(p=2),
        "taylor": tp.importance.TaylorImportance,
        "bn_scale": tp.importance.BNScaleImportance,
        "random": tp.importance.RandomImportance,
    }[config.importance]()
    # For MACs and latency targets, prune in many small steps and stop when the target is met.
    searching = config.target_macs is not None or config.target_latency_ms is not None
    steps = 50 if searching else config.iterative_steps
    # torch-pruning caps layers at max_pruning_ratio in global pruning only: cap here too.
    asked = config.ratio if config.ratio is not None else DEFAULT_RATIO  # set by the config
    ratio = config.max_layer_ratio if searching else min(asked, config.max_layer_ratio)
    round_to = config.round_to or channel_block() or 1
    heads = _head_options(net, ratio)
    if heads:  # the residual width, tied to the embedding tables, stays
        ignored += [n for n, m in net.named_modules() if isinstance(m, nn.Embedding)]
    ignored, grid_note = _grid_restriction(net, example, ignored)
    try:
        nearest = searching or config.round_to is None
        pruner = (_NearestRounding if nearest else tp.pruner.BasePruner)(
            net,
            example,
            importance=importance,
            global_pruning=config.scope == "global",
            pruning_ratio=ratio,
            max_pruning_ratio=config.max_layer_ratio,
            iterative_steps=steps,
            ignored_layers=[net.get_submodule(n) for n in ignored],
            round_to=round_to if round_to > 1 else None,
            **heads,
        )
    except Exception as error:  # noqa: BLE001 - torch-pruning's graph tracing failures
        why = f"cannot build the dependency graph of {type(model).__name__}"
        return _unprunable(original, config, f"torch-pruning {why}: {_graph_failure(error)}")
    base_flops = count_flops(net, example)
    with torch.random.fork_rng():  # random importance draws from the run's seed alone
        torch.manual_seed(context.seed)
        try:
            reached = _prune_steps(net, data, config, pruner, steps, example, base_flops)
        except (IndexError, KeyError, ValueError, RuntimeError) as error:  # its graph's gaps
            why = f"failed pruning {type(model).__name__}'s coupled layers"
            return _unprunable(original, config, f"torch-pruning {why}: {_graph_failure(error)}")
    model.eval()
    if config.fine_tune.epochs or config.fine_tune.max_steps:
        train(model, data, config.fine_tune, desc="fine-tune", context=context)
    mark_changed(model, "shapes")
    macs_ratio = count_flops(net, example) / base_flops
    layers = layer_table(original, model)
    details = {"layers": layers, "macs_ratio": macs_ratio, "round_to": round_to}
    notes = [grid_note] if grid_note else []
    set_traits(model, stage_details=details, notes=notes + _rounding_note(config, round_to, layers))
    if not searching and asked > config.max_layer_ratio:
        add_note(
            model,
            f"ratio={config.ratio} is more than max_layer_ratio={config.max_layer_ratio}:"
            f" each layer lost {config.max_layer_ratio} of its channels",
        )
    if not reached:
        target = (
            f"target_macs={config.target_macs}"
            if config.target_macs is not None
            else f"target_latency_ms={config.target_latency_ms}"
        )
        add_note(
            model,
            f"{target} not reached with every layer pruned up to max_layer_ratio="
            f"{config.max_layer_ratio}: MACs are {macs_ratio:.2f}x"
            " the baseline's",
        )
    return model


def _rounding_note(config: PruneConfig, round_to: int, layers: list[dict]) -> list[str]:
    """Say where the channel block came from when the runtime chose it and layers narrowed."""
    narrowed = any(r["channels_after"] != r["channels_before"] for r in layers)
    if config.round_to is not None or round_to == 1 or not narrowed:
        return []
    return [
        f"channels rounded to multiples of {round_to}, the block ONNX Runtime's convolutions"
        " run in on this CPU (prune.round_to: 1 keeps exact counts)"
    ]


class _NearestRounding(tp.pruner.BasePruner):
    """torch-pruning's pruner with ``round_to`` as its docstring says: a layer keeps the
    multiple nearest to the channels its ranking keeps. Its code rounds down, which suits a
    ratio given with its own ``round_to`` (at least that much goes), but made the first 2 %
    step of a MACs search take a whole block from every layer at once (0.41x MACs where 0.5x
    was asked), and the runtime's block of 16 halve a 32-channel layer at a 0.25 ratio."""

    def _round_to(self, n_pruned: int, current_channels: int, round_to: int) -> int:
        kept = round((current_channels - n_pruned) / round_to) * round_to
        return max(current_channels - max(kept, round_to), 0)

    def get_target_head_pruning_ratio(self, module) -> float:
        """The ratio that makes torch-pruning's step leave the nearest whole number of the
        heads the layer started with, one at least. It removes ceil(ratio x the heads left)
        at each step, the ratio being the steps' total so far: a 50-step MACs search took a
        head a step until none was left (a ZeroDivisionError in the model's forward)."""
        total = super().get_target_head_pruning_ratio(module)
        initial, left = self.init_num_heads.get(module), self.num_heads.get(module)
        if not initial or not left:
            return total
        remove = left - max(1, initial - int(total * initial + 0.5))
        return (remove - 0.5) / left if remove > 0 else 0.0  # torch-pruning takes the ceil


# Modules a block's hidden channels pass through one for one, between the layer that makes
# them and the one that reads them (an MLP's two Linear layers, an inverted bottleneck's
# expanding and projecting convolutions). Depthwise convolutions count too (see _passes).
_CHANNELWISE = (
    nn.GELU,
    nn.ReLU,
    nn.ReLU6,
    nn.SiLU,
    nn.Hardswish,
    nn.Tanh,
    nn.Dropout,
    nn.Identity,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    SqueezeExcitation,  # scales each channel by a gate it computes from them
)


def _grid_restriction(
    model: nn.Module, example: torch.Tensor, ignored: list[str]
) -> tuple[list[str], str | None]:
    """The layers to leave whole, and a note: for a model that runs Linear layers on image
    grids, every layer but those making a block's hidden channels (an MLP's first Linear,
    an inverted bottleneck's expanding convolution, with what prunes along); else as given."""
    if not _linear_on_grids(model, example):
        return ignored, None
    hidden = _hidden_groups(model, example, ignored)
    makers = {n for names in hidden.values() for n in names}
    whole = [n for n, m in model.named_modules() if isinstance(m, PRUNABLE) and n not in makers]
    mlps = sum(isinstance(model.get_submodule(n), nn.Linear) for n in hidden)
    convs = f" and {len(hidden) - mlps} convolution blocks" if len(hidden) > mlps else ""
    return whole, (
        f"only the hidden channels of {mlps} MLPs{convs} pruned: the model runs Linear"
        " layers on channels-last image grids (Swin, MaxViT), whose reshapes"
        " torch-pruning maps channel by position (its groups grew past 8 GiB on swin_t)"
    )


def _linear_on_grids(model: nn.Module, example: torch.Tensor) -> bool:
    """Whether a Linear layer runs on a 4-D activation: tokens kept as a channels-last image
    grid (Swin's and MaxViT's windows), not a sequence."""
    seen: list[int] = []

    def record(_name, module):
        if isinstance(module, nn.Linear):
            return lambda _m, args, _output: seen.append(args[0].dim())
        return None

    forward_with_hooks(model, example, record)
    return 4 in seen


def _passes(module: nn.Module) -> bool:
    """Whether ``module`` maps each channel to itself (channelwise, or a depthwise conv)."""
    if isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d):
        return module.groups == module.in_channels == module.out_channels > 1
    return isinstance(module, _CHANNELWISE)


def _hidden_groups(
    model: nn.Module, example: torch.Tensor, ignored: list[str]
) -> dict[str, list[str]]:
    """Each layer whose output reaches another layer through channelwise modules alone
    (an MLP's first Linear, an inverted bottleneck's expanding conv), mapped to the layers
    whose output channels prune with it: where its torch-pruning group of one channel stays
    inside the block the two share. Found by following tensors, since the groups of every
    layer on a grid model's residual stream grow without bound (and are never built)."""
    # id(tensor): the layer that made its channels, and the tensor (kept, so that no later
    # tensor takes its id)
    produced: dict[int, tuple[str, torch.Tensor]] = {}
    consumer: dict[str, str] = {}  # maker: the layer that reads them

    def follow(name, module):
        def hook(_m, args, output):
            source = produced.get(id(args[0])) if args else None
            if _passes(module):
                if source is not None:
                    produced[id(output)] = (source[0], output)
            else:
                if source is not None:
                    consumer[source[0]] = name
                produced[id(output)] = (name, output)

        return hook if isinstance(module, PRUNABLE) or _passes(module) else None

    forward_with_hooks(model, example, follow)
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=example)
    names = {module: name for name, module in model.named_modules()}
    hidden: dict[str, list[str]] = {}
    for name in sorted(set(consumer) - set(ignored)):
        block = _common_parent(name, consumer[name])
        module = model.get_submodule(name)
        if not block or module not in graph.module2node:
            continue  # between two blocks: a residual stream's layer
        pruner = graph.get_pruner_of_module(module)
        group = graph.get_pruning_group(module, pruner.prune_out_channels, idxs=[0])
        members = [
            (names[d.target.module], d.handler) for d, _ in group if d.target.module in names
        ]
        if all(n.startswith(block) for n, _ in members):
            out = {n for n, handler in members if graph.is_out_channel_pruning_fn(handler)}
            hidden[name] = sorted(out)
    return hidden


def _common_parent(a: str, b: str) -> str:
    """The dotted prefix two module names share, ending in a dot ("" for none)."""
    shared = []
    for x, y in zip(a.split(".")[:-1], b.split(".")[:-1], strict=False):
        if x != y:
            break
        shared.append(x)
    return ".".join(shared) + "." if shared else ""


def _what_to_prune(model: nn.Module, data: Data, config: PruneConfig):
    """The module torch-pruning traces, the input it traces with, and the layers whose
    output channels stay: the model and its classifier; an SSD's network (backbone and
    head, which share their layers with it) and the head's outputs (classes and boxes per
    anchor); a pyramid detector's backbone (R-CNN's heads do not trace: proposals, ROI
    pooling) and the pyramid's levels."""
    split, pyramid = split_detector(model), pyramid_backbone(model)
    if split is None and pyramid is None:
        example = data.example_input(1)
        return model, example, ignored_modules(model, config.ignore, example)
    ignored = matching_modules(model, config.ignore, key="prune.ignore") if config.ignore else []
    if pyramid is not None:
        backbone, levels = pyramid
        frozen = [n for n, m in backbone.named_modules() if type(m).__name__ == "FrozenBatchNorm2d"]
        if frozen:  # torch-pruning leaves its buffers whole: the next forward would fail
            raise PruningError(
                f"cannot prune {type(model).__name__}'s backbone: its batch norms are frozen"
                f" (FrozenBatchNorm2d, e.g. backbone.{frozen[0]}: a detector built with"
                " pretrained weights), which torch-pruning does not prune"
            )
        example = cast(Any, model).transform(list(data.example_input(1)))[0].tensors
        # Names within the backbone (itself: ""); the heads are never pruned anyway.
        inside = [
            n.removeprefix("backbone").removeprefix(".")
            for n in ignored
            if n == "backbone" or n.startswith("backbone.")
        ]
        return backbone, example, sorted({*inside, *levels})
    assert split is not None
    example = split.resized(data.example_input(1))
    inside = [n for n in ignored if n.split(".")[0] in ("backbone", "head")]  # the network's
    return split.network, example, sorted({*inside, *head_outputs(model)})


def _unprunable(original: nn.Module, config: PruneConfig, message: str) -> nn.Module:
    """The model unpruned with a note (on_unprunable: skip), else one line."""
    if config.on_unprunable == "skip":
        log.warning("prune: %s; left unpruned (on_unprunable: skip)", message)
        return set_traits(original, notes=[f"left unpruned (on_unprunable: skip): {message}"])
    raise PruningError(f"{message} (set on_unprunable: skip to go on without pruning)")


def _prune_steps(model, data, config, pruner, steps, example, base_flops) -> bool:
    """torch-pruning's steps: all of them for a ratio (iterative_steps reach it gradually),
    until the target is met for MACs or measured latency; whether it was."""
    searching = config.target_macs is not None or config.target_latency_ms is not None
    reached, previous = not searching, base_flops  # the MACs before the step
    for step in range(steps):
        if config.importance == "taylor":
            _taylor_gradients(model, data)
        # A MACs search can undo its step: a copy of the weights (a ratio's steps need none).
        before = _snapshot(model, pruner) if config.target_macs is not None else None
        pruner.step()
        _sync_heads(model, pruner)
        model.zero_grad(set_to_none=True)
        if config.target_macs is not None:
            target = config.target_macs * base_flops
            flops = count_flops(model, example)
            reached = flops <= target
            if before and flops < target - MACS_TOLERANCE * base_flops:  # well past it
                _restore(model, pruner, before)
                if config.importance == "taylor":
                    _taylor_gradients(model, data)
                _step_until(model, pruner, example, target, previous)
            previous = flops
        if config.target_latency_ms is not None:
            p50 = measure_latency(model.eval(), example, warmup=3, iterations=30).p50
            log.info(
                "prune step %d: p50 %.3f ms (target %.3f)", step, p50, config.target_latency_ms
            )
            # Under torchrun rank 0's clock decides, so that every rank prunes alike.
            reached = distributed.broadcast_object(p50 <= config.target_latency_ms)
        if searching and reached:
            break
    return reached


# A MACs search's last step lands at most this fraction of the baseline's MACs under the
# target: past it, the step is taken again group by group. Rounding to the runtime's block
# of 16 makes every layer of a width lose a block in the same step (squeezenet1_1 went
# from 0.55x to 0.40x in one step where 0.5x was asked).
MACS_TOLERANCE = 0.02


def _step_until(
    model: nn.Module, pruner, example: torch.Tensor, target: float, flops: float
) -> None:
    """One pruning step taken group by group (torch-pruning's interactive step), stopping
    at the first group after which the model's MACs are at most ``target``; ``flops``: the
    model's count before the step.

    Between groups the count is estimated: ``flops`` scaled as the conv and Linear layers'
    MACs are (from their channel counts and the output positions one forward recorded), so
    that a step of 50 groups costs one more count, not 50; that count decides."""
    positions = _output_positions(model, example)
    layers = max(_layer_macs(model, positions), 1)
    groups = pruner.step(interactive=True)
    for group in groups:
        group.prune()
        if flops * _layer_macs(model, positions) / layers <= target:
            break
    for group in groups:  # the other layers' MACs fell short: exact counts from here
        _sync_heads(model, pruner)  # an attention layer's forward reads its head count
        if count_flops(model, example) <= target:
            break
        group.prune()
    _sync_heads(model, pruner)
    model.zero_grad(set_to_none=True)


def _output_positions(model: nn.Module, example: torch.Tensor) -> dict[str, int]:
    """Each conv and Linear layer's output positions (pixels, tokens) for ``example``."""
    positions: dict[str, int] = {}

    def record(name, module):
        if not isinstance(module, PRUNABLE):
            return None
        width = -1 if isinstance(module, nn.Linear) else 1  # features, channels
        return lambda m, _args, out: positions.__setitem__(name, out.numel() // out.shape[width])

    forward_with_hooks(model, example, record)
    return positions


def _layer_macs(model: nn.Module, positions: dict[str, int]) -> int:
    """The MACs of the layers in ``positions`` at their present channel counts."""
    total = 0
    for name, count in positions.items():
        m = model.get_submodule(name)
        if isinstance(m, nn.Linear):
            total += count * m.in_features * m.out_features
        elif isinstance(m, nn.Conv1d | nn.Conv2d | nn.Conv3d):
            kernel = math.prod(m.kernel_size)
            total += count * m.out_channels * (m.in_channels // m.groups) * kernel
    return total


def _snapshot(model: nn.Module, pruner) -> tuple:
    """What a pruning step changes: shape attributes, tensors, and the pruner's step and
    per-layer counts (heads, and the channel groups it keeps equal to them).

    The tensors are kept, not copied: torch-pruning gives a layer it prunes new, smaller
    tensors and leaves the old ones as they were, so a snapshot costs no second copy of the
    weights (a copy doubled a large model's peak memory). Their version counters are
    kept too: :func:`_restore` refuses tensors changed in place since."""
    shapes = {n: {a: getattr(m, a) for a in _shape_attributes(m)} for n, m in model.named_modules()}
    tensors = {k: (v.detach(), v._version) for k, v in model.state_dict().items()}
    counts = {a: dict(getattr(pruner, a)) for a in _PRUNER_COUNTS if hasattr(pruner, a)}
    joins = {  # torch-pruning's concatenations and splits: the sizes of their parts
        op: {a: copy.copy(getattr(op, a)) for a in _JOIN_SIZES if hasattr(op, a)}
        for op in pruner.DG.module2node
        if isinstance(op, _JOINS)
    }
    return shapes, tensors, pruner.current_step, counts, joins


_PRUNER_COUNTS = ("num_heads", "out_channel_groups", "in_channel_groups")
_JOINS = (tp.ops._ConcatOp, tp.ops._SplitOp, tp.ops._UnbindOp)
_JOIN_SIZES = ("concat_sizes", "split_sizes", "offsets")


def _restore(model: nn.Module, pruner, snapshot: tuple) -> None:
    """The model and pruner as :func:`_snapshot` saw them, in place: the same modules and
    parameter objects, which torch-pruning's graph refers to."""
    shapes, tensors, step, counts, joins = snapshot
    for name, attributes in shapes.items():
        module = model.get_submodule(name)
        for attribute, value in attributes.items():
            setattr(module, attribute, value)
    changed = [key for key, (value, version) in tensors.items() if value._version != version]
    if changed:  # the snapshot shares them: what it saw is gone
        raise PruningError(f"a pruning step changed {changed[0]} in place: it cannot be undone")
    for key, (value, _version) in tensors.items():
        owner_name, _, attribute = key.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        getattr(owner, attribute).data = value
    pruner.current_step = step
    for attribute, values in counts.items():
        getattr(pruner, attribute).update(values)
    for op, sizes in joins.items():
        for attribute, value in sizes.items():
            setattr(op, attribute, value)
    _sync_heads(model, pruner)


# Attention layers whose heads prune whole: their query, key and value Linear layers, as
# compress's GPT names them (it keeps a ``heads`` count) and as Llama, Mistral and Qwen2 do
# (they keep ``head_dim`` and infer the count).
_ATTENTION_FORMS = (("query", "key", "value"), ("q_proj", "k_proj", "v_proj"))


def _attention_layers(model: nn.Module) -> list[tuple[nn.Module, list[nn.Linear], int]]:
    """Each self-attention layer with one key and value head per query head: the layer, its
    query, key and value Linear layers, and its head count."""
    found = []
    for m in model.modules():
        for names in _ATTENTION_FORMS:
            linears = [x for n in names if isinstance(x := getattr(m, n, None), nn.Linear)]
            if len(linears) < len(names):
                continue
            heads = getattr(m, "heads", None)
            head_dim = getattr(m, "head_dim", None)
            if not isinstance(heads, int) and isinstance(head_dim, int) and head_dim > 0:
                heads = linears[0].out_features // head_dim
            if isinstance(heads, int) and len({x.out_features for x in linears}) == 1:
                found.append((m, linears, heads))
    return found


def _head_options(model: nn.Module, ratio: float) -> dict:
    """torch-pruning's options that remove whole heads (``ratio`` of each layer's), never
    a part of one; none for a model without such attention layers."""
    layers = _attention_layers(model)
    if not layers:
        return {}
    return {
        "num_heads": {linear: heads for _, linears, heads in layers for linear in linears},
        "prune_num_heads": True,
        "prune_head_dims": False,
        "head_pruning_ratio": ratio,
    }


def _sync_heads(model: nn.Module, pruner) -> None:
    """Each attention layer's head count after a step, as torch-pruning left it (a layer
    that infers its count from ``head_dim`` needs none)."""
    counts = getattr(pruner, "num_heads", {})
    for m, linears, heads in _attention_layers(model):
        if isinstance(getattr(m, "heads", None), int):
            m.heads = counts.get(linears[0], heads)


def _taylor_gradients(model: nn.Module, data: Data, batches: int = 4) -> None:
    """Accumulate gradients on a few training batches: Taylor importance reads them."""
    model.train()
    model.zero_grad(set_to_none=True)
    task = get_task(data.task)
    for i, batch in enumerate(data.loader("train", shuffle=True)):
        if i >= batches:
            break
        inputs, targets, _ = task.split(batch)
        task.loss(task.output(model(inputs)), targets).backward()
    model.eval()


# ------------------------------------------------------------------------------- depth

Stack = nn.Sequential | nn.ModuleList  # blocks in order, whole ones removable


def _prune_depth(model: nn.Module, data: Data, layers: int) -> dict:
    """Remove ``layers`` whole blocks of ``model``'s stack in place, those of least
    influence; what was removed, as the report's stage details."""
    refusal = getattr(model, "depth_pruning_refusal", None)
    if refusal or split_detector(model) is not None or pyramid_backbone(model) is not None:
        why = refusal or "a detector's blocks change their input's shape"
        raise RecipeError(f"prune.layers: {layers}: cannot remove blocks of this model: {why}")
    name, stack = _block_stack(model, data.example_input(1))
    if layers >= len(stack):
        raise RecipeError(
            f"prune.layers: {layers} is not fewer than the {len(stack)} blocks of {name}"
            f" (allowed: 0 to {len(stack) - 1})"
        )
    influence = _block_influence(model, stack, data)
    removed = sorted(sorted(range(len(stack)), key=influence.__getitem__)[:layers])
    kept = [block for i, block in enumerate(stack) if i not in removed]
    _set_stack(model, name, _stack_of(stack, kept))
    set_traits(model, compress_depth_stack=name)
    return {
        "stack": name,
        "blocks_before": len(stack),
        "removed": removed,
        "influence": [round(x, 5) for x in influence],
    }


def _block_stack(model: nn.Module, example: torch.Tensor) -> tuple[str, Stack]:
    """The longest ``nn.Sequential`` or ``nn.ModuleList`` of blocks of one type, each
    keeping its input's shape in a forward pass of ``example`` (a transformer's layers)."""
    stacks: dict[str, Stack] = {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, (nn.Sequential, nn.ModuleList))
        and len(m) >= 2
        and len({type(block) for block in m}) == 1
    }
    blocks = {id(block) for stack in stacks.values() for block in stack}
    keeps: dict[int, bool] = {}

    def hook_for(_name: str, module: nn.Module):
        def hook(m, inputs, output):
            same = bool(inputs) and isinstance(inputs[0], torch.Tensor)
            same = same and isinstance(output, torch.Tensor) and output.shape == inputs[0].shape
            keeps[id(m)] = keeps.get(id(m), True) and same

        return hook if id(module) in blocks else None

    forward_with_hooks(model, example, hook_for)
    found = [(n, m) for n, m in stacks.items() if all(keeps.get(id(b), False) for b in m)]
    if not found:
        raise RecipeError(
            f"prune.layers: {type(model).__name__} has no stack of blocks that keep their"
            " input's shape (an nn.Sequential or nn.ModuleList of one block type); allowed: 0"
        )
    return max(found, key=lambda item: len(item[1]))


def _block_influence(model: nn.Module, stack: Stack, data: Data, batches: int = 4):
    """Each block's influence (ShortGPT): 1 minus the mean cosine similarity of its output
    to its input, per token (per example for other shapes), over calibration batches."""
    index = {id(block): i for i, block in enumerate(stack)}
    sums, counts = [0.0] * len(index), [0] * len(index)

    def hook_for(_name: str, module: nn.Module):
        def hook(m, inputs, output):
            cosine = F.cosine_similarity(_rows(inputs[0]), _rows(output), dim=-1)
            sums[index[id(m)]] += cosine.sum().item()
            counts[index[id(m)]] += cosine.numel()

        return hook if id(module) in index else None

    task = get_task(data.task)
    for i, batch in enumerate(data.loader("calibration")):
        if i >= batches:
            break
        forward_with_hooks(model, task.split(batch)[0], hook_for)
    return [1.0 - total / max(count, 1) for total, count in zip(sums, counts, strict=True)]


def _rows(t: torch.Tensor) -> torch.Tensor:
    """A block's input or output as rows to compare: tokens (N, T, W), else examples."""
    return (t.flatten(0, 1) if t.dim() == 3 else t.flatten(1)).float()


def _stack_of(stack: Stack, blocks: list[nn.Module]) -> Stack:
    return nn.Sequential(*blocks) if isinstance(stack, nn.Sequential) else nn.ModuleList(blocks)


def _set_stack(model: nn.Module, name: str, stack: nn.Module) -> None:
    parent, _, attribute = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attribute, stack)


def _stack_length(model: nn.Module) -> dict:
    name = getattr(model, "compress_depth_stack")  # noqa: B009 - a trait, typed as Tensor
    return {"stack": name, "blocks": len(cast(Stack, model.get_submodule(name)))}


@register_architecture_change("depth", capture=_stack_length, order=-1)  # before shapes
def apply_depth(model: nn.Module, depth: dict) -> None:
    """Shorten a freshly built model's stack to its saved length, in place (the blocks'
    weights come after); ``depth`` may come from a file."""
    name, blocks = str(depth.get("stack") or ""), depth.get("blocks")
    stack = model.get_submodule(name) if name else None
    if not isinstance(stack, (nn.Sequential, nn.ModuleList)) or type(blocks) is not int:
        raise ValueError(f"depth {depth!r} is not a stack of the model's and a length")
    if not 1 <= blocks <= len(stack):
        raise ValueError(f"depth: {blocks} blocks of {name} (it has {len(stack)})")
    _set_stack(model, name, _stack_of(stack, list(stack)[:blocks]))
    set_traits(model, compress_depth_stack=name)


# --------------------------------------------------------------------- shapes as data


# Module type -> the constructor attributes that pruning changes (saved, then restored).
_SHAPE_ATTRIBUTES = {
    nn.Conv1d: ("in_channels", "out_channels", "groups"),
    nn.Conv2d: ("in_channels", "out_channels", "groups"),
    nn.Conv3d: ("in_channels", "out_channels", "groups"),
    nn.Linear: ("in_features", "out_features"),
    nn.BatchNorm1d: ("num_features",),
    nn.BatchNorm2d: ("num_features",),
    nn.BatchNorm3d: ("num_features",),
    nn.GroupNorm: ("num_channels", "num_groups"),
    nn.LayerNorm: ("normalized_shape",),
}


def _shape_attributes(module: nn.Module) -> tuple[str, ...]:
    """What pruning may change in ``module``: its type's entry, or a model's own module's
    ``shape_attributes`` (an attention layer's ``heads``)."""
    own = getattr(type(module), "shape_attributes", ())
    return _SHAPE_ATTRIBUTES.get(type(module), tuple(own) if isinstance(own, tuple) else ())


def module_shapes(model: nn.Module) -> dict:
    """Every module's shape attributes and every tensor's shape: the pruned architecture as data."""
    modules = {
        name: {attr: _plain(getattr(m, attr)) for attr in _shape_attributes(m)}
        for name, m in model.named_modules()
        if _shape_attributes(m)
    }
    tensors = {k: list(v.shape) for k, v in model.state_dict().items()}
    return {"modules": modules, "tensors": tensors}


@register_architecture_change("shapes", capture=module_shapes, order=1)
def apply_shapes(model: nn.Module, shapes: dict) -> None:
    """Resize a freshly built model to ``shapes`` (from :func:`module_shapes`), in place.

    ``shapes`` may come from a file: only the shape attributes of known module types are
    set, each to integers, and only tensors the model already has are resized.
    """
    state = model.state_dict()
    for name, attrs in shapes["modules"].items():
        module = model.get_submodule(name)
        allowed = _shape_attributes(module)
        for attr, value in attrs.items():
            if attr not in allowed or not _is_shape_value(value):
                raise ValueError(
                    f"{name}.{attr} = {value!r} is not a shape of {type(module).__name__}"
                )
            setattr(module, attr, tuple(value) if isinstance(value, list) else value)
    for key, shape in shapes["tensors"].items():
        if key not in state or not _is_shape_value(shape) or not isinstance(shape, list):
            raise ValueError(f"tensor {key!r} with shape {shape!r} is not one of the model's")
        owner_name, _, attr = key.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        current = getattr(owner, attr)
        if current is None or list(current.shape) == shape:
            continue
        empty = torch.empty(shape, dtype=current.dtype)
        if isinstance(current, nn.Parameter):
            setattr(owner, attr, nn.Parameter(empty, requires_grad=current.requires_grad))
        else:
            owner.register_buffer(attr, empty)


def _is_shape_value(value) -> bool:
    if isinstance(value, list):
        return len(value) <= 8 and all(_is_shape_value(v) for v in value)
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 31


def _plain(value):
    return list(value) if isinstance(value, tuple) else value
