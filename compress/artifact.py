"""Saving and loading models as data, never as pickled code.

An artifact is a folder: ``manifest.json`` (its ``kind`` and how to rebuild it) plus
data files: a state_dict read with ``weights_only=True`` for models with a spec, or a
``torch.export`` archive for graphs (quantized graphs, models without a spec). Folders are written to a temporary name and renamed into place, so a
crash never leaves a half-written artifact, and an existing folder is never overwritten.
"""

from __future__ import annotations

import io
import json
import lzma
import os
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


class ArtifactError(RuntimeError):
    """A model folder that is missing, malformed or unsafe to load."""


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
        if hasattr(model, "save_artifact"):
            manifest = model.save_artifact(staging, example)
        elif hasattr(model, "compress_spec"):
            manifest = save_state(model, staging)
        else:
            if example is None:
                raise ArtifactError(
                    f"{type(model).__name__} was not built by compress: pass an example"
                    " input to save(), so that it can be exported as a graph"
                )
            manifest = {"kind": "exported", "file": save_exported(model.eval(), staging, example)}
        manifest["format_version"] = FORMAT_VERSION
        if example is not None:  # what `compress export` needs to trace the model again
            manifest.setdefault("input_shape", list(example.shape[1:]))
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
    import compress.quantize  # noqa: F401 - registers the loaders of quantized kinds

    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise ArtifactError(f"{path} is not a compress model folder (no {MANIFEST})")
    try:
        manifest = json.loads(manifest_path.read_text())
        kind = manifest["kind"]
    except (ValueError, KeyError) as error:
        raise ArtifactError(f"{manifest_path} is malformed: {error}") from None
    if "file" in manifest:
        file = path / manifest["file"]
        if not file.is_file() or file.parent != path:
            raise ArtifactError(
                f"{path}: the manifest names {manifest['file']!r}, which is not in the folder"
            )
    if kind not in LOADERS:
        raise ArtifactError(
            f"{manifest_path}: unknown kind {kind!r} (allowed: {', '.join(sorted(LOADERS))})"
        )
    model = LOADERS[kind](path, manifest)
    try:
        model.eval()
    except NotImplementedError:  # an exported graph has no train/eval modes: already inference
        pass
    return model


def write_atomic(path: Path, content: str | Callable[[Path], None]) -> None:
    """Write ``content`` (text, or a function that writes a given path) to a temporary file
    beside ``path``, then rename it into place: a crash never leaves a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        if callable(content):
            content(tmp)
        else:
            tmp.write_text(content)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# kind -> loader(folder, manifest) -> model. Compressed model types register theirs.
LOADERS: dict[str, Callable[[Path, dict], nn.Module]] = {}


def register_loader(kind: str):
    """Decorator: ``@register_loader("quantized")`` on a ``loader(folder, manifest)``."""

    def register(loader):
        LOADERS[kind] = loader
        return loader

    return register


# A weight at least this sparse is stored as a bitmask plus its non-zero values: the bytes
# then fall with the sparsity (1/32 of a float32 weight for the mask, 4 bytes per survivor).
SPARSE_STORAGE_MIN = 0.5


# A floating tensor of at least this many elements with at most 256 distinct values is
# stored as a codebook plus one coded index per element.
CODEBOOK_MIN_ELEMENTS = 1024


def _codebook(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(distinct values, uint8 index of each element) when a codebook stores ``tensor``."""
    if not tensor.is_floating_point() or tensor.numel() < CODEBOOK_MIN_ELEMENTS:
        return None
    if torch.unique(tensor.flatten()[:4096]).numel() > 256:  # cheap early no for dense weights
        return None
    values, indices = torch.unique(tensor, return_inverse=True)
    if values.numel() > 256:
        return None
    return values, indices.flatten().to(torch.uint8)


def _lzma(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(lzma.compress(data, preset=9)), dtype=torch.uint8)


