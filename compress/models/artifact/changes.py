"""Architecture changes a stage makes to a spec-built model (pruned shapes, factorized
layers): each registered once, captured as plain data when saving, rebuilt when loading."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from compress.core.traits import set_traits


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
    set_traits(model, compress_changes=[*getattr(model, "compress_changes", []), key])


def architecture_changes(model: nn.Module) -> dict:
    """The manifest entries of ``model``'s architecture changes, captured now, in order."""
    keys = set(getattr(model, "compress_changes", []))
    ordered = sorted(keys, key=lambda k: ARCHITECTURE_CHANGES[k].order)
    return {key: ARCHITECTURE_CHANGES[key].capture(model) for key in ordered}
