"""Graphs (quantized models, models compress did not build) stored as data: a list of
operations from an allow-list, resolved by name through ``torch.ops``, and their tensors;
the work a graph file can cause is bounded by what its tensors imply."""

from __future__ import annotations

import functools
import json
import operator
import re
from pathlib import Path

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from compress.core.errors import ArtifactError
from compress.core.storage import memory_cap, read_tensors
from compress.models.artifact.inputs import dtype_name, input_dtype
from compress.models.artifact.manifest import (
    MAX_BATCH,
    Trust,
    data_file,
    read_json,
    register_loader,
)

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
    nodes: list[dict] = []
    tensors: dict = {}
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
            entry["args"] = _encode(_as_returned(module, node.args[0]), index)
        elif node.op != "placeholder":
            raise ArtifactError(f"cannot store a {node.op} node ({node.target}) as data")
        index[node] = len(nodes)
        nodes.append(entry)
    graph = {
        "format": GRAPH_FORMAT,
        "nodes": nodes,
        "parameters": sorted(parameters & set(tensors)),
        "input_shape": list(example.shape[1:]),
        "input_dtype": dtype_name(example.dtype),  # float images, or integer token ids
    }
    torch.save(tensors, folder / _tensor_file(name))
    (folder / name).write_text(json.dumps(graph))
    return name


def _as_returned(module: torch.fx.GraphModule, result):
    """An exported graph's flat outputs in the form its module returned them: one tensor
    (a classifier's), or a mapping of named tensors (a detector backbone's feature maps)
    with its keys, which export keeps in its code rather than in the graph."""
    info = getattr(module.graph._codegen, "pytree_info", None)
    spec = getattr(info, "out_spec", None)
    kind, keys = getattr(spec, "type", None), getattr(spec, "context", None)
    if isinstance(kind, type) and issubclass(kind, dict) and isinstance(result, (tuple, list)):
        leaves = all(child.is_leaf() for child in getattr(spec, "children_specs", None) or [])
        if isinstance(keys, list) and len(keys) == len(result) and leaves:
            if all(isinstance(k, str) for k in keys):
                return dict(zip(keys, result, strict=True))
    if isinstance(result, (tuple, list)) and len(result) == 1:
        return result[0]  # export's pytree output form; a classifier returns one
    return result


def load_graph(file: Path) -> torch.fx.GraphModule:
    """Rebuild a graph stored by :func:`save_graph`, checking every name against the
    allow-lists; its intermediate tensors are sized on fake tensors before it is kept, so
    that a graph that would allocate more than the machine has is refused."""
    stored = read_json(file)
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
    graph = torch.fx.Graph()
    made: list[torch.fx.Node] = []
    root: dict[str, torch.Tensor] = {}
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
                if not all(_IDENTIFIER.fullmatch(key) for key in kwargs):  # written into code
                    raise ArtifactError(f"{file}: a keyword argument's name refused")
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
    dtype = input_dtype(stored.get("input_dtype"), file)  # float32 in graphs saved before it
    _check_sizes(module, stored.get("input_shape"), dtype, file)
    module.meta["input_shape"] = stored["input_shape"]  # what saving it again needs
    module.meta["input_dtype"] = dtype
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


def _check_sizes(module: torch.fx.GraphModule, input_shape, dtype: torch.dtype, file: Path) -> None:
    """Run the graph on fake tensors (no memory, no arithmetic) for one input of its shape
    and dtype; refuse it if an intermediate tensor would be larger than the machine can hold."""
    if not (isinstance(input_shape, list) and all(_is_size(d) for d in input_shape)):
        raise ArtifactError(f"{file}: input_shape {input_shape!r} refused")
    try:
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            one = mode.from_tensor(torch.empty(1, *input_shape, dtype=dtype))
            _SizeCheck(module, memory_cap()).run(one)
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
