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

import functools
import json
import lzma
import operator
import os
import re
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from compress.architectures import model_from_spec
from compress.errors import ArtifactError
from compress.storage import memory_cap, model_bytes, read_tensors

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
            manifest = {"kind": "exported", "file": save_graph(model.eval(), staging, example)}
        manifest["format_version"] = FORMAT_VERSION
        if example is not None:  # what `compress export` needs to trace the model again
            manifest.setdefault("input_shape", list(example.shape[1:]))
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


def read_manifest(path: Path) -> dict:
    """The folder's manifest, checked: a known kind, and data files inside the folder."""
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise ArtifactError(f"{path} is not a compress model folder (no {MANIFEST})")
    manifest = _read_json(manifest_path)
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


def _read_json(file: Path):
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
SAFE_FACTORIES = frozenset({"compress.models:mlp"})


# kind -> loader(folder, manifest, trust) -> model. Compressed model types register theirs.
LOADERS: dict[str, Callable[[Path, dict, Trust], nn.Module]] = {}


def register_loader(kind: str):
    """Decorator: ``@register_loader("quantized")`` on a ``loader(folder, manifest, trust)``."""

    def register(loader):
        LOADERS[kind] = loader
        return loader

    return register


@dataclass(frozen=True)
class ArchitectureChange:
    """How a stage's change to a spec-built model's layers is saved and rebuilt:
    ``capture(model)`` gives the plain data the manifest keeps under the change's key (at
    save time, so it describes the model as saved), ``apply(model, data)`` rebuilds the
    change on a freshly built model. Changes are rebuilt in ``order``."""

    capture: Callable[[nn.Module], Any]
    apply: Callable[[nn.Module, Any], None]
    order: int


# manifest key -> how that change is rebuilt. Stages that change layers register theirs.
ARCHITECTURE_CHANGES: dict[str, ArchitectureChange] = {}


def register_architecture_change(key: str, capture, order: int):
    """Decorator on ``apply(model, data)``: the stage whose change ``key`` names (``shapes``,
    ``replacements``) saves it with ``capture(model)`` and rebuilds it with ``apply``.

    Example:
        >>> @register_architecture_change("shapes", capture=module_shapes, order=1)
        ... def apply_shapes(model, shapes): ...
    """

    def register(apply):
        ARCHITECTURE_CHANGES[key] = ArchitectureChange(capture, apply, order)
        return apply

    return register


def mark_changed(model: nn.Module, key: str) -> None:
    """Record on ``model`` that its layers went through the registered change ``key``."""
    model.compress_changes = [*getattr(model, "compress_changes", []), key]


def architecture_changes(model: nn.Module) -> dict:
    """The manifest entries of ``model``'s architecture changes, captured now, in order."""
    keys = set(getattr(model, "compress_changes", []))
    ordered = sorted(keys, key=lambda k: ARCHITECTURE_CHANGES[k].order)
    return {key: ARCHITECTURE_CHANGES[key].capture(model) for key in ordered}


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
    manifest = {"kind": "state_dict", "file": name, "spec": model.compress_spec}
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
    if key not in expected:
        raise ArtifactError(f"{folder}: the manifest codes {key!r}, which the model lacks")
    if list(entry.get("shape", [])) != list(expected[key].shape):
        raise ArtifactError(
            f"{folder}: {key}: the manifest says shape {entry.get('shape')!r}, the model has"
            f" {list(expected[key].shape)}; refused"
        )
    return key, expected[key].dtype


def _bits(packed: bytes, count: int) -> torch.Tensor:
    return torch.from_numpy(np.unpackbits(np.frombuffer(packed, np.uint8))[:count].astype(bool))


