"""Every registered stage, by default: returns a new model, leaves its input untouched, and
saves and reloads with the same outputs. A new stage is tested here once it says, in
QUICK, how to run in a few seconds."""

import pytest
import torch

from compress.artifact import load, save
from compress.pipeline import STAGES
from compress.recipe import parse_stage_options

QUICK = {
    "quantize": {"method": "int8_static", "calibration_batches": 1},
    "prune": {"method": "structured", "ratio": 0.25},
    "distill": {"train": {"epochs": 0, "max_steps": 3}},
    "share": {"bits": {"conv": 4, "linear": 4}, "fine_tune": {"epochs": 0, "max_steps": 2}},
    "factorize": {"linear_rank": 0.5},
}


@pytest.mark.parametrize("kind", sorted(STAGES))
def test_stage_makes_a_new_model_that_round_trips(kind, trained_tiny, fmnist, tmp_path):
    assert kind in QUICK, f"add a quick configuration for the new stage {kind!r}"
    before = {k: v.clone() for k, v in trained_tiny.state_dict().items()}
    context = {"teacher": trained_tiny} if kind == "distill" else {}
    model = STAGES[kind](trained_tiny, fmnist, parse_stage_options(kind, QUICK[kind]), **context)
    assert model is not trained_tiny and not model.training
    after = trained_tiny.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the input is left as it was
    again = load(save(model, tmp_path / kind))
    images = fmnist.example_input(8)
    with torch.no_grad():
        assert torch.allclose(again(images), model(images), atol=1e-5)
