"""Quantizing what can be quantized when the whole model does not export.

Breadth first: each child module that exports is quantized on its own (its calibration
inputs captured from the float model), and a child that does not is split into its own
children; leaves that still fail stay in float. The model's notes name each module left
in float with the first line of its reason.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from pathlib import Path

import torch
from torch import nn

from compress.core.errors import ArtifactError, QuantizationError
from compress.core.modules import matching_modules
from compress.data import Data
from compress.measure.counts import count_params
from compress.models.artifact import (
    load,
    manifest_counts,
    read_weights,
    save,
    spec_architecture,
)
from compress.stages.quantize._config import QuantizeConfig
from compress.stages.quantize._pt2e import export_model, quantize_graph


class PartlyQuantizedModel(nn.Module):
    """The float model with its exportable submodules swapped for quantized ones."""

    compute_dtype = "int8 (parts)"
    cpu_only = True

    def __init__(
        self,
        model: nn.Module,
        quantized: list[str],
        param_counts: tuple[int, int],
        notes: list[str],
    ):
        super().__init__()
        self.model = model
        self.quantized = list(quantized)
        self.param_counts = tuple(param_counts)
        self.notes = list(notes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def train(self, mode: bool = True) -> PartlyQuantizedModel:
        self.training = mode
        for name, child in self.model.named_modules():
            if (
                name
                and name not in self.quantized
                and not any(name.startswith(q + ".") for q in self.quantized)
            ):
                child.training = mode
        return self

    def save_artifact(self, folder: Path, example: torch.Tensor | None) -> dict:
        if not hasattr(self.model, "compress_spec"):
            raise ValueError(
                "a partly quantized model can be saved only when compress built it (it has a spec)"
            )
        parts = {}
        for i, name in enumerate(self.quantized):
            save(self.model.get_submodule(name), folder / f"part{i}")
            parts[name] = f"part{i}"
        state = {
            k: v
            for k, v in self.model.state_dict().items()
            if not any(k.startswith(q + ".") for q in self.quantized)
        }
        torch.save(state, folder / "weights.pt")
        return {
            "kind": "partly_quantized",
            "file": "weights.pt",
            "spec": self.model.compress_spec,
            "parts": parts,
            "param_counts": list(self.param_counts),
            "notes": self.notes,
        }


def load_partly_quantized(folder: Path, manifest: dict, trust) -> PartlyQuantizedModel:
    model = spec_architecture(folder, manifest, trust)
    state = read_weights(folder, manifest, model)
    missing, unexpected = model.load_state_dict(state, strict=False)
    parts = manifest.get("parts")
    if not isinstance(parts, dict) or not all(isinstance(n, str) for n in parts):
        raise ArtifactError(f"{folder}: parts malformed; refused")
    if unexpected or any(not any(k.startswith(p + ".") for p in parts) for k in missing):
        raise ArtifactError(
            f"{folder}: weights do not fit the model (missing {missing}, unexpected {unexpected})"
        )
    modules = dict(model.named_modules())
    for name, sub in parts.items():
        if name not in modules or not name:
            raise ArtifactError(f"{folder}: part {name!r} is not a module of the model")
        if not isinstance(sub, str) or not re.fullmatch(r"part\d+", sub):
            raise ArtifactError(f"{folder}: part {sub!r} is not a part folder of this one")
        if (folder / sub).is_symlink():
            raise ArtifactError(f"{folder}: part {sub!r} is a link; refused")
        part = load(folder / sub, trust_code=trust.code, trusted_imports=trust.imports)
        _set_submodule(model, name, part)
    notes = [str(note) for note in manifest.get("notes", [])]
    return PartlyQuantizedModel(model.eval(), list(parts), manifest_counts(folder, manifest), notes)


def quantize_parts(
    model: nn.Module, data: Data, config: QuantizeConfig, mode: str, reason: str
) -> nn.Module:
    """Quantize every exportable submodule of ``model`` (a copy, in eval mode) in place."""
    param_counts = count_params(model)
    skipped = set(matching_modules(model, config.skip, key="quantize.skip"))
    float_model = copy.deepcopy(model).eval()  # inputs are captured from the float model
    notes = [f"the whole model does not export ({reason}); quantized the parts that do"]
    quantized, left = [], []
    frontier = [name for name, _ in model.named_children()]
    while frontier:
        inputs = _capture_inputs(float_model, frontier, data, config.calibration_batches)
        next_frontier = []
        for name in frontier:
            module = model.get_submodule(name)
            if name in skipped or not any(True for _ in module.parameters()):
                continue  # asked to stay float, or nothing to quantize
            batches = inputs.get(name)
            failure = "takes other than one tensor" if not batches else None
            shapes = {tuple(b.shape[1:]) for b in batches or []}
            if len(shapes) > 1:  # one module run on each feature map (a detector's RPN head)
                failure = f"called with inputs of {len(shapes)} shapes; its graph takes one"
                batches = None
            if batches:
                try:
                    exported = export_model(module, batches[0][:2])
                    part_config = _config_for(config, name, skipped)
                    _set_submodule(
                        model,
                        name,
                        quantize_graph(module, exported, iter(batches), part_config, mode),
                    )
                    quantized.append(name)
                    continue
                except QuantizationError as error:
                    failure = str(error)
            children = [f"{name}.{child}" for child, _ in module.named_children()]
            if children:
                next_frontier += children
            else:
                left.append(name)
                notes.append(f"left in float: {name} ({str(failure).splitlines()[0][:160]})")
        frontier = next_frontier
    if not quantized:
        raise QuantizationError(f"nothing in {type(model).__name__} could be quantized: {reason}")
    notes.append(f"quantized separately: {', '.join(quantized)}")
    return PartlyQuantizedModel(model, quantized, param_counts, notes)


def _config_for(config: QuantizeConfig, prefix: str, skipped: set[str]) -> QuantizeConfig:
    """The stage's config with ``skip`` renamed into the submodule's own namespace."""
    inner = [s[len(prefix) + 1 :] for s in skipped if s.startswith(prefix + ".")]
    return dataclasses.replace(config, skip=inner)


def _capture_inputs(
    model: nn.Module, names: list[str], data: Data, batches: int
) -> dict[str, list[torch.Tensor]]:
    """The single-tensor inputs each named submodule receives on calibration batches."""
    captured: dict[str, list[torch.Tensor]] = {}
    hooks = []
    for name in names:

        def hook(_module, args, kwargs, name=name):
            if (
                len(args) == 1
                and not kwargs
                and isinstance(args[0], torch.Tensor)
                and args[0].shape[0] >= 2
            ):
                captured.setdefault(name, []).append(args[0].detach().clone())
            else:
                captured[name] = None  # other call forms: cannot calibrate it alone

        hooks.append(model.get_submodule(name).register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            for i, batch in enumerate(data.loader("calibration")):
                if i >= batches:
                    break
                model(batch[0])  # a batch's inputs come first, whatever the task
    finally:
        for h in hooks:
            h.remove()
    return {k: v for k, v in captured.items() if v}


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)