# A graph is stored as its operations, each an op of these namespaces (resolved by name
# through torch.ops, never imported) or one of these operators; its tensors in a
# ``torch.save`` file beside it. Loading runs nothing that the file names.
GRAPH_FORMAT = "compress-graph/1"
_OP_NAMESPACES = frozenset({"aten", "prims", "quantized_decomposed", "torchao"})
_REFUSED_OPS = frozenset({"aten.from_file"})  # reads a file the graph would name
_OPERATORS = {
    f"operator.{f.__name__}": f
    for f in (operator.getitem, operator.add, operator.sub, operator.mul, operator.floordiv)
}
_IDENTIFIER = re.compile(r"[a-z_][a-z0-9_]*", re.IGNORECASE)
# Module names may hold hyphens (regnet's "block1-0"); no part may start with a dunder.
_ATTRIBUTE = re.compile(r"(?!__)[A-Za-z0-9_-]+(\.(?!__)[A-Za-z0-9_-]+)*")
_MEMORY_FORMATS = ("contiguous_format", "channels_last", "channels_last_3d", "preserve_format")
_MAX_ARG_DEPTH = 8
# The work a graph file can cause is bounded by what its tensors imply. A network's graph
# holds a few nodes per stored tensor (torchvision's classifiers: 1.6 for resnet18, 4.4
# for swin_t, the most; INT8 adds quantize and dequantize nodes around them), so a
# graph may hold 64 nodes per tensor plus 1,024, and never more than 100,000 (loading one
# costs ~0.13 ms a node on 2 cores: ~14 s; scripts/bench_graph_load.py); its arguments may
# hold 32 values a node on average (a convolution has 9, a concatenation one per input).
GRAPH_NODES_PER_TENSOR = 64
GRAPH_BASE_NODES = 1024
MAX_GRAPH_NODES = 100_000
GRAPH_VALUES_PER_NODE = 32


def save_graph(
    module: nn.Module, folder: Path, example: torch.Tensor, name: str = "graph.json"
) -> str:
    """Store ``module`` as a graph: its operations as JSON and its tensors beside them.

    A module that is not an FX graph yet is ``torch.export``-ed first, with a dynamic batch.
    Returns the file name.
    """
    if not isinstance(module, torch.fx.GraphModule):
        batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
        module = torch.export.export(
            module, (_batch_of_two(example),), dynamic_shapes=({0: batch},)
        ).module()
    parameters = {n for n, _ in module.named_parameters()}
    index: dict[torch.fx.Node, int] = {}
    nodes, tensors = [], {}
    for node in module.graph.nodes:
        if node.op == "call_module" and node.target == "_guards_fn" and not node.users:
            continue  # export's input-shape guard, generated code: the graph needs none
        entry = {"op": node.op}
        if node.op == "get_attr":
            tensor = _attribute(module, node.target)
            if not isinstance(tensor, torch.Tensor):
                raise ArtifactError(f"cannot store {node.target!r} as data (not a tensor)")
            if not _ATTRIBUTE.fullmatch(node.target):
                raise ArtifactError(f"cannot store {node.target!r} as data (not a plain name)")
            tensors[node.target] = tensor.detach().contiguous()
            entry["target"] = node.target
        elif node.op == "call_function":
            entry["target"] = _op_name(node.target)
            entry["args"] = _encode(node.args, index)
            entry["kwargs"] = _encode(node.kwargs, index)
        elif node.op == "output":
            result = node.args[0]
            if isinstance(result, (tuple, list)) and len(result) == 1:
                result = result[0]  # export's pytree output form; a classifier returns one
            entry["args"] = _encode(result, index)
        elif node.op != "placeholder":
            raise ArtifactError(f"cannot store a {node.op} node ({node.target}) as data")
        index[node] = len(nodes)
        nodes.append(entry)
    graph = {
        "format": GRAPH_FORMAT,
        "nodes": nodes,
        "parameters": sorted(parameters & set(tensors)),
        "input_shape": list(example.shape[1:]),
    }
    torch.save(tensors, folder / _tensor_file(name))
    (folder / name).write_text(json.dumps(graph))
    return name


