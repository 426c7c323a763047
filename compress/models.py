"""Models: torchvision classifiers by name, import paths, and local checkpoints.

A model built here carries its *spec* (``model.compress_spec``): the plain data needed to
build it again, which is what lets :func:`compress.save` store weights without pickling code.
"""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import torch
from torch import nn

from compress.recipe import ModelConfig, RecipeError


class ModelError(RuntimeError):
    """A model that cannot be built or loaded."""


def torchvision_models() -> list[str]:
    """Names of torchvision's classification builders."""
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def build_model(
    config: ModelConfig | dict | str,
    num_classes: int | None = None,
    in_channels: int | None = None,
    *,
    data=None,
) -> nn.Module:
    """Build the model a recipe's ``model`` section names, adapted to the data.

    ``config`` is a ModelConfig, the same as a mapping, or just a name. torchvision models
    get ``num_classes`` outputs and a first convolution that takes ``in_channels`` (both
    read from ``data`` when given; else 1000 and 3). A ``checkpoint`` (a state_dict file or
    a compress artifact folder) is loaded with ``weights_only=True``.

    Example:
        >>> model = build_model("resnet18", data=data)
        >>> model = build_model(ModelConfig(name="resnet18"), num_classes=10, in_channels=1)
    """
    from compress.recipe import section

    config = section("model", config)
    if data is not None:
        num_classes, in_channels = data.num_classes, data.input_shape[0]
    num_classes = 1000 if num_classes is None else num_classes
    in_channels = 3 if in_channels is None else in_channels
    if config.checkpoint and Path(config.checkpoint, "manifest.json").is_file():
        from compress.artifact import load

        return load(config.checkpoint, trust_code=config.trust_code, trusted_imports={config.name})
    spec = {
        "name": config.name,
        "kwargs": dict(config.kwargs),
        "num_classes": num_classes,
        "in_channels": in_channels,
        "weights": config.weights,
    }
    model = model_from_spec(spec)
    if config.checkpoint:
        load_state_dict_file(model, config.checkpoint)
    return model


def model_from_spec(spec: dict) -> nn.Module:
    """Build a model (random or pretrained weights) from its spec."""
    name = spec["name"]
    if ":" in name:
        model = _from_import_path(name, spec)
    else:
        model = _from_torchvision(name, spec)
    model.compress_spec = dict(spec)
    return model


def load_state_dict_file(model: nn.Module, path: str | Path) -> None:
    """Load a state_dict file into ``model`` strictly, never unpickling code."""
    from compress.artifact import ArtifactError, memory_cap, model_bytes, read_tensors

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"model.checkpoint: {str(path)!r} does not exist")
    try:
        # A training checkpoint holds the optimizer's state too: up to ~4x the weights.
        state = read_tensors(path, min(4 * model_bytes(model), memory_cap()), nested=True)
    except ArtifactError as error:
        raise ModelError(f"model.checkpoint: {error}") from None
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]  # a training checkpoint: take the model's weights
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise ModelError(
            f"model.checkpoint: {path} does not fit model {model.compress_spec['name']!r}:"
            f" {str(error).splitlines()[1].strip() if chr(10) in str(error) else error}"
        ) from None


def _from_import_path(path: str, spec: dict) -> nn.Module:
    module_name, _, factory_name = path.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), factory_name)
    except (ImportError, AttributeError) as error:
        raise RecipeError(
            f"model.name: cannot import {path!r} ({error}); expected"
            " 'package.module:factory' on the Python path"
        ) from None
    kwargs = dict(spec["kwargs"])
    # Hand the data's class and channel counts to factories that take them, unless given.
    accepted = inspect.signature(factory).parameters
    for key in ("num_classes", "in_channels"):
        if key in accepted and key not in kwargs:
            kwargs[key] = spec[key]
    model = factory(**kwargs)
    if not isinstance(model, nn.Module):
        raise ModelError(
            f"model.name: {path!r} returned {type(model).__name__}, not a torch.nn.Module"
        )
    # A factory that cannot be told the channel count gets its first convolution adapted,
    # as torchvision models by name do (e.g. torchvision.models:VisionTransformer).
    if "in_channels" not in accepted and "in_channels" not in kwargs:
        first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
        if first is not None and first.in_channels != spec["in_channels"]:
            _adapt_first_conv(model, spec["in_channels"])
    return model


