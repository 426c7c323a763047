"""Networks built from a *spec*: a torchvision classifier by name or an import path, adapted
to the data's classes and channels.

A spec is the plain data that builds a model again (``model.compress_spec``); it is what
lets a model folder store weights without pickling code.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import inspect
from typing import Any, cast

import torch
import torchvision
from torch import nn

from compress.core.errors import ModelError, RecipeError
from compress.core.traits import set_traits


@functools.cache  # read on every ModelConfig built: the list never changes in a process
def torchvision_models() -> tuple[str, ...]:
    """Names of torchvision's classification, segmentation and detection builders."""
    return (
        tuple(sorted(torchvision.models.list_models(module=torchvision.models)))
        + segmentation_models()
        + detection_models()
    )


@functools.cache
def segmentation_models() -> tuple[str, ...]:
    """Names of torchvision's semantic segmentation builders (lraspp_mobilenet_v3_large, ...)."""
    return tuple(sorted(torchvision.models.list_models(module=torchvision.models.segmentation)))


@functools.cache
def detection_models() -> tuple[str, ...]:
    """Names of torchvision's object detection builders (ssdlite320_mobilenet_v3_large, ...)."""
    return tuple(sorted(torchvision.models.list_models(module=torchvision.models.detection)))


class SegmentationOutput(nn.Module):
    """A torchvision segmenter whose output is its ``"out"`` logits (N, classes, H, W): the
    tensor export, quantization and the runtimes work on (the auxiliary head is off)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)["out"]


def model_from_spec(spec: dict) -> nn.Module:
    """Build a model (random or pretrained weights) from its spec."""
    name = spec["name"]
    if ":" in name:
        model = _from_import_path(name, spec)
    else:
        model = _from_torchvision(name, spec)
    return set_traits(model, compress_spec=dict(spec))


def import_factory(path: str, key: str):
    """The callable ``package.module:factory`` names (a recipe's own code, run by its
    author's choice); a :class:`RecipeError` naming ``key`` otherwise.

    Example:
        >>> factory = import_factory("my_project.models:small_net", "model.name")
    """
    module_name, _, factory_name = path.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), factory_name)
    except (ImportError, AttributeError, ValueError) as error:
        raise RecipeError(
            f"{key}: cannot import {path!r} ({error}); expected"
            " 'package.module:factory' on the Python path"
        ) from None
    if not callable(factory):
        raise RecipeError(f"{key}: {path!r} is not callable")
    return factory


def _from_import_path(path: str, spec: dict) -> nn.Module:
    factory = import_factory(path, "model.name")
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


def unknown_model(name: str) -> str | None:
    """Why ``name`` names no model (None when it is a torchvision model or an import path)."""
    if ":" in name:
        return None  # imported (and checked) when the model is built
    names = torchvision_models()
    if name in names:
        return None
    close = difflib.get_close_matches(name, names, n=3)
    hint = f"did you mean {', '.join(repr(c) for c in close)}? " if close else ""
    return (
        f"unknown model {name!r}; {hint}(allowed: a torchvision classification,"
        f" segmentation or detection model such as resnet18, mobilenet_v2, vit_b_16,"
        f" lraspp_mobilenet_v3_large, ssdlite320_mobilenet_v3_large — `python -m compress list`"
        f" shows all {len(names)} — or 'package.module:factory')"
    )


def input_problem(
    name: str, kwargs: dict, image_shape: tuple[int, int, int], training: bool = False
) -> str | None:
    """Why torchvision's network ``name`` cannot take one image of ``image_shape``
    (channels, height, width), in eval mode or in ``training`` mode, or None. Built and run
    on the meta device: no memory, no arithmetic (0.05 s for resnet18). Import paths are
    not imported here (that runs their code).

    Example:
        >>> input_problem("vgg11", {}, (1, 8, 8))
        'Given input size: (512x1x1). Calculated output size: (512x0x0). Output size is too small'
    """
    if ":" in name or unknown_model(name) or name in detection_models():
        return None  # a detector resizes its images itself (and makes anchors off meta)
    spec = {"name": name, "kwargs": kwargs, "num_classes": 10, "in_channels": image_shape[0]}
    try:
        with torch.device("meta"):
            model = model_from_spec({**spec, "weights": None}).train(training)
            model(torch.empty(1, *image_shape))
    except (NotImplementedError, TypeError, ModelError):  # the meta device cannot run this
        return None  # builder, or the kwargs are wrong: the run itself says which
    except (RuntimeError, AssertionError, ValueError) as error:
        return str(error).strip().splitlines()[0][:200]
    return None


def _from_torchvision(name: str, spec: dict) -> nn.Module:
    problem = unknown_model(name)
    if problem:
        raise RecipeError(f"model.name: {problem}")
    kwargs = dict(spec["kwargs"])
    weights = spec.get("weights")
    if name in detection_models():
        return _detector(name, kwargs, spec)
    if weights:
        # Pretrained weights come with their own head; the head is replaced below.
        model = torchvision.models.get_model(name, weights=weights, **kwargs)
        _replace_head(model, spec["num_classes"])
    else:
        if name in segmentation_models():  # no backbone weights fetched: nothing downloads
            kwargs.setdefault("weights_backbone", None)
        model = torchvision.models.get_model(name, num_classes=spec["num_classes"], **kwargs)
    if spec["in_channels"] != 3:
        _adapt_first_conv(model, spec["in_channels"])
    return SegmentationOutput(model) if name in segmentation_models() else model


def _detector(name: str, kwargs: dict, spec: dict) -> nn.Module:
    """torchvision's detector ``name`` for the data's classes (background included) and
    channels, taking images the data module has already normalised (its own normalisation
    is off), at ``kwargs["image_size"]`` pixels a side where given (else its own, e.g. 320).
    No weights are fetched unless the recipe names them."""
    channels = spec["in_channels"]
    size = kwargs.pop("image_size", None)
    kwargs.setdefault("weights_backbone", None)
    kwargs.setdefault("image_mean", [0.0] * channels)
    kwargs.setdefault("image_std", [1.0] * channels)
    weights = spec.get("weights")
    if weights:  # a COCO detector keeps its 91 classes' head: the data must have them
        model = torchvision.models.get_model(name, weights=weights, **kwargs)
    else:
        model = torchvision.models.get_model(name, num_classes=spec["num_classes"], **kwargs)
    if channels != 3:
        _adapt_first_conv(model, channels)
    if size is not None:
        transform = cast(Any, model.transform)  # a GeneralizedRCNNTransform
        transform.min_size, transform.max_size = (int(size),), int(size)
        if transform.fixed_size is not None:  # SSD: a fixed square input
            transform.fixed_size = (int(size), int(size))
    return model


def _adapt_first_conv(model: nn.Module, in_channels: int) -> None:
    """Give the first convolution ``in_channels`` inputs (pretrained RGB kernels averaged)."""
    for parent in model.modules():
        for child_name, child in parent.named_children():
            if isinstance(child, nn.Conv2d):
                pair = tuple[int, int]  # Conv2d's attributes are typed as any-length tuples
                conv = nn.Conv2d(
                    in_channels,
                    child.out_channels,
                    cast(pair, child.kernel_size),
                    cast(pair, child.stride),
                    cast("str | tuple[int, int]", child.padding),
                    cast(pair, child.dilation),
                    child.groups,
                    child.bias is not None,
                    child.padding_mode,
                )
                with torch.no_grad():
                    conv.weight.copy_(child.weight.mean(dim=1, keepdim=True).expand_as(conv.weight))
                    if child.bias is not None and conv.bias is not None:
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