def load_graph(file: Path) -> torch.fx.GraphModule:
    """Rebuild a graph stored by :func:`save_graph`, checking every name against the
    allow-lists; its intermediate tensors are sized on fake tensors before it is kept, so
    that a graph that would allocate more than the machine has is refused."""
    stored = _read_json(file)
    if not isinstance(stored, dict) or stored.get("format") != GRAPH_FORMAT:
        raise ArtifactError(f"{file}: not a {GRAPH_FORMAT} graph; refused")
    nodes = stored.get("nodes")
    if not isinstance(nodes, list):
        raise ArtifactError(f"{file}: no list of nodes; refused")
    _check_node_count(len(nodes), MAX_GRAPH_NODES, "", file)  # before the tensors are read
    tensors = read_tensors(data_file(file.parent, _tensor_file(file.name)), memory_cap())
    ceiling = min(GRAPH_NODES_PER_TENSOR * len(tensors) + GRAPH_BASE_NODES, MAX_GRAPH_NODES)
    _check_node_count(len(nodes), ceiling, f" for its {len(tensors)} tensors", file)
    parameters = set(stored.get("parameters") or [])
    graph, made, root = torch.fx.Graph(), [], {}
    values = [GRAPH_VALUES_PER_NODE * len(nodes)]  # argument values left to decode
    try:
        for entry in nodes:
            op = entry["op"]
            if op == "placeholder":
                node = graph.placeholder(f"x{len(made)}" if made else "x")
            elif op == "get_attr":
                target = entry["target"]
                if not isinstance(target, str) or not _ATTRIBUTE.fullmatch(target):
                    raise ArtifactError(f"{file}: tensor name {target!r} refused")
                tensor = tensors[target]
                root[target] = nn.Parameter(tensor, False) if target in parameters else tensor
                node = graph.get_attr(target)
            elif op == "call_function":
                args = _decode(entry["args"], made, file, values)
                kwargs = _decode(entry["kwargs"], made, file, values)
                if not isinstance(args, tuple) or not isinstance(kwargs, dict):
                    raise ArtifactError(f"{file}: malformed arguments; refused")
                node = graph.call_function(_op(entry["target"], file), args, kwargs)
            elif op == "output":
                node = graph.output(_decode(entry["args"], made, file, values))
            else:
                raise ArtifactError(f"{file}: node kind {op!r} refused")
            made.append(node)
        module = torch.fx.GraphModule(root, graph)
    except ArtifactError:
        raise
    except Exception as error:  # noqa: BLE001 - malformed graph: one line, whatever broke
        raise ArtifactError(
            f"{file}: malformed graph ({type(error).__name__}: {str(error)[:200]}); refused"
        ) from None
    _check_sizes(module, stored.get("input_shape"), file)
    module.meta["input_shape"] = stored["input_shape"]  # what saving it again needs
    return module


@register_loader("exported")
def _load_graph(folder: Path, manifest: dict, trust: Trust) -> nn.Module:
    return load_graph(graph_file(folder, manifest))


def graph_file(folder: Path, manifest: dict) -> Path:
    """The manifest's graph file; a folder from before graphs were stored as data (a
    ``torch.export`` archive, which can run code while it loads) is refused."""
    file = data_file(folder, manifest.get("file"))
    if file.suffix != ".json":
        raise ArtifactError(
            f"{folder}: holds a torch.export archive ({file.name}), which can run code when"
            " loaded; compress no longer loads those. Save the model again with this version"
        )
    return file


def _tensor_file(graph_name: str) -> str:
    return Path(graph_name).stem + ".pt"


def _attribute(module: nn.Module, target: str):
    for part in target.split("."):
        module = getattr(module, part)
    return module


def _op_name(target) -> str:
    if isinstance(target, torch._ops.OpOverload):
        name = str(target)  # e.g. "aten.conv2d.default"
        if name.split(".")[0] in _OP_NAMESPACES and name not in _REFUSED_OPS:
            return name
    for name, function in _OPERATORS.items():
        if target is function:
            return name
    raise ArtifactError(f"cannot store the operation {target} as data")


_QUANTIZE_NAMESPACES = ("quantized_decomposed", "torchao")


@functools.cache
def _register_quantize_ops() -> None:
    """PT2E graphs' quantize/dequantize ops are registered by importing torchao's flow (~3 s,
    so only once a stored graph names one)."""
    import torchao.quantization.pt2e.quantize_pt2e  # noqa: F401


def _op(name, file: Path):
    """The op a stored name stands for: looked up in torch.ops, never imported."""
    if name in _OPERATORS:
        return _OPERATORS[name]
    parts = name.split(".") if isinstance(name, str) else []
    if (
        len(parts) != 3
        or parts[0] not in _OP_NAMESPACES
        or not all(_IDENTIFIER.fullmatch(p) for p in parts[1:])
        or name.rsplit(".", 1)[0] in _REFUSED_OPS
    ):
        raise ArtifactError(f"{file}: operation {name!r} is not allowed; refused")
    if parts[0] in _QUANTIZE_NAMESPACES:
        _register_quantize_ops()
    try:
        op = getattr(getattr(getattr(torch.ops, parts[0]), parts[1]), parts[2])
    except (AttributeError, RuntimeError):
        raise ArtifactError(f"{file}: unknown operation {name!r}; refused") from None
    if not isinstance(op, torch._ops.OpOverload):
        raise ArtifactError(f"{file}: {name!r} is not an operation; refused")
    return op


