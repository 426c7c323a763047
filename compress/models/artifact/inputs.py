"""What a saved model takes: its input's shape and dtype (float images, or a language
model's integer token ids), as a folder records them, and example batches of that input
for tracing, export and checks.

A folder records ``input_shape`` and ``input_dtype`` (in its manifest, and in a graph file);
one saved before the dtype was recorded took float32.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from compress.core.errors import ArtifactError

# The dtypes a recorded input may have: images in a float type, token ids in an integer one.
INPUT_DTYPES = {
    name: getattr(torch, name)
    for name in ("float32", "float64", "float16", "bfloat16", "int64", "int32", "int16", "uint8")
}

# The names transformers give their learned position tables, indexed by place rather than
# by id: compress's GPT ("positions"), GPT-2's ("wpe"), BERT's ("position_embeddings").
POSITION_TABLES = ("positions", "wpe", "position_embeddings")


def dtype_name(dtype: torch.dtype) -> str:
    """How a folder records ``dtype``: ``torch.int64`` as ``"int64"``."""
    return str(dtype).removeprefix("torch.")


def input_dtype(recorded, where: str | Path) -> torch.dtype:
    """The dtype a folder records (``None``: float32, a folder saved before it was recorded).

    Example:
        >>> input_dtype(manifest.get("input_dtype"), folder)
        torch.int64
    """
    if recorded is None:
        return torch.float32
    if not isinstance(recorded, str) or recorded not in INPUT_DTYPES:
        raise ArtifactError(
            f"{where}: input_dtype {str(recorded)[:50]!r} refused (allowed:"
            f" {', '.join(INPUT_DTYPES)})"
        )
    return INPUT_DTYPES[recorded]


def recorded_input(model: nn.Module) -> tuple[list[int], torch.dtype] | None:
    """The shape (without the batch) and dtype of one input of ``model``: what it says
    (``input_shape``, ``input_dtype``), else what its graph knows (a loaded graph, or a
    quantized model's reference graph); None when neither does."""
    shape = getattr(model, "input_shape", None)
    if shape is not None:
        return list(shape), getattr(model, "input_dtype", torch.float32)
    graph = getattr(model, "reference_module", model)
    return graph_input(graph) if isinstance(graph, torch.fx.GraphModule) else None


def graph_input(graph: torch.fx.GraphModule) -> tuple[list[int], torch.dtype] | None:
    """One input's shape (without the batch) and dtype: recorded when the graph was loaded,
    else traced by ``torch.export``; None when neither is there."""
    if "input_shape" in graph.meta:
        return list(graph.meta["input_shape"]), graph.meta.get("input_dtype", torch.float32)
    placeholder = next((n for n in graph.graph.nodes if n.op == "placeholder"), None)
    value = placeholder.meta.get("val") if placeholder is not None else None
    if not isinstance(value, torch.Tensor):
        return None
    return [int(d) for d in value.shape[1:]], value.dtype


def token_limit(model: nn.Module) -> int:
    """Every integer id below this indexes each of ``model``'s token tables: the fewest rows
    of any (``nn.Embedding`` modules but position tables, and the tables a graph looks its
    input up in); 1 (only id 0 is known to be valid) when it has none."""
    rows = [
        m.num_embeddings
        for name, m in model.named_modules()
        if isinstance(m, nn.Embedding) and name.rpartition(".")[2] not in POSITION_TABLES
    ]
    for graph in (m for m in model.modules() if isinstance(m, torch.fx.GraphModule)):
        for node in graph.graph.nodes:
            if node.target is not torch.ops.aten.embedding.default:
                continue
            table, ids = node.args[:2]
            if _is(table, "get_attr") and _is(ids, "placeholder"):  # ids, not positions
                found: Any = graph
                for part in str(table.target).split("."):
                    found = getattr(found, part)
                if isinstance(found, torch.Tensor):
                    rows.append(int(found.shape[0]))
    return max(1, min(rows, default=1))


def _is(arg, op: str) -> bool:
    return isinstance(arg, torch.fx.Node) and arg.op == op


def example_batch(
    model: nn.Module, shape: list[int], dtype: torch.dtype, batch: int = 2, seed: int = 0
) -> torch.Tensor:
    """A seeded batch ``model`` can take: normal float32 values for a float input, random
    ids below :func:`token_limit` for an integer one (a language model's token ids).

    Example:
        >>> example_batch(gpt_model, [32], torch.int64).shape
        torch.Size([2, 32])
    """
    generator = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        return torch.randn(batch, *shape, generator=generator)
    limit = token_limit(model)
    return torch.randint(0, limit, (batch, *shape), generator=generator, dtype=dtype)
