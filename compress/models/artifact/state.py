"""Spec-built models stored as their spec and their tensors: dense, sparse (a bitmask and the
survivors) or coded (a codebook and LZMA-coded indices), and rebuilt exactly, each coded
tensor bounded by the shape the architecture gives it."""

from __future__ import annotations

import lzma
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from compress.core.errors import ArtifactError
from compress.core.storage import memory_cap, model_bytes
from compress.models.artifact.changes import (
    ARCHITECTURE_CHANGES,
    architecture_changes,
    mark_changed,
)
from compress.models.artifact.manifest import SAFE_FACTORIES, Trust, read_weights, register_loader
from compress.spec.architectures import model_from_spec

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


def _unlzma(stream: torch.Tensor, size: int, where: str) -> bytes:
    """Exactly ``size`` bytes from an LZMA stream; a stream that inflates to more (or less)
    is refused without inflating past ``size`` + 1 bytes."""
    decompressor = lzma.LZMADecompressor()
    try:
        raw = decompressor.decompress(stream.numpy().tobytes(), max_length=size + 1)
    except lzma.LZMAError as error:
        raise ArtifactError(f"{where}: corrupt LZMA stream ({error}); refused") from None
    if len(raw) != size or not decompressor.eof:
        raise ArtifactError(f"{where}: its coded stream does not hold {size} bytes; refused")
    return raw


def save_state(model: nn.Module, folder: Path, name: str = "weights.pt") -> dict:
    """Store a spec-built model as its spec, its shapes (if pruned) and its tensors.

    Mostly-zero tensors are stored sparse; ``_load_state`` restores them exactly.
    """
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
    manifest: dict[str, Any] = {"kind": "state_dict", "file": name, "spec": model.compress_spec}
    if sparse:
        manifest["sparse"] = sparse
    if shared:
        manifest["shared"] = shared
    for key, record in architecture_changes(model).items():
        manifest[key] = record
    return manifest


def spec_architecture(folder: Path, manifest: dict, trust: Trust) -> nn.Module:
    """The model a manifest describes (its spec, factorized layers and pruned shapes) with
    random weights: what its weight file must fit.

    The spec resolves through torchvision's builders and compress's own factories only,
    unless ``trust`` allows its import path. The model is built on the meta device first,
    so that a manifest implying more weights than the machine can hold is refused before
    any memory is used. Pretrained weights are never fetched (the folder has the weights).
    """
    spec = manifest.get("spec")
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise ArtifactError(f"{folder}: the manifest's spec is malformed (no model name)")
    for key in ("num_classes", "in_channels"):
        value = spec.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 1 << 20:
            raise ArtifactError(f"{folder}: spec.{key} = {value!r}; expected 1..1048576")
    kwargs = spec.get("kwargs", {})
    if not isinstance(kwargs, dict) or {"weights", "progress", "num_classes"} & set(kwargs):
        raise ArtifactError(f"{folder}: spec.kwargs is not a mapping of builder options")
    name = spec["name"]
    if ":" in name and name not in SAFE_FACTORIES and not trust.allows(name):
        raise ArtifactError(
            f"{folder}: its model spec imports and runs code ({name!r}); refused. If you trust"
            " the folder's author, pass --trust-code (in a recipe: model.trust_code: true)"
        )
    spec = {**spec, "kwargs": dict(spec.get("kwargs", {})), "weights": None}
    with torch.device("meta"):
        need = model_bytes(_architecture(folder, spec, manifest))
    if need > memory_cap():
        raise ArtifactError(
            f"{folder}: its manifest implies {need / 2**30:.1f} GiB of weights, more than the"
            f" {memory_cap() / 2**30:.1f} GiB this machine can give; refused"
        )
    return _architecture(folder, spec, manifest)