def _encode(value, index: dict):
    if isinstance(value, torch.fx.Node):
        return {"node": index[value]}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, list):
        return [_encode(v, index) for v in value]
    if isinstance(value, tuple):
        return {"tuple": [_encode(v, index) for v in value]}
    if isinstance(value, dict):
        return {"dict": {k: _encode(v, index) for k, v in value.items()}}
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).removeprefix("torch.")}
    if isinstance(value, torch.device):
        return {"device": str(value)}
    if isinstance(value, torch.memory_format):
        return {"memory_format": str(value).removeprefix("torch.")}
    if value is torch.strided:
        return {"layout": "strided"}
    raise ArtifactError(f"cannot store the argument {value!r} ({type(value).__name__}) as data")


def _check_node_count(count: int, ceiling: int, why: str, file: Path) -> None:
    if count > ceiling:
        raise ArtifactError(
            f"{file}: {count} nodes, more than the {ceiling} a network's graph holds{why}; refused"
        )


def _decode(value, made: list, file: Path, values: list[int], depth: int = 0):
    """A stored argument as FX takes it; ``values`` counts down what the graph may still
    decode (a budget shared by all its nodes)."""
    if depth > _MAX_ARG_DEPTH:
        raise ArtifactError(f"{file}: arguments nested too deeply; refused")
    values[0] -= 1
    if values[0] < 0:
        raise ArtifactError(
            f"{file}: more argument values than {GRAPH_VALUES_PER_NODE} a node; refused"
        )
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, list):
        return [_decode(v, made, file, values, depth + 1) for v in value]
    if isinstance(value, dict) and len(value) == 1:
        (tag, inner), where = next(iter(value.items())), f"{file}: argument {value!r}"
        if tag == "node" and isinstance(inner, int) and 0 <= inner < len(made):
            if made[inner].op != "output":
                return made[inner]
        elif tag == "tuple" and isinstance(inner, list):
            return tuple(_decode(v, made, file, values, depth + 1) for v in inner)
        elif tag == "dict" and isinstance(inner, dict):
            return {str(k): _decode(v, made, file, values, depth + 1) for k, v in inner.items()}
        elif tag == "dtype" and isinstance(inner, str) and _IDENTIFIER.fullmatch(inner):
            if isinstance(getattr(torch, inner, None), torch.dtype):
                return getattr(torch, inner)
        elif tag == "device" and isinstance(inner, str) and re.fullmatch(r"cpu|cuda(:\d+)?", inner):
            return torch.device(inner)
        elif tag == "memory_format" and inner in _MEMORY_FORMATS:
            return getattr(torch, inner)
        elif tag == "layout" and inner == "strided":
            return torch.strided
        raise ArtifactError(f"{where[:200]} refused")
    raise ArtifactError(f"{file}: argument {str(value)[:100]!r} refused")


def _check_sizes(module: torch.fx.GraphModule, input_shape, file: Path) -> None:
    """Run the graph on fake tensors (no memory, no arithmetic) for one input; refuse it if
    an intermediate tensor would be larger than the machine can hold."""
    if not (isinstance(input_shape, list) and all(_is_size(d) for d in input_shape)):
        raise ArtifactError(f"{file}: input_shape {input_shape!r} refused")
    try:
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            _SizeCheck(module, memory_cap()).run(mode.from_tensor(torch.empty(1, *input_shape)))
    except ArtifactError as error:
        raise ArtifactError(f"{file}: {error}") from None
    except Exception as error:  # noqa: BLE001 - a graph that cannot run on its own input
        raise ArtifactError(
            f"{file}: the graph does not run on its input shape {input_shape}"
            f" ({type(error).__name__}: {str(error).strip().splitlines()[0][:200]}); refused"
        ) from None


class _SizeCheck(torch.fx.Interpreter):
    def __init__(self, module, cap: int):
        super().__init__(module)
        self.cap = cap

    def run_node(self, node):
        result = super().run_node(node)
        for tensor in torch.utils._pytree.tree_leaves(result):
            if isinstance(tensor, torch.Tensor):
                size = tensor.numel() * tensor.element_size()
                if size > self.cap:
                    raise ArtifactError(
                        f"{node.name} would make a tensor of {size / 2**30:.1f} GiB; refused"
                    )
        return result


def _is_size(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 1 << 16


def _batch_of_two(example: torch.Tensor) -> torch.Tensor:
    return (
        example if example.shape[0] == 2 else example[:1].expand(2, *example.shape[1:]).contiguous()
    )
