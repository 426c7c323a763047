"""Training checkpoints: the state after every epoch (model, optimizer, scheduler, step, RNG,
best score) written atomically, and read back bounded by what the model holds.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from compress.core.storage import memory_cap, model_bytes, read_tensors, write_atomic

# A checkpoint holds the weights, up to two moments per weight (AdamW) and small state.
CHECKPOINT_BOUND = 4


def cpu_state(model: nn.Module) -> dict:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def save_checkpoint(
    path: Path, model, optimizer, scheduler, scaler, epoch: int, step: int, best: dict
) -> None:
    """Written atomically: a crash never leaves a half-written checkpoint."""
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "epoch": epoch,
        "step": step,
        "rng": torch.get_rng_state(),
        "best": {"score": best["score"], "epoch": best["epoch"]},  # its weights: best.pt
    }
    write_atomic(path, lambda tmp: torch.save(state, tmp))


def resume(path: Path, model, optimizer, scheduler, scaler) -> tuple[int, int, dict]:
    """Load a checkpoint (weights only: no code is unpickled); returns (next epoch, step, best)."""
    # Read as data, bounded: the weights, an optimizer's moments, the rest small.
    bound = min(CHECKPOINT_BOUND * model_bytes(model), memory_cap())
    state = read_tensors(path, bound, nested=True)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng"])
    best = dict(state["best"], state=None)
    if "top1" in best:  # a checkpoint from before tasks: top-1, higher is better
        best["score"] = best.pop("top1")
    if path.with_name("best.pt").is_file():
        best["state"] = read_tensors(path.with_name("best.pt"), model_bytes(model))
    return state["epoch"] + 1, state["step"], best
