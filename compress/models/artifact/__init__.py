"""Saving and loading models as data, never as code.

An artifact is a folder: ``manifest.json`` (its ``kind`` and how to rebuild it) plus data
files. A model built by compress is stored as its *spec* (a registered builder's name and
plain arguments) and its tensors; a graph (a quantized model, a model without a spec) as a
list of operations from an allow-list plus its tensors. Loading a folder never imports a
module or calls a function named in it (unless ``trust_code``), never evaluates an
expression from it, never unpickles code and never loads native code; every file it reads is
bounded by what the manifest and the architecture imply. Folders are written to a temporary
name and renamed into place, so a crash never leaves a half-written artifact, and an
existing folder is never overwritten.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from compress.core.errors import ArtifactError
from compress.models.artifact.changes import (
    ARCHITECTURE_CHANGES,
    ArchitectureChange,
    architecture_changes,
    mark_changed,
    register_architecture_change,
)
from compress.models.artifact.graph import graph_file, load_graph, save_graph
from compress.models.artifact.inputs import (
    INPUT_DTYPES,
    POSITION_TABLES,
    dtype_name,
    example_batch,
    graph_input,
    input_dtype,
    recorded_input,
    token_limit,
)
from compress.models.artifact.manifest import (
    FORMAT_VERSION,
    LOADERS,
    MANIFEST,
    MAX_BATCH,
    MAX_JSON_BYTES,
    SAFE_FACTORIES,
    Trust,
    data_file,
    manifest_counts,
    read_manifest,
    read_weights,
    register_loader,
)
from compress.models.artifact.state import fill_state, save_state, spec_architecture


def save(model: nn.Module, path: str | Path, example: torch.Tensor | None = None) -> Path:
    """Save ``model`` to the folder ``path`` (which must not exist yet); returns the path.

    A compressed model writes itself through ``save_artifact(folder, example) -> manifest``;
    a model built by compress is stored as its spec plus a state_dict; any other model is
    exported as a graph, which needs an ``example`` input.

    Example:
        >>> save(model, "out/model")
        >>> same = load("out/model")
    """
    path = Path(path)
    if path.exists():
        raise ArtifactError(f"{path} already exists; compress never overwrites a saved model")
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        saves_itself = getattr(model, "save_artifact", None)  # a kind that saves itself
        if saves_itself is not None:
            manifest = saves_itself(staging, example)
        elif hasattr(model, "compress_spec"):
            manifest = save_state(model, staging)
        else:
            if example is None:
                raise ArtifactError(
                    f"{type(model).__name__} was not built by compress: pass an example"
                    " input to save(), so that it can be exported as a graph"
                )
            manifest = {"kind": "exported", "file": save_graph(model.eval(), staging, example)}
        manifest["format_version"] = FORMAT_VERSION
        if example is not None:  # what `compress export` needs to trace the model again
            manifest.setdefault("input_shape", list(example.shape[1:]))
            manifest.setdefault("input_dtype", dtype_name(example.dtype))  # ids are integers
        hugging_face = getattr(model, "save_hugging_face", None)  # transformers loads it too
        if hugging_face is not None:
            why_not = hugging_face(staging / "hugging_face")
            if why_not:
                manifest["hugging_face"] = why_not
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
        try:
            os.rename(staging, path)  # fails if the folder appeared meanwhile: never merged
        except OSError:
            raise ArtifactError(
                f"{path} appeared while saving; compress never overwrites a saved model"
            ) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def load(path: str | Path, *, trust_code: bool = False, trusted_imports: Iterable[str] = ()):
    """Load a model folder written by :func:`save`, in eval mode.

    A folder whose spec names an import path ('package.module:factory') runs that code, so
    it is refused unless ``trust_code`` or the path is in ``trusted_imports``.

    Example:
        >>> model = load("runs/resnet_int8/20261128-1500/model")
        >>> model = load("downloaded/model", trust_code=True)  # you trust its author
    """
    path = Path(path)
    manifest = read_manifest(path)
    model = LOADERS[manifest["kind"]](path, manifest, Trust(trust_code, frozenset(trusted_imports)))
    return model.eval()


__all__ = [
    "ARCHITECTURE_CHANGES",
    "FORMAT_VERSION",
    "INPUT_DTYPES",
    "LOADERS",
    "MANIFEST",
    "MAX_BATCH",
    "MAX_JSON_BYTES",
    "POSITION_TABLES",
    "SAFE_FACTORIES",
    "ArchitectureChange",
    "ArtifactError",
    "Trust",
    "architecture_changes",
    "data_file",
    "dtype_name",
    "example_batch",
    "fill_state",
    "graph_file",
    "graph_input",
    "input_dtype",
    "load",
    "load_graph",
    "manifest_counts",
    "mark_changed",
    "read_manifest",
    "read_weights",
    "recorded_input",
    "register_architecture_change",
    "register_loader",
    "save",
    "save_graph",
    "save_state",
    "spec_architecture",
    "token_limit",
]
