"""Hugging Face causal language models in and out, read as data.

A recipe builds one from a config (``model: {name: "compress.models:hugging_face", kwargs:
{config: {model_type: llama, hidden_size: 192, ...}}}``) or reads a local folder in the
``save_pretrained`` layout (``checkpoint: path/to/folder``: ``config.json`` and
``model.safetensors``, or shards with ``model.safetensors.index.json``). Reading a folder
imports nothing it names and runs none of its code: the architecture comes from an
allow-list of transformers classes by ``model_type`` (a config naming remote code is
refused, as ``trust_remote_code`` would run it), the safetensors header is parsed here and
every tensor checked against the shapes the config implies before a byte of it is read,
and a pickle (``pytorch_model.bin``) is refused. No download: a name that is not a folder
is an error.

compress runs the model as :class:`CausalLM`: token ids (N, T) to logits (N, T,
vocabulary), without a cache; its :meth:`CausalLM.decoder` is one decoding step over a
static key/value cache (the form compress's GPT has), which exports to ONNX as it is. GPT-2's ``Conv1D`` layers (x @ W, the transposed Linear) are
``nn.Linear`` inside it, so that INT8 reaches them; they go back to ``Conv1D`` when the
model is saved to the Hugging Face layout again (:meth:`CausalLM.save_hugging_face`, which
``compress.models.artifact.save`` calls for every float model of this kind).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from compress.core.errors import ArtifactError, ModelError, RecipeError
from compress.core.storage import memory_cap
from compress.models.hugging_face_decoder import Decoder

FACTORY = "compress.models:hugging_face"  # the name recipes and saved specs use
# model_type: (config class, causal LM class) of transformers. Separate q/k/v projections
# (nn.Linear) except GPT-2, whose attention fuses them in one Conv1D.
ARCHITECTURES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel"),
}
FUSED_ATTENTION = {
    "gpt2": (
        "GPT-2 computes queries, keys and values in one fused Conv1D (c_attn), so removing"
        " its channels would cut across q, k and v and split heads"
    )
}
# What a config.json and a safetensors header may weigh: far above any real one (GPT-2's
# config is 1 KB; Llama-3-70B's header 60 KB), far below what could exhaust memory.
MAX_CONFIG_BYTES = 1 << 20
MAX_HEADER_BYTES = 16 << 20
SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
# Keys transformers writes that describe the file rather than the architecture.
_NOT_ARCHITECTURE = {"architectures", "transformers_version", "model_type", "dtype", "torch_dtype"}


class CausalLM(nn.Module):
    """A transformers causal LM as compress runs it: ids (N, T) to logits (N, T, vocabulary).

    Example:
        >>> model = hugging_face({"model_type": "llama", "hidden_size": 48, ...}, num_classes=84)
        >>> model(torch.zeros(1, 16, dtype=torch.long)).shape
        torch.Size([1, 16, 84])
    """

    def __init__(self, lm: nn.Module, model_type: str):
        super().__init__()
        self.lm, self.model_type = lm, model_type
        self.conv1d_layers = _conv1d_to_linear(lm)
        # Read by the prune stage: each layer's index is in its config and its cache.
        self.depth_pruning_refusal = (
            "a Hugging Face model numbers its layers in its config (prune its width instead)"
        )
        heads = getattr(lm.config, "num_attention_heads", None)
        groups = getattr(lm.config, "num_key_value_heads", None) or heads
        if model_type in FUSED_ATTENTION:  # read by the prune stage
            self.structured_pruning_refusal = FUSED_ATTENTION[model_type]
        elif heads != groups:
            self.structured_pruning_refusal = (
                f"its attention shares {groups} key/value heads among {heads} query heads"
                " (grouped-query attention), which torch-pruning's head grouping cannot keep"
                " whole"
            )

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=ids, use_cache=False).logits

    def decoder(self) -> nn.Module:
        """One decoding step with a key/value cache, as :class:`compress.models.gpt.Decoder`."""
        return Decoder(self.lm)

    def save_hugging_face(self, folder: Path) -> str | None:
        """Write ``folder`` in the ``save_pretrained`` layout (transformers loads it); None,
        or why not (shapes the config cannot express, as after pruning)."""
        from transformers.pytorch_utils import Conv1D

        lm: Any = copy.deepcopy(self.lm).cpu()  # a transformers PreTrainedModel
        for name in self.conv1d_layers:  # back to transformers' own layout: (in, out)
            linear = cast(nn.Linear, lm.get_submodule(name))
            conv = Conv1D(linear.out_features, linear.in_features)
            with torch.no_grad():
                conv.weight.copy_(linear.weight.t())
                conv.bias.copy_(linear.bias)
            _replace(lm, name, conv.to(linear.weight.dtype))
        _config_from_shapes(lm)
        with torch.device("meta"):
            fresh = type(lm)(lm.config)
        expected = {k: tuple(v.shape) for k, v in fresh.state_dict().items()}
        actual = {k: tuple(v.shape) for k, v in lm.state_dict().items()}
        if expected != actual:
            changed = next(k for k in actual if expected.get(k) != actual[k])
            return (
                f"no Hugging Face folder: {changed} is {actual[changed]}, which the config's"
                f" {lm.config.model_type} cannot express ({expected.get(changed)})"
            )
        lm.save_pretrained(folder, safe_serialization=True)
        return None


def hugging_face(config: dict, num_classes: int | None = None) -> CausalLM:
    """A transformers causal LM built from ``config`` (config.json's keys; ``model_type``
    one of :data:`ARCHITECTURES`), with random weights; ``vocab_size`` defaults to the
    data's vocabulary (``num_classes``).

    Example:
        >>> model = hugging_face({"model_type": "llama", "hidden_size": 192,
        ...     "intermediate_size": 512, "num_hidden_layers": 6, "num_attention_heads": 6,
        ...     "max_position_embeddings": 256}, num_classes=84)
    """
    model_class, built = _architecture(config, "model.kwargs.config", RecipeError, num_classes)
    return CausalLM(model_class(built).eval(), built.model_type)


def _architecture(config, where: str, error: type[Exception], num_classes: int | None = None):
    """The transformers class and config ``config`` names, checked: no remote code, no
    other tool's quantization, a known ``model_type``, enough tokens for the data, and a
    size this machine can hold (found on the meta device, before any memory is taken)."""
    if not isinstance(config, dict):
        raise error(f"{where}: a config must be a mapping; got {type(config).__name__}")
    if "auto_map" in config or config.get("trust_remote_code"):
        raise error(
            f"{where}: the config names remote code (auto_map); compress never runs code from"
            f" a model folder; allowed: model_type {', '.join(ARCHITECTURES)}"
        )
    if "quantization_config" in config:
        raise error(
            f"{where}: the config holds quantization_config (weights quantized by another"
            " tool); allowed: a float model (float32, float16 or bfloat16 safetensors)"
        )
    model_type = config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise error(
            f"{where}.model_type: {model_type!r} is not supported; allowed:"
            f" {', '.join(ARCHITECTURES)}"
        )
    settings = {k: v for k, v in config.items() if k not in _NOT_ARCHITECTURE}
    if num_classes is not None:
        settings.setdefault("vocab_size", num_classes)
        if not isinstance(settings["vocab_size"], int) or settings["vocab_size"] < num_classes:
            raise error(
                f"{where}.vocab_size: {settings['vocab_size']!r} is fewer tokens than the"
                f" data's {num_classes}; allowed: {num_classes} or more"
            )
    transformers = _transformers()
    config_class, model_class = (getattr(transformers, n) for n in ARCHITECTURES[model_type])
    try:
        built = config_class(**settings)
        with torch.device("meta"):  # its size first: a config could ask for terabytes
            size = sum(p.numel() * 4 for p in model_class(built).parameters())
    except (TypeError, ValueError, RuntimeError) as error_:
        first = (
            str(error_).strip().splitlines()[0][:200]
            if str(error_).strip()
            else type(error_).__name__
        )
        raise error(f"{where}: not a valid {model_type} config ({first})") from None
    if size > memory_cap():
        raise error(
            f"{where}: a {model_type} of {size / 2**30:.1f} GiB in float32 is more than this"
            f" machine's {memory_cap() / 2**30:.1f} GiB cap; refused"
        )
    return model_class, built


def is_hugging_face_folder(path: str | Path) -> bool:
    """Whether ``path`` is a folder in the ``save_pretrained`` layout (a config.json)."""
    return Path(path, "config.json").is_file()


def load_hugging_face(folder: str | Path, num_classes: int | None = None) -> tuple[dict, dict]:
    """The spec (config.json's architecture keys) and the tensors of a ``save_pretrained``
    folder, every read bounded and checked; nothing in the folder is run.

    Example:
        >>> spec_kwargs, tensors = load_hugging_face("gpt2-small-folder")
    """
    folder = Path(folder)
    where = f"model.checkpoint: {folder}"
    file = folder / "config.json"
    if file.stat().st_size > MAX_CONFIG_BYTES:
        raise ArtifactError(f"{where}: config.json is over {MAX_CONFIG_BYTES} bytes; refused")
    try:
        config = json.loads(file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ArtifactError(f"{where}: config.json is not JSON ({error}); refused") from None
    _architecture(config, f"{where}: config.json", ArtifactError, num_classes)
    return {"config": config}, _safetensors_files(folder, where)


def fill_hugging_face(model: CausalLM, files: dict, where: str) -> None:
    """Read ``files`` (safetensors) into ``model``, every tensor checked before it is read
    (GPT-2's Conv1D weights, stored (in, out), go into its Linear layers transposed)."""
    expected = {k: (tuple(v.shape), v) for k, v in model.lm.state_dict().items()}
    conv = {f"{name}.weight" for name in model.conv1d_layers}
    tensors: dict[str, torch.Tensor] = {}
    for file in files.values():
        for name, tensor in _read_safetensors(file, expected, conv, where).items():
            if name in tensors:
                raise ArtifactError(f"{where}: {name} is in two shards; refused")
            tensors[name] = tensor.t() if name in conv else tensor
    missing = [k for k in expected if k not in tensors]
    # Tied weights (GPT-2's head is its embedding) are stored once.
    stored = {expected[k][1].data_ptr() for k in tensors}
    untied = [k for k in missing if expected[k][1].data_ptr() not in stored]
    if untied:
        raise ArtifactError(
            f"{where}: the safetensors hold no {untied[0]} (and {len(untied) - 1} more); refused"
        )
    with torch.no_grad():
        model.lm.load_state_dict(tensors, strict=False)


def _safetensors_files(folder: Path, where: str) -> dict:
    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if single.is_file():
        return {"model.safetensors": single}
    if index.is_file():
        if index.stat().st_size > MAX_HEADER_BYTES:
            raise ArtifactError(f"{where}: {index.name} is over {MAX_HEADER_BYTES} bytes; refused")
        try:
            listing = json.loads(index.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ArtifactError(f"{where}: {index.name} is not JSON; refused") from None
        weight_map = listing.get("weight_map") if isinstance(listing, dict) else None
        names = set(weight_map.values()) if isinstance(weight_map, dict) else set()
        shards = {n: folder / n for n in names if isinstance(n, str) and "/" not in n}
        if not shards or len(shards) != len(names) or not all(f.is_file() for f in shards.values()):
            raise ArtifactError(
                f"{where}: {index.name} names no shard files in the folder; refused"
            )
        return shards
    pickles = sorted(p.name for p in folder.glob("*.bin")) + sorted(
        p.name for p in folder.glob("*.pt*")
    )
    found = f" ({', '.join(pickles)}: a pickle, which compress never loads)" if pickles else ""
    raise ArtifactError(
        f"{where}: no model.safetensors{found}; allowed: safetensors weights (in transformers:"
        " save_pretrained(folder, safe_serialization=True))"
    )


def _read_safetensors(file: Path, expected: dict, transposed: set, where: str) -> dict:
    """The tensors of one safetensors file: its header bounded, each entry a name the model
    has, with its shape and an allowed dtype, inside the file and not overlapping another,
    before any tensor's bytes are read."""
    size = file.stat().st_size
    with open(file, "rb") as stream:
        length = int.from_bytes(stream.read(8), "little")
        if length > min(MAX_HEADER_BYTES, size - 8):
            raise ArtifactError(f"{where}: {file.name}: a {length}-byte header; refused")
        try:
            header = json.loads(stream.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ArtifactError(f"{where}: {file.name}: the header is not JSON; refused") from None
        if not isinstance(header, dict):
            raise ArtifactError(f"{where}: {file.name}: the header is not a mapping; refused")
        header.pop("__metadata__", None)
        spans = []
        for name, entry in header.items():
            dtype, shape, span = _entry(name, entry, expected, transposed, f"{where}: {file.name}")
            spans.append((span, name, dtype, shape))
        spans.sort()
        end = 0
        for (start, stop), name, _, _ in spans:
            if start < end or 8 + length + stop > size:
                raise ArtifactError(f"{where}: {file.name}: {name} overlaps or overruns; refused")
            end = stop
        tensors = {}
        for (start, stop), name, dtype, shape in spans:
            stream.seek(8 + length + start)
            raw = bytearray(stream.read(stop - start))
            tensors[name] = torch.frombuffer(raw, dtype=dtype).reshape(shape).float()
    return tensors


def _entry(name, entry, expected: dict, transposed: set, where: str):
    if name not in expected:
        raise ArtifactError(f"{where}: {name!r} is not a weight of this architecture; refused")
    if not isinstance(entry, dict) or entry.get("dtype") not in SAFETENSORS_DTYPES:
        raise ArtifactError(
            f"{where}: {name}: dtype {entry.get('dtype') if isinstance(entry, dict) else entry!r};"
            f" allowed: {', '.join(SAFETENSORS_DTYPES)}"
        )
    dtype = SAFETENSORS_DTYPES[entry["dtype"]]
    shape, span = entry.get("shape"), entry.get("data_offsets")
    want = expected[name][0]
    stored = tuple(reversed(want)) if name in transposed else want  # Conv1D: (in, out)
    if not isinstance(shape, list) or tuple(shape) != stored:
        raise ArtifactError(
            f"{where}: {name} has shape {shape}; the config implies {list(stored)}; refused"
        )
    numel = 1
    for dim in stored:
        numel *= dim
    nbytes = numel * dtype.itemsize
    if (
        not isinstance(span, list)
        or len(span) != 2
        or not all(isinstance(x, int) and x >= 0 for x in span)
        or span[1] - span[0] != nbytes
    ):
        raise ArtifactError(
            f"{where}: {name}: data_offsets {span} do not hold {nbytes} bytes; refused"
        )
    return dtype, stored, tuple(span)


def _config_from_shapes(lm: Any) -> None:
    """Llama-like configs after structured pruning: the head count and MLP width that the
    first layer now has (the check after this finds layers that differ)."""
    attention = next(
        (m for m in lm.modules() if hasattr(m, "q_proj") and hasattr(m, "head_dim")), None
    )
    mlp = next((m for m in lm.modules() if hasattr(m, "gate_proj")), None)
    if attention is None or mlp is None:
        return
    lm.config.head_dim = attention.head_dim
    lm.config.num_attention_heads = attention.q_proj.out_features // attention.head_dim
    lm.config.num_key_value_heads = attention.k_proj.out_features // attention.head_dim
    lm.config.intermediate_size = mlp.gate_proj.out_features


def _conv1d_to_linear(lm: nn.Module) -> list[str]:
    """Replace transformers' Conv1D layers by the Linear layers they are (weight
    transposed), in place; their names."""
    from transformers.pytorch_utils import Conv1D

    names = [n for n, m in lm.named_modules() if isinstance(m, Conv1D)]
    for name in names:
        conv: Any = lm.get_submodule(name)
        inputs, outputs = conv.weight.shape  # Conv1D keeps (in, out)
        linear = nn.Linear(inputs, outputs, device=conv.weight.device, dtype=conv.weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(conv.weight.t())
            linear.bias.copy_(conv.bias)
        _replace(lm, name, linear)
    return names


def _replace(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ModelError(
            "model.name: compress.models:hugging_face needs transformers (make setup installs it)"
        ) from None
    return transformers
