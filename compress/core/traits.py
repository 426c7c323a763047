"""What a model tells the rest of compress about itself: the one protocol between the
stages, which set these attributes on the model they return, and the evaluator, report,
exporters and artifact, which read them through :func:`traits` (or, for saving,
:mod:`compress.models.artifact`). A plain ``nn.Module`` has none of them and gets the defaults.

==================  =========================================================  ==============
attribute           meaning                                                    default
==================  =========================================================  ==============
notes               remarks for the report, under this step (list of str)      []
stage_details       a stage's own figures: per-layer tables, MACs ratio         {}
reference_module    the module to count FLOPs, bytes and layers on when the    the model
                    runnable one is compiled (INT8 graphs)
param_counts        (total, non-zero) weights as stored                        counted
element_bytes       bytes per weight/activation element as executed            the dtype's
compute_dtype       what the kernels compute in ("int8", "float16", ...)       the weights'
cpu_only            its kernels run on the CPU only                            False
not_faster_reason   why it may not be faster here (half precision on a CPU)    None
compress_spec       the plain data that builds the float model again           (not saved
                    (models.py / architectures.py)                             as a spec)
compress_changes    registered architecture changes it went through            []
                    (artifact.register_architecture_change)
save_artifact       ``save_artifact(folder, example) -> manifest``: a kind      spec + weights,
                    that saves itself (quantized models)                       or a graph
compress_replace-   layers a stage swapped for others, as data, to replay on   []
ments               load (factorize)
compress_depth_     the name of the stack of blocks depth pruning shortened    None
stack               (its length is saved, and restored on load)
==================  =========================================================  ==============

A stage writes them with :func:`set_traits` and :func:`add_note`: one place that knows the
names (a misspelt one is refused, not silently ignored by every reader), and one that torch's
typing of a module's attributes (tensors or modules) does not stand in the way of.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

# The attributes of the table above.
TRAIT_NAMES = frozenset(
    {
        "notes",
        "stage_details",
        "reference_module",
        "param_counts",
        "element_bytes",
        "compute_dtype",
        "cpu_only",
        "not_faster_reason",
        "compress_spec",
        "compress_changes",
        "save_artifact",
        "compress_replacements",
        "compress_depth_stack",
    }
)


@dataclass(frozen=True)
class Traits:
    """The attributes above, read once, with their defaults filled in."""

    notes: tuple[str, ...]
    details: dict
    reference: nn.Module
    param_counts: tuple[int, int] | None
    element_bytes: int | None
    compute_dtype: str
    cpu_only: bool
    not_faster_reason: str | None
    compiled: bool  # what runs is not `reference` (compiled INT8 kernels): no per-layer timing


def traits(model: nn.Module) -> Traits:
    """What ``model`` says about itself, defaults filled in.

    Example:
        >>> traits(quantized).compute_dtype, traits(quantized).notes
        ('int8', ('kept in float: fc',))
    """
    first = next(iter(model.parameters()), None)
    dtype = str(first.dtype).removeprefix("torch.") if first is not None else "float32"
    return Traits(
        notes=tuple(getattr(model, "notes", ())),
        details=dict(getattr(model, "stage_details", {})),
        reference=getattr(model, "reference_module", model),
        param_counts=getattr(model, "param_counts", None),
        element_bytes=getattr(model, "element_bytes", None),
        compute_dtype=getattr(model, "compute_dtype", dtype),
        cpu_only=getattr(model, "cpu_only", False),
        not_faster_reason=getattr(model, "not_faster_reason", None),
        compiled=hasattr(model, "reference_module"),
    )


def set_traits(model: nn.Module, **values: Any) -> nn.Module:
    """Set what ``model`` tells the rest of compress about itself (the table above), and
    return it.

    Example:
        >>> set_traits(pruned, stage_details={"layers": rows}, notes=[])
    """
    unknown = sorted(set(values) - TRAIT_NAMES)
    if unknown:
        raise AttributeError(f"not a model trait: {', '.join(unknown)} (see compress.core.traits)")
    for name, value in values.items():
        setattr(model, name, value)  # not a tensor or module: nn.Module keeps it as is
    return model


def add_note(model: nn.Module, text: str) -> None:
    """One more remark for the report under this step.

    Example:
        >>> add_note(model, "left unpruned: its only layer is the classifier")
    """
    set_traits(model, notes=[*getattr(model, "notes", ()), text])
