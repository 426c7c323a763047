"""Distillation: the KD loss against hand-computed values, and the stage on real data."""

import math

import pytest
import torch

from compress.distill import distill, kd_loss
from compress.evaluate import EvaluateConfig, evaluate
from compress.recipe import RecipeError, parse_recipe


def test_kd_loss_matches_hand_computation():
    student = torch.tensor([[1.0, 0.0, -1.0]])
    teacher = torch.tensor([[0.0, 2.0, 0.0]])
    labels = torch.tensor([1])
    t, alpha = 2.0, 0.25

    def softmax(v):
        e = [math.exp(x / t) for x in v]
        return [x / sum(e) for x in e]

    p_s, p_t = softmax([1.0, 0.0, -1.0]), softmax([0.0, 2.0, 0.0])
    kl = sum(pt * (math.log(pt) - math.log(ps)) for pt, ps in zip(p_t, p_s, strict=True))
    ce = -math.log(math.exp(0.0) / sum(math.exp(x) for x in [1.0, 0.0, -1.0]))
    expected = alpha * t * t * kl + (1 - alpha) * ce
    assert kd_loss(student, teacher, labels, t, alpha).item() == pytest.approx(expected, rel=1e-6)


def test_kd_loss_limits():
    logits, labels = torch.randn(8, 5), torch.randint(0, 5, (8,))
    assert kd_loss(logits, logits, labels, 4.0, 1.0).item() == pytest.approx(0.0, abs=1e-6)
    ce = torch.nn.functional.cross_entropy(logits, labels)
    assert kd_loss(logits, torch.randn(8, 5), labels, 4.0, 0.0).item() == pytest.approx(ce.item())


@pytest.mark.slow
def test_distill_trains_a_fresh_student_on_real_data(trained_tiny, fmnist):
    student = distill(
        trained_tiny,
        fmnist,
        teacher=trained_tiny,
        student={"name": "tests.tiny:tiny_cnn"},
        train={"epochs": 0, "max_steps": 60, "lr": 0.1},
    )
    assert student is not trained_tiny and not student.training
    accuracy = evaluate(student, fmnist, EvaluateConfig(warmup=1, iterations=3)).accuracy_top1
    assert accuracy > 40.0  # well above chance (10 %) after 60 steps against the teacher


def test_recipe_options_are_validated():
    recipe = parse_recipe(
        {
            "stages": [
                {
                    "distill": {
                        "student": {"name": "mobilenet_v2"},
                        "temperature": 2,
                        "train": {"epochs": 2},
                    }
                }
            ]
        }
    )
    config = recipe.stages[0].config
    assert (config.student.name, config.temperature, config.train.epochs, config.teacher) == (
        "mobilenet_v2",
        2.0,
        2,
        None,
    )
    with pytest.raises(
        RecipeError,
        match=r"stages\[0\]\.distill\.temprature: unknown key .*did you mean 'temperature'",
    ):
        parse_recipe({"stages": [{"distill": {"temprature": 2}}]})
    with pytest.raises(RecipeError, match=r"stages\[0\]\.distill\.alpha: 1.5 is out of range"):
        parse_recipe({"stages": [{"distill": {"alpha": 1.5}}]})