def mlp(
    num_classes: int = 10, in_channels: int = 1, image_size: int = 28, hidden: int = 1024
) -> nn.Module:
    """A Linear-heavy classifier (flatten, two hidden layers): what dynamic INT8 is for.

    Use it from a recipe as ``model: {name: "compress.models:mlp", kwargs: {hidden: 1024}}``.
    """
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(in_channels * image_size * image_size, hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )


def check_model_name(name: str) -> None:
    """Raise :class:`RecipeError` unless ``name`` is a torchvision model or an import path."""
    if ":" in name:
        return  # imported (and checked) when the model is built
    names = torchvision_models()
    if name not in names:
        import difflib

        close = difflib.get_close_matches(name, names, n=3)
        hint = f"did you mean {', '.join(repr(c) for c in close)}? " if close else ""
        raise RecipeError(
            f"model.name: unknown model {name!r}; {hint}(allowed: a torchvision"
            f" classification model such as resnet18, mobilenet_v2, efficientnet_b0,"
            f" vit_b_16 — `python -m compress list` shows all {len(names)} — or"
            " 'package.module:factory')"
        )


def _from_torchvision(name: str, spec: dict) -> nn.Module:
    import torchvision

    check_model_name(name)
    kwargs = dict(spec["kwargs"])
    weights = spec.get("weights")
    if weights:
        # Pretrained weights come with their own head; the head is replaced below.
        model = torchvision.models.get_model(name, weights=weights, **kwargs)
        _replace_head(model, spec["num_classes"])
    else:
        model = torchvision.models.get_model(name, num_classes=spec["num_classes"], **kwargs)
    if spec["in_channels"] != 3:
        _adapt_first_conv(model, spec["in_channels"])
    return model


def forward_with_hooks(model: nn.Module, example: torch.Tensor, hook_for) -> None:
    """One no-grad forward of ``example`` with a temporary forward hook on every module for
    which ``hook_for(name, module)`` returns one (``hook(module, inputs, output)``).

    Example:
        >>> order = []
        >>> forward_with_hooks(model, x, lambda n, m: (lambda *_: order.append(n)))
    """
    hooks = []
    for name, module in model.named_modules():
        hook = hook_for(name, module)
        if hook is not None:
            hooks.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(example)
    finally:
        for hook in hooks:
            hook.remove()


def _adapt_first_conv(model: nn.Module, in_channels: int) -> None:
    """Give the first convolution ``in_channels`` inputs (pretrained RGB kernels averaged)."""
    for parent in model.modules():
        for child_name, child in parent.named_children():
            if isinstance(child, nn.Conv2d):
                conv = nn.Conv2d(
                    in_channels,
                    child.out_channels,
                    child.kernel_size,
                    child.stride,
                    child.padding,
                    child.dilation,
                    child.groups,
                    child.bias is not None,
                    child.padding_mode,
                )
                with torch.no_grad():
                    conv.weight.copy_(child.weight.mean(dim=1, keepdim=True).expand_as(conv.weight))
                    if child.bias is not None:
                        conv.bias.copy_(child.bias)
                setattr(parent, child_name, conv)
                return
    raise ModelError(
        f"cannot adapt {type(model).__name__} to {in_channels} input channels: no Conv2d"
    )


def _replace_head(model: nn.Module, num_classes: int) -> None:
    """Swap the last Linear layer for one with ``num_classes`` outputs."""
    last = None
    for parent in model.modules():
        for child_name, child in parent.named_children():
            if isinstance(child, nn.Linear):
                last = (parent, child_name, child)
    if last is None:
        raise ModelError(
            f"{type(model).__name__}: no Linear head to resize to {num_classes} classes"
        )
    parent, child_name, child = last
    if child.out_features != num_classes:
        setattr(parent, child_name, nn.Linear(child.in_features, num_classes))
