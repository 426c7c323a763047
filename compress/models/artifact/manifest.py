"""A model folder's manifest and the rules every read of a folder follows: a known kind,
data files inside the folder, JSON of bounded size, and which import paths a spec may name.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from compress.core.errors import ArtifactError
from compress.core.storage import model_bytes, read_tensors

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
# Saved graphs accept batches of 1..MAX_BATCH images (a dynamic batch dimension).
MAX_BATCH = 4096
# A manifest or graph file larger than this is not one compress wrote (ResNet-50 pruned to
# per-layer shapes needs ~50 KB; a 10,000-node graph ~3 MB).
MAX_JSON_BYTES = 64 << 20


@dataclass(frozen=True)
class Trust:
    """Which import paths a folder's spec may name: none unless the user says so.

    ``code`` trusts every import path (``--trust-code``, ``model.trust_code: true``);
    ``imports`` trusts the ones listed (a recipe's own ``model.name``: the user wrote it).
    """

    code: bool = False
    imports: frozenset[str] = frozenset()

    def allows(self, name: str) -> bool:
        return self.code or name in self.imports


def read_manifest(path: Path) -> dict:
    """The folder's manifest, checked: a known kind, and data files inside the folder."""
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise ArtifactError(f"{path} is not a compress model folder (no {MANIFEST})")
    manifest = read_json(manifest_path)
    if not isinstance(manifest, dict) or not isinstance(manifest.get("kind"), str):
        raise ArtifactError(f"{manifest_path} is malformed: no 'kind'")
    if "file" in manifest:
        data_file(path, manifest["file"])
    kind = manifest["kind"]
    if kind not in LOADERS:
        raise ArtifactError(
            f"{manifest_path}: unknown kind {kind!r} (allowed: {', '.join(sorted(LOADERS))})"
        )
    return manifest


def data_file(folder: Path, name) -> Path:
    """``folder/name``, refused unless ``name`` is a plain file name of a regular file."""
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", name):
        raise ArtifactError(f"{folder}: the manifest names {name!r}, which is not in the folder")
    file = folder / name
    if file.is_symlink() or not file.is_file():
        raise ArtifactError(f"{folder}: the manifest names {name!r}, which is not in the folder")
    return file


def read_json(file: Path):
    if file.stat().st_size > MAX_JSON_BYTES:
        raise ArtifactError(f"{file}: {file.stat().st_size} bytes, more than a compress file")
    try:
        return json.loads(file.read_bytes().decode("utf-8"))
    except (ValueError, RecursionError) as error:
        reason = "nested too deeply" if isinstance(error, RecursionError) else error
        raise ArtifactError(f"{file} is malformed: {str(reason).splitlines()[0]}") from None


def read_weights(folder: Path, manifest: dict, model: nn.Module) -> dict:
    """The tensors of the manifest's weight file, bounded by what ``model`` holds."""
    return read_tensors(data_file(folder, manifest.get("file")), model_bytes(model))


def manifest_counts(folder: Path, manifest: dict) -> tuple[int, int]:
    """The manifest's (total, non-zero) parameter counts, checked to be two integers."""
    value = manifest.get("param_counts")
    if not (isinstance(value, list) and len(value) == 2 and all(_is_count(v) for v in value)):
        raise ArtifactError(f"{folder}: param_counts {value!r} is not two counts; refused")
    return value[0], value[1]


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


# Import paths of compress's own model factories: safe to build from any folder's spec.
SAFE_FACTORIES = frozenset(
    {"compress.models:mlp", "compress.models:gpt", "compress.models:hugging_face"}
)


# kind -> loader(folder, manifest, trust) -> model. Compressed model types register theirs.
LOADERS: dict[str, Callable[[Path, dict, Trust], nn.Module]] = {}


def register_loader(kind: str):
    """Decorator: ``@register_loader("quantized")`` on a ``loader(folder, manifest, trust)``."""

    def register(loader):
        LOADERS[kind] = loader
        return loader

    return register
