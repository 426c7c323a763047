"""What a model holds and does, counted without running it for time: parameters (total and
non-zero), FLOPs, its size on disk, and how far an approximation strays (SQNR).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from torch import nn

from compress.measure.profile import flop_counter
from compress.models.artifact import save


def count_params(model: nn.Module) -> tuple[int, int]:
    """(total, non-zero) parameter elements."""
    total = nonzero = 0
    for p in model.parameters():
        total += p.numel()
        nonzero += int(torch.count_nonzero(p).item())
    return total, nonzero


def count_flops(model: nn.Module, example: torch.Tensor) -> int:
    """FLOPs of one forward pass on ``example`` (per image), via torch.utils.flop_counter."""
    with torch.inference_mode(), flop_counter() as counter:
        model(example)
    return counter.get_total_flops() // example.shape[0]


def artifact_size(
    model: nn.Module,
    artifact: str | Path | None = None,
    example: torch.Tensor | None = None,
    notes: list[str] | None = None,
) -> int:
    """Bytes on disk of the saved model (a file, or every file in a folder).

    Without ``artifact`` the model is saved to a temporary folder; a model that can be
    neither rebuilt from a spec nor exported is measured as a plain state_dict file, and
    ``notes`` says so.
    """
    if artifact is None:
        with tempfile.TemporaryDirectory() as folder:
            try:
                return artifact_size(model, save(model, Path(folder) / "model", example))
            except Exception as error:  # noqa: BLE001 - export failures are many and varied
                torch.save(model.state_dict(), Path(folder) / "state_dict.pt")
                if notes is not None:
                    notes.append(
                        "size is the state_dict's: the model could not be saved as an"
                        f" artifact ({str(error).strip().splitlines()[0][:120]})"
                    )
                return (Path(folder) / "state_dict.pt").stat().st_size
    path = Path(artifact)
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def sqnr_db(reference: torch.Tensor, approximation: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: how far ``approximation`` strays from ``reference``."""
    noise = (reference.float() - approximation.float()).pow(2).mean()
    if noise == 0:
        return float("inf")
    return (10 * torch.log10(reference.float().pow(2).mean() / noise)).item()