def _architecture(folder: Path, spec: dict, manifest: dict) -> nn.Module:
    try:
        model = model_from_spec(spec)
        for key, change in sorted(ARCHITECTURE_CHANGES.items(), key=lambda kv: kv[1].order):
            if key in manifest:
                change.apply(model, manifest[key])
                mark_changed(model, key)
    except Exception as error:  # noqa: BLE001 - a manifest that does not build: one line
        raise ArtifactError(
            f"{folder}: the model its manifest describes does not build"
            f" ({type(error).__name__}: {str(error).strip().splitlines()[0][:200]}); refused"
        ) from None
    return model


@register_loader("state_dict")
def _load_state(folder: Path, manifest: dict, trust: Trust) -> nn.Module:
    model = spec_architecture(folder, manifest, trust)
    fill_state(model, folder, manifest)
    return model


def fill_state(model: nn.Module, folder: Path, manifest: dict) -> None:
    """Load the manifest's weight file into ``model`` strictly, each coded tensor restored
    to exactly the shape the model has (not the one the manifest claims)."""
    expected = model.state_dict()
    state = read_weights(folder, manifest, model)
    try:
        for entry in manifest.get("shared", []):
            key, dtype = _coded_entry(entry, expected, folder)
            count = expected[key].numel()
            codes = state.pop(f"{key}.__indices")
            if entry.get("zero") is not None:
                mask = _bits(
                    _unlzma(state.pop(f"{key}.__mask"), (count + 7) // 8, f"{folder}: {key}"),
                    count,
                )
                survivors = int(mask.sum())
                raw = _unlzma(codes, survivors, f"{folder}: {key}")
                indices = torch.full((count,), int(entry["zero"]), dtype=torch.int64)
                indices[mask] = torch.from_numpy(np.frombuffer(raw, np.uint8).astype(np.int64))
            else:
                raw = _unlzma(codes, count, f"{folder}: {key}")
                indices = torch.from_numpy(np.frombuffer(raw, np.uint8).astype(np.int64))
            codebook = state.pop(f"{key}.__codebook")
            if codebook.ndim != 1 or codebook.numel() > 256 or int(indices.max()) >= len(codebook):
                raise ArtifactError(f"{folder}: {key}: codes outside its codebook; refused")
            state[key] = codebook[indices].to(dtype).view(expected[key].shape)
        for entry in manifest.get("sparse", []):
            key, dtype = _coded_entry(entry, expected, folder)
            count = expected[key].numel()
            packed = state.pop(f"{key}.__mask")
            if packed.dtype != torch.uint8 or packed.numel() != (count + 7) // 8:
                raise ArtifactError(f"{folder}: {key}: its mask does not fit {count} weights")
            mask = _bits(packed.numpy().tobytes(), count)
            values = state.pop(f"{key}.__values")
            if values.numel() != int(mask.sum()):
                raise ArtifactError(f"{folder}: {key}: its values do not fit its mask")
            dense = torch.zeros(count, dtype=dtype)
            dense[mask] = values.to(dtype)
            state[key] = dense.view(expected[key].shape)
    except KeyError as error:
        raise ArtifactError(f"{folder}: the weight file lacks {error}; refused") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        raise ArtifactError(
            f"{folder}: its weights do not fit the model ({lines[-1][:200]}); refused"
        ) from None


def _coded_entry(entry, expected: dict, folder: Path) -> tuple[str, torch.dtype]:
    key = entry.get("key") if isinstance(entry, dict) else None
    if not isinstance(key, str) or key not in expected:
        raise ArtifactError(f"{folder}: the manifest codes {key!r}, which the model lacks")
    if list(entry.get("shape", [])) != list(expected[key].shape):
        raise ArtifactError(
            f"{folder}: {key}: the manifest says shape {entry.get('shape')!r}, the model has"
            f" {list(expected[key].shape)}; refused"
        )
    return key, expected[key].dtype


def _bits(packed: bytes, count: int) -> torch.Tensor:
    return torch.from_numpy(np.unpackbits(np.frombuffer(packed, np.uint8))[:count].astype(bool))
