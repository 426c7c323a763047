"""Every registered stage and method, by default: returns a new model, leaves its input
untouched, saves and reloads with the same outputs, and the reloaded folder evaluates to the
same accuracy and profiles (what `eval --model` and `profile --model` do). A new stage or
method is tested here once it says, in QUICK, how to run in a few seconds. Models whose
kernels compile (INT8) are evaluated and profiled from their folder by
test_quantize.test_method_close_to_float_on_real_data, for every quantize method."""

import pytest
import torch

from compress.core.registry import STAGES, StageContext
from compress.core.traits import traits
from compress.measure.evaluate import evaluate
from compress.measure.profile import profile_model
from compress.measure.scores import metrics
from compress.models.artifact import load, save
from compress.spec.recipe import EvaluateConfig, parse_stage_options
from compress.stages.quantize import INT8_METHODS

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
    ("quantize", "int8_qat"): {"fine_tune": {"epochs": 0, "max_steps": 2, "validate": False}},
    ("quantize", "int4_weight_only"): {"group_size": 32},
    ("quantize", "int8_weight_only"): {},
    ("prune", "magnitude"): {"sparsity": 0.5},
}
# QAT's conversion matches torchao's conv-BN patterns by exporting each (~120 exports,
# 40-60 s here): in the slow set.
SLOW = {("quantize", "int8_qat")}
CASES = [
    pytest.param(kind, method, marks=[pytest.mark.slow] if (kind, method) in SLOW else [])
    for kind in sorted(STAGES)
    for method in STAGES[kind].methods
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


# How a stage that times its result (quantize's goal: speed) measures here: briefly, in torch.
STAGE_EVAL = EvaluateConfig(warmup=1, iterations=10, latency_rounds=3, runtimes=["torch"])


def _run_stage(kind, method, trained_tiny, fmnist):
    assert kind in QUICK, f"add a quick configuration for the new stage {kind!r}"
    config = parse_stage_options(kind, _options(kind, method))
    # The run's baseline is distillation's teacher.
    context = StageContext(baseline=trained_tiny, evaluate=STAGE_EVAL)
    return STAGES[kind].function(trained_tiny, fmnist, config, context=context)


def _evaluates_and_profiles_from_its_folder(model, folder, fmnist, name):
    again = load(folder, trust_code=True)
    measured = evaluate(again, fmnist, QUICK_EVAL, name=name, artifact=folder)
    assert measured.score == pytest.approx(metrics(model, fmnist)["top-1"], abs=0.051)
    assert measured.size_bytes > 0 and measured.macs > 0
    profile = profile_model(again, fmnist.example_input(1), threads=1, iterations=2)
    assert profile["layers"] and profile["model"]["macs"] == measured.macs


@pytest.mark.parametrize(("kind", "method"), CASES)
def test_stage_makes_a_new_model_that_round_trips(kind, method, tiny, fmnist, tmp_path):
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    model = _run_stage(kind, method, tiny, fmnist)
    assert model is not tiny and not model.training
    after = tiny.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the input is left as it was
    if kind == "quantize" and method in INT8_METHODS:  # goal: speed, the default: timed
        check = traits(model).details["speed_check"]
        assert (check["kept"] == "int8") == (check["p50_x"] < 1.0)
        assert (traits(model).compute_dtype == "float32") == (check["kept"] == "float")
    folder = save(model, tmp_path / kind, fmnist.example_input(2))
    again = load(folder, trust_code=True)  # the tiny CNN's spec is an import path
    images = fmnist.example_input(250)
    with torch.no_grad():  # the reference graph: the same numbers, nothing compiled
        ours, reloaded = traits(model).reference(images), traits(again).reference(images)
    assert torch.allclose(reloaded, ours, atol=1e-5)
    if not traits(model).compiled:
        _evaluates_and_profiles_from_its_folder(model, folder, fmnist, f"{kind}:{method}")


SEGMENTATION_CASES = [
    pytest.param(kind, method, marks=[pytest.mark.slow])
    for kind in sorted(STAGES)
    for method in STAGES[kind].methods
]


@pytest.mark.parametrize(("kind", "method"), SEGMENTATION_CASES)
def test_every_stage_runs_on_a_segmenter(kind, method, tiny_segmenter, scenes, tmp_path):
    """Issue 32: the same stages on per-pixel logits; the result keeps 11 classes at the
    input's size, round-trips through its folder and scores mIoU near its input's. (The
    methods that act on Linear layers alone say in their notes that the segmenter has none.)"""
    config = parse_stage_options(kind, _options(kind, method))
    context = StageContext(baseline=tiny_segmenter, evaluate=STAGE_EVAL)
    model = STAGES[kind].function(tiny_segmenter, scenes, config, context=context)
    images = scenes.example_input(4)
    with torch.no_grad():
        ours = traits(model).reference(images)
    assert ours.shape == (4, 11, 64, 64)
    folder = save(model, tmp_path / kind, scenes.example_input(2))
    with torch.no_grad():
        reloaded = traits(load(folder, trust_code=True)).reference(images)
    assert torch.allclose(reloaded, ours, atol=1e-4)
    before = metrics(tiny_segmenter, scenes)["mIoU"]
    assert metrics(traits(model).reference, scenes)["mIoU"] > before - 15
