"""Models: the one a recipe's ``model`` section names (a spec, a state_dict file or a saved
model folder), and compress's own small factories.

A model built here carries its *spec* (``model.compress_spec``, see architectures.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import cast

from torch import nn

from compress.core.errors import ArtifactError, DataError, ModelError, RecipeError
from compress.core.storage import memory_cap, model_bytes, read_tensors
from compress.models.artifact import MANIFEST, POSITION_TABLES, load
from compress.models.hugging_face import (
    FACTORY,
    CausalLM,
    fill_hugging_face,
    is_hugging_face_folder,
    load_hugging_face,
)
from compress.spec.architectures import model_from_spec
from compress.spec.recipe import ModelConfig, as_config


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
    read from ``data`` when given; else 1000 and 3). A ``checkpoint`` (a state_dict file, a
    compress artifact folder, or a Hugging Face ``save_pretrained`` folder) is read as data.
    With ``data``, a model that cannot take its inputs is refused (:func:`check_fits_data`).

    Example:
        >>> model = build_model("resnet18", data=data)
        >>> model = build_model(ModelConfig(name="resnet18"), num_classes=10, in_channels=1)
    """
    config = as_config("model", config)
    if data is not None:
        num_classes, in_channels = data.num_classes, data.input_shape[0]
    num_classes = 1000 if num_classes is None else num_classes
    in_channels = 3 if in_channels is None else in_channels
    if config.checkpoint and Path(config.checkpoint, MANIFEST).is_file():
        model = load(config.checkpoint, trust_code=config.trust_code, trusted_imports={config.name})
        if data is not None:
            check_fits_data(model, data)
        return model
    kwargs, hugging_face_files = dict(config.kwargs), None
    if config.checkpoint and is_hugging_face_folder(config.checkpoint):
        if config.name != FACTORY:
            raise RecipeError(
                f"model.name: {config.name!r} with a Hugging Face folder as checkpoint;"
                f" allowed: {FACTORY!r}"
            )
        kwargs, hugging_face_files = load_hugging_face(config.checkpoint, num_classes)
    spec = {
        "name": config.name,
        "kwargs": kwargs,
        "num_classes": num_classes,
        "in_channels": in_channels,
        "weights": config.weights,
    }
    model = model_from_spec(spec)
    if hugging_face_files is not None:
        fill_hugging_face(
            cast(CausalLM, model), hugging_face_files, f"model.checkpoint: {config.checkpoint}"
        )
    elif config.checkpoint:
        load_state_dict_file(model, config.checkpoint)
    if data is not None:
        check_fits_data(model, data)
    return model


def check_fits_data(model: nn.Module, data) -> None:
    """One clear line when ``data``'s blocks of token ids are longer than ``model`` has
    positions for (``data.context`` against a GPT's ``context``), rather than an IndexError
    deep in its forward pass; images pass.

    Example:
        >>> data = build_data({"name": "shakespeare_char", "context": 64})
        >>> check_fits_data(gpt(num_classes=data.num_classes, context=32), data)
        DataError: data.context: 64 tokens is more than the model's 32 positions; ...
    """
    shape = tuple(getattr(data, "input_shape", ()))
    if len(shape) != 1:
        return  # not a sequence of token ids
    positions = [
        module.num_embeddings
        for name, module in model.named_modules()
        if isinstance(module, nn.Embedding) and name.rpartition(".")[2] in POSITION_TABLES
    ]
    if positions and shape[0] > min(positions):
        limit = min(positions)
        raise DataError(
            f"data.context: {shape[0]} tokens is more than the model's {limit} positions;"
            f" allowed: at most {limit} (set data.context: {limit}, or give the model"
            f" model.kwargs.context: {shape[0]} or more)"
        )


def load_state_dict_file(model: nn.Module, path: str | Path) -> None:
    """Load a state_dict file into ``model`` strictly, never unpickling code."""
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
            f"model.checkpoint: {path} does not fit model {getattr(model, 'compress_spec', {}).get('name')!r}:"
            f" {str(error).splitlines()[1].strip() if chr(10) in str(error) else error}"
        ) from None


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
