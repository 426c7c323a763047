"""Saving and loading models as data, never as pickled code.

An artifact is a folder: ``manifest.json`` (what the model is and how to rebuild it) plus
either ``weights.pt`` (a state_dict, read with ``weights_only=True``, for models with a
spec) or ``model.pt2`` (a ``torch.export`` archive, for quantized graphs and models
without a spec). Folders are written to a temporary name and renamed into place, so a
crash never leaves a half-written artifact, and an existing folder is never overwritten.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import zipfile
from pathlib import Path

import torch
from torch import nn

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


class ArtifactError(RuntimeError):
    """A model folder that is missing, malformed or unsafe to load."""


def save(model: nn.Module, path: str | Path, example: torch.Tensor | None = None) -> Path:
    """Save ``model`` to the folder ``path`` (which must not exist yet); returns the path.

    Example:
        >>> save(model, "out/model")
        >>> same = load("out/model")
    """
    from compress.quantize import MAX_BATCH, QuantizedModel

    path = Path(path)
    if path.exists():
        raise ArtifactError(f"{path} already exists; compress never overwrites a saved model")
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        manifest = {"format_version": FORMAT_VERSION}
        if isinstance(model, QuantizedModel):
            graph = model.reference_module
            batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
            example = _example_for(graph, example)
            program = torch.export.export(graph, (example,), dynamic_shapes=({0: batch},))
            torch.export.save(program, staging / "model.pt2")
            manifest.update(
                kind="quantized",
                file="model.pt2",
                param_counts=list(model.param_counts),
                notes=model.notes,
                compute_dtype=model.compute_dtype,
                element_bytes=model.element_bytes,
                input_shape=list(example.shape[1:]),
            )
        elif hasattr(model, "compress_spec"):
            torch.save(model.state_dict(), staging / "weights.pt")
            manifest.update(kind="state_dict", file="weights.pt", spec=model.compress_spec)
        else:
            if example is None:
                raise ArtifactError(
                    f"{type(model).__name__} was not built by compress: pass an example"
                    " input to save(), so that it can be exported as a graph"
                )
            batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
            example = _batch_of_two(example)
            program = torch.export.export(model.eval(), (example,), dynamic_shapes=({0: batch},))
            torch.export.save(program, staging / "model.pt2")
            manifest.update(kind="exported", file="model.pt2", input_shape=list(example.shape[1:]))
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
        os.replace(staging, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def load(path: str | Path) -> nn.Module:
    """Load a model folder written by :func:`save`, in eval mode.

    Example:
        >>> model = load("runs/resnet_int8/20261128-1500/model")
    """
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise ArtifactError(f"{path} is not a compress model folder (no {MANIFEST})")
    try:
        manifest = json.loads(manifest_path.read_text())
        kind, file = manifest["kind"], path / manifest["file"]
    except (ValueError, KeyError) as error:
        raise ArtifactError(f"{manifest_path} is malformed: {error}") from None
    if not file.is_file() or file.parent != path:
        raise ArtifactError(
            f"{path}: the manifest names {manifest['file']!r}, which is not in the folder"
        )
    if kind == "state_dict":
        from compress.models import load_state_dict_file, model_from_spec

        model = model_from_spec(manifest["spec"])
        load_state_dict_file(model, file)
        return model.eval()
    if kind in ("quantized", "exported"):
        graph = _load_exported(file)
        if kind == "exported":
            return graph
        from compress.quantize import QuantizedModel

        model = QuantizedModel(graph, tuple(manifest["param_counts"]), manifest.get("notes", []))
        return model.eval()
    raise ArtifactError(
        f"{manifest_path}: unknown kind {kind!r} (allowed: state_dict, quantized, exported)"
    )


def _example_for(graph: nn.Module, example: torch.Tensor | None) -> torch.Tensor:
    """An input of 2 images for re-exporting ``graph`` (batch 1 would be specialised)."""
    if example is None:
        placeholder = next(n for n in graph.graph.nodes if n.op == "placeholder")
        value = placeholder.meta.get("val")
        if value is None:
            raise ArtifactError(
                "cannot infer the input shape of the quantized graph; pass example="
            )
        example = torch.zeros(2, *[int(d) for d in value.shape[1:]])
    return _batch_of_two(example)


def _batch_of_two(example: torch.Tensor) -> torch.Tensor:
    return (
        example if example.shape[0] == 2 else example[:1].expand(2, *example.shape[1:]).contiguous()
    )


def _load_exported(file: Path) -> nn.Module:
    """``torch.export.load`` after checking that nothing in the archive would be unpickled.

    torch.export stores plain tensors as raw bytes, but it can also hold pickled tensor
    subclasses, custom objects and pickled sample inputs; a file with any of those is
    refused rather than loaded.
    """
    try:
        with zipfile.ZipFile(file) as archive:
            for name in archive.namelist():
                if name.endswith(("_weights_config.json", "_constants_config.json")):
                    for fqn, entry in json.loads(archive.read(name))["config"].items():
                        path_name = entry.get("path_name", "")
                        if entry.get("use_pickle") or not path_name.startswith(
                            ("weight_", "tensor_")
                        ):
                            raise ArtifactError(
                                f"{file}: entry {fqn!r} would be unpickled; refused"
                                " (compress loads only plain tensors)"
                            )
                elif "/sample_inputs/" in name:
                    torch.load(io.BytesIO(archive.read(name)), weights_only=True)
                elif name.endswith(".pt") and "/data/" in name:
                    raise ArtifactError(f"{file}: legacy pickled entry {name!r}; refused")
    except zipfile.BadZipFile:
        raise ArtifactError(f"{file} is not a torch.export archive") from None
    except ArtifactError:
        raise
    except Exception as error:  # noqa: BLE001 - weights_only refused the sample inputs
        raise ArtifactError(
            f"{file}: not loadable as data only ({str(error).splitlines()[0]}); refused"
        ) from None
    # The quantize/dequantize ops of a PT2E graph live in torchao: register them first.
    import torchao.quantization.pt2e.quantize_pt2e  # noqa: F401

    return torch.export.load(file).module()
