"""Every registered stage and method, by default: returns a new model, leaves its input
untouched, saves and reloads with the same outputs, and the reloaded folder evaluates to the
same accuracy and profiles (what `eval --model` and `profile --model` do). A new stage or
method is tested here once it says, in QUICK, how to run in a few seconds. (Quantization's
methods past the default are each measured from their saved folder in test_quantize.py.)"""

import pytest
import torch

from compress.artifact import load, save
from compress.evaluate import accuracy, evaluate
from compress.profile import profile_model
from compress.recipe import EvaluateConfig, parse_stage_options
from compress.registry import STAGES, StageContext

QUICK = {
    "quantize": {"calibration_batches": 1},
    "prune": {"ratio": 0.25},
    "distill": {"train": {"epochs": 0, "max_steps": 3}},
    "share": {"bits": {"conv": 4, "linear": 4}, "fine_tune": {"epochs": 0, "max_steps": 2}},
    "factorize": {"linear_rank": 0.5},
}
# Options that only some methods take (each method refuses the others').
QUICK_METHOD = {
    ("quantize", "int8_static"): {"calibration_batches": 1},
    ("quantize", "int8_qat"): {"fine_tune": {"epochs": 0, "max_steps": 2}},
    ("prune", "magnitude"): {"sparsity": 0.5},
}
CASES = [
    (kind, method)
    for kind in sorted(STAGES)
    for method in STAGES[kind].methods
    if kind != "quantize" or method == "int8_static"
]
# One batch size throughout (the accuracy's), so that an INT8 model compiles once.
QUICK_EVAL = EvaluateConfig(
    warmup=1, iterations=2, latency_batch_size=250, runtimes=["torch"], profile=False
)


def _options(kind: str, method: str) -> dict:
    if (kind, method) in QUICK_METHOD:
        return {"method": method, **QUICK_METHOD[kind, method]}
    allowed = STAGES[kind].options(method)
    return {"method": method, **{k: v for k, v in QUICK[kind].items() if k in allowed}}


@pytest.mark.parametrize(("kind", "method"), CASES)
def test_stage_makes_a_new_model_that_round_trips(kind, method, trained_tiny, fmnist, tmp_path):
    assert kind in QUICK, f"add a quick configuration for the new stage {kind!r}"
    before = {k: v.clone() for k, v in trained_tiny.state_dict().items()}
    config = parse_stage_options(kind, _options(kind, method))
    context = StageContext(baseline=trained_tiny)  # distillation's teacher
    model = STAGES[kind].function(trained_tiny, fmnist, config, context=context)
    assert model is not trained_tiny and not model.training
    after = trained_tiny.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the input is left as it was
    folder = save(model, tmp_path / kind, fmnist.example_input(2))
    again = load(folder, trust_code=True)  # the tiny CNN's spec is an import path
    images = fmnist.example_input(250)
    with torch.no_grad():
        assert torch.allclose(again(images), model(images), atol=1e-5)
    # What `eval --model` and `profile --model` do with the folder.
    measured = evaluate(again, fmnist, QUICK_EVAL, name=f"{kind}:{method}", artifact=folder)
    assert measured.accuracy_top1 == pytest.approx(accuracy(model, fmnist)[0], abs=0.051)
    assert measured.size_bytes > 0 and measured.macs > 0
    profile = profile_model(again, fmnist.example_input(1), threads=1, iterations=2)
    assert profile["layers"] and profile["model"]["macs"] == measured.macs