def save_state(model: nn.Module, folder: Path, name: str = "weights.pt") -> dict:
    """Store a spec-built model as its spec, its shapes (if pruned) and its tensors.

    Mostly-zero tensors are stored sparse; ``_load_state`` restores them exactly.
    """
    import numpy as np

    state, sparse, shared = {}, [], []
    for key, tensor in model.state_dict().items():
        codebook = _codebook(tensor)
        zeros = (
            tensor.numel() - int(torch.count_nonzero(tensor)) if tensor.is_floating_point() else 0
        )
        if codebook is not None:
            # Few distinct values (weight sharing): the codebook, and each weight's index
            # into it, LZMA-coded (Deep Compression used Huffman coding for the same end).
            # A mostly-zero tensor stores which weights are non-zero (a bitmask) and the
            # indices of those alone: two streams LZMA models better than one mixed one.
            values, indices = codebook
            zero = int((values == 0).nonzero()[0]) if bool((values == 0).any()) else None
            if zero is not None and zeros >= SPARSE_STORAGE_MIN * tensor.numel():
                mask = indices != zero
                state[f"{key}.__mask"] = _lzma(np.packbits(mask.numpy()).tobytes())
                indices = indices[mask]
            else:
                zero = None
            state[f"{key}.__codebook"] = values
            state[f"{key}.__indices"] = _lzma(indices.numpy().tobytes())
            shared.append(
                {
                    "key": key,
                    "shape": list(tensor.shape),
                    "dtype": str(tensor.dtype).removeprefix("torch."),
                    "zero": zero,  # the codebook entry of the weights the mask leaves out
                }
            )
        elif tensor.numel() >= 1024 and zeros >= SPARSE_STORAGE_MIN * tensor.numel():
            mask = tensor != 0
            state[f"{key}.__mask"] = torch.from_numpy(np.packbits(mask.flatten().numpy()))
            state[f"{key}.__values"] = tensor[mask]
            sparse.append(
                {
                    "key": key,
                    "shape": list(tensor.shape),
                    "dtype": str(tensor.dtype).removeprefix("torch."),
                }
            )
        else:
            state[key] = tensor
    torch.save(state, folder / name)
    manifest = {"kind": "state_dict", "file": name, "spec": model.compress_spec}
    if sparse:
        manifest["sparse"] = sparse
    if shared:
        manifest["shared"] = shared
    if getattr(model, "compress_replacements", None):
        manifest["replacements"] = model.compress_replacements
    if hasattr(model, "compress_shapes"):
        manifest["shapes"] = model.compress_shapes
    return manifest


@register_loader("state_dict")
def _load_state(folder: Path, manifest: dict) -> nn.Module:
    import numpy as np

    from compress.models import load_state_dict_file, model_from_spec
    from compress.prune import apply_shapes

    model = model_from_spec(manifest["spec"])
    if "replacements" in manifest:  # factorized layers first: the shapes name their parts
        from compress.factorize import apply_replacements

        apply_replacements(model, manifest["replacements"])
    if "shapes" in manifest:
        apply_shapes(model, manifest["shapes"])
        model.compress_shapes = manifest["shapes"]
    if "sparse" not in manifest and "shared" not in manifest:
        load_state_dict_file(model, folder / manifest["file"])
        return model
    state = torch.load(folder / manifest["file"], map_location="cpu", weights_only=True)
    for entry in manifest.get("shared", []):
        key, count = entry["key"], int(np.prod(entry["shape"]))
        raw = lzma.decompress(state.pop(f"{key}.__indices").numpy().tobytes())
        indices = torch.from_numpy(np.frombuffer(raw, dtype=np.uint8).astype(np.int64))
        if entry.get("zero") is not None:
            bits = np.unpackbits(
                np.frombuffer(
                    lzma.decompress(state.pop(f"{key}.__mask").numpy().tobytes()), np.uint8
                )
            )
            mask = torch.from_numpy(bits[:count].astype(bool))
            full = torch.full((count,), entry["zero"], dtype=torch.int64)
            full[mask] = indices
            indices = full
        state[key] = state.pop(f"{key}.__codebook")[indices].view(entry["shape"])
    for entry in manifest.get("sparse", []):
        key, shape = entry["key"], entry["shape"]
        count = int(np.prod(shape))
        mask = torch.from_numpy(
            np.unpackbits(state.pop(f"{key}.__mask").numpy())[:count].astype(bool)
        )
        dense = torch.zeros(count, dtype=getattr(torch, entry["dtype"]))
        dense[mask] = state.pop(f"{key}.__values")
        state[key] = dense.view(shape)
    model.load_state_dict(state, strict=True)
    return model


def save_exported(
    module: nn.Module, folder: Path, example: torch.Tensor, name: str = "model.pt2"
) -> str:
    """``torch.export`` ``module`` with a dynamic batch and save it; returns the file name."""
    from compress.quantize import MAX_BATCH

    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    program = torch.export.export(module, (_batch_of_two(example),), dynamic_shapes=({0: batch},))
    torch.export.save(program, folder / name)
    return name


@register_loader("exported")
def _load_graph(folder: Path, manifest: dict) -> nn.Module:
    return load_exported(folder / manifest["file"])


def _batch_of_two(example: torch.Tensor) -> torch.Tensor:
    return (
        example if example.shape[0] == 2 else example[:1].expand(2, *example.shape[1:]).contiguous()
    )


def load_exported(file: Path) -> nn.Module:
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
