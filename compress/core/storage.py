"""Files written and read safely: atomic writes, and tensor files read as data only,
bounded by the bytes the reader expects and by the memory this machine has."""

from __future__ import annotations

import os
import zipfile
from collections.abc import Callable
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compress.core.errors import ArtifactError
from compress.core.memory import available_bytes

# Slack over the bytes the architecture implies, for a tensor file's own structure.
FILE_SLACK_BYTES = 1 << 20


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


def as_json(value: Any) -> Any:
    """``value`` as JSON holds it: a typed result through its ``to_dict``, another dataclass
    (a config) as a dict, containers walked, tuples as lists.

    Example:
        >>> as_json({"drop": Drop(1.0, (0.5, 1.5))})
        {'drop': {'points': 1.0, 'interval': [0.5, 1.5]}}
    """
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if is_dataclass(value) and not isinstance(value, type):
        return as_json(asdict(value))
    if isinstance(value, dict):
        return {k: as_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [as_json(v) for v in value]
    return value


def read_tensors(file: Path, max_bytes: int, nested: bool = False) -> dict:
    """A ``torch.save`` file of tensors, read with PyTorch's ``weights_only`` unpickler after
    checking the archive itself: unique entry names (so that the bytes checked are the bytes
    torch reads), stored rather than compressed entries (no zip bomb), and no more than
    ``max_bytes`` in all. ``nested`` allows dicts of tensors inside (a training checkpoint).
    """
    try:
        with zipfile.ZipFile(file) as archive:
            entries = archive.infolist()
    except (zipfile.BadZipFile, OSError):
        raise ArtifactError(f"{file} is not a torch.save zip file; refused") from None
    names = [e.filename for e in entries]
    if len(set(names)) != len(names):
        raise ArtifactError(f"{file}: an entry name appears twice in the archive; refused")
    if any(e.compress_type != zipfile.ZIP_STORED for e in entries):
        raise ArtifactError(f"{file}: compressed entries (torch.save never writes them); refused")
    total = sum(e.file_size for e in entries)
    if total > max_bytes + FILE_SLACK_BYTES:
        raise ArtifactError(
            f"{file}: holds {total} bytes, more than the {max_bytes} the model implies; refused"
        )
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - weights_only refused it: say why, briefly
        raise ArtifactError(
            f"{file}: not loadable as data only ({str(error).strip().splitlines()[0][:200]});"
            " refused (compress never unpickles code)"
        ) from None
    if not isinstance(state, dict) or not _plain_tensors(state, nested):
        raise ArtifactError(f"{file}: not a mapping of names to tensors; refused")
    return state


def _plain_tensors(state: dict, nested: bool) -> bool:
    """Names to tensors; with ``nested``, also the plain values and containers of a training
    checkpoint (an optimizer's state is keyed by parameter index, its groups are a list)."""
    for key, value in state.items():
        if not isinstance(key, str) and not (nested and isinstance(key, int)):
            return False
        if not (isinstance(value, torch.Tensor) or (nested and _is_plain(value))):
            return False
    return True


def _is_plain(value) -> bool:
    if isinstance(value, (list, tuple)):
        return all(_is_plain(v) for v in value)
    if isinstance(value, dict):
        return _plain_tensors(value, nested=True)
    return value is None or isinstance(value, (bool, int, float, str, torch.Tensor))


def memory_cap() -> int:
    """The most bytes a file may make compress allocate: half the memory available."""
    return available_bytes() // 2


def model_bytes(model: nn.Module) -> int:
    """Bytes of ``model``'s parameters and buffers: what its weight file may hold at most."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())
