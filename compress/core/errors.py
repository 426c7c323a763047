"""Errors, in two families: a user's mistake (exit 2) and a failure at run time (exit 1).

The command line maps them to exit codes by these two bases alone; each message is one
line naming what is wrong, the bad value and what is allowed.
"""

from __future__ import annotations

import re


class UsageError(ValueError):
    """Something the user gave is not valid: a recipe key, an option, a path, a folder."""


class RecipeError(UsageError):
    """A recipe (or an override, or an option) that is not valid."""


class ArtifactError(UsageError):
    """A model folder that is missing, malformed or unsafe to load."""


class DataError(UsageError):
    """A dataset that is missing, malformed, or does not fit the model."""


class TaskError(UsageError):
    """A model output, targets or metric that the task cannot read (bad input: exit 2)."""


class RunDirError(UsageError):
    """A run directory that exists already: runs are never written over."""


class ReportError(UsageError):
    """A run folder whose report.json is missing or malformed."""


class CompressError(RuntimeError):
    """A stage, training or export that failed on valid input."""


class ModelError(CompressError):
    """A model that cannot be built or loaded."""


class TrainingError(CompressError):
    """A training that cannot go on (diverged, or a checkpoint that does not fit)."""


class QuantizationError(CompressError):
    """A model that the chosen quantization method cannot handle."""


class PruningError(CompressError):
    """A model that structured pruning cannot handle."""


class ExportError(CompressError):
    """A model that cannot be exported to, or run in, a deployment runtime."""


def first_line(error: BaseException) -> str:
    """The most telling line of a long error: its root cause's first, without colours."""
    while error.__cause__ is not None:
        error = error.__cause__
    for line in re.sub(r"\x1b\[[0-9;]*m", "", str(error)).splitlines():
        if line.strip() and not line.startswith(("Traceback", "[torch.onnx]")):
            return line.strip()[:300]
    return type(error).__name__
