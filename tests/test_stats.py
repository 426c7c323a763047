"""Uncertainty: the paired accuracy interval on constructed flips, and latency rounds."""

import time

import numpy as np
import pytest
import torch
from scipy.stats import beta

from compress.core.stats import median_interval, pack, paired_drop, unpack
from compress.measure.evaluate import against_baseline, evaluate
from compress.measure.latency import paired_latency_ratio
from compress.spec.recipe import EvaluateConfig
from tests.test_evaluate import CONFIG, _labelled_data, _Oracle


def _flipped(images: int, both_right: int, lost: int, gained: int):
    """Correctness of a baseline and a model on ``images`` images with known flips."""
    baseline = np.zeros(images, bool)
    model = np.zeros(images, bool)
    baseline[:both_right] = model[:both_right] = True
    baseline[both_right : both_right + lost] = True
    model[both_right + lost : both_right + lost + gained] = True
    return baseline, model


def test_interval_on_constructed_flips_is_the_exact_conditional_one():
    baseline, model = _flipped(1000, 900, lost=30, gained=10)
    drop = paired_drop(baseline, model)
    assert (drop.lost, drop.gained, drop.images) == (30, 10, 1000)
    assert drop.points == pytest.approx(2.0)
    # Clopper-Pearson for the share lost among the 40 flipped, mapped to points of top-1.
    low_share, high_share = beta.ppf(0.025, 30, 11), beta.ppf(0.975, 31, 10)
    assert drop.interval == pytest.approx(
        (100 * 40 * (2 * low_share - 1) / 1000, 100 * 40 * (2 * high_share - 1) / 1000)
    )
    assert drop.interval[0] > 0 and not drop.within_noise  # 30 vs 10 is no accident
    assert drop.p_value < 0.01


def test_balanced_flips_are_within_noise_and_a_gain_is_negative():
    drop = paired_drop(*_flipped(500, 400, lost=6, gained=6))
    assert drop.points == 0 and drop.within_noise
    assert drop.interval[0] < 0 < drop.interval[1]
    gain = paired_drop(*_flipped(500, 400, lost=0, gained=12))
    assert gain.points == pytest.approx(-2.4) and gain.interval[1] < 0


def test_a_model_identical_to_the_baseline_has_drop_zero_and_interval_zero():
    data = _labelled_data()
    oracle = _Oracle(shift=1)  # right on no image at top-1: correctness is all False
    base = evaluate(oracle, data, CONFIG, name="baseline")
    again = evaluate(oracle, data, CONFIG, baseline=base, name="same")
    assert again.drop.points == 0
    assert again.drop.interval == (0.0, 0.0)
    assert (again.drop.lost, again.drop.gained) == (0, 0)
    # The kept correctness is the per-image truth, and the drop against a perfect model
    # counts every image as gained.
    perfect = evaluate(_Oracle(shift=0), data, CONFIG, name="perfect")
    assert perfect.example_rows()[:, 0].all() and not base.example_rows()[:, 0].any()
    against_baseline(base, perfect)
    assert base.drop.lost == len(data.test) and base.drop.gained == 0


def test_correctness_packs_to_bits_and_back():
    bits = np.random.default_rng(0).random(10_003) < 0.9
    text = pack(bits)
    assert len(text) <= 4 * ((10_003 + 7) // 8 + 2) // 3  # one bit an image, in base64
    assert (unpack(text, 10_003) == bits).all()
    with pytest.raises(ValueError):
        unpack(text, 20_000)


def test_median_interval_from_order_statistics():
    values = [1.0, 1.1, 0.9, 1.05, 0.95, 1.02, 0.98, 1.01, 0.99, 1.03]
    assert median_interval(values) == (0.95, 1.05)  # 2nd and 9th of 10: 97.9 % coverage
    assert median_interval([3.0, 1.0, 2.0]) == (1.0, 3.0)  # too few: the range


def test_latency_ratio_rounds_see_a_slower_model():
    x = torch.zeros(1)

    def slow(batch):
        time.sleep(0.003)
        return batch

    config = EvaluateConfig(iterations=10, latency_rounds=4)
    ratio = paired_latency_ratio((lambda batch: batch, x), (slow, x), config)
    assert ratio.rounds == 4
    assert ratio.interval[0] <= ratio.p50 <= ratio.interval[1]
    assert ratio.interval[0] > 2  # 3 ms of sleep against a no-op


class _Runtime:
    """A model that busy-waits ``ms`` per call, twice as long while another runtime's
    threads still spin (``spin_s`` after that runtime's last call), as ONNX Runtime's do.
    ``last_calls`` is shared by the runtimes of one process."""

    def __init__(self, name: str, ms: float, last_calls: dict, spin_s: float = 0.0):
        self.name, self.ms, self.last_calls, self.spin_s = name, ms, last_calls, spin_s

    def __call__(self, batch):
        now = time.perf_counter()
        contended = any(
            now < last + spin for name, (last, spin) in self.last_calls.items() if name != self.name
        )
        end = now + (2 if contended else 1) * self.ms / 1e3
        while time.perf_counter() < end:
            pass
        self.last_calls[self.name] = (time.perf_counter(), self.spin_s)
        return batch


def test_latency_ratio_rounds_are_not_skewed_by_the_other_runtimes_spin():
    """The regression: in 10-call rounds the model timed after a spinning runtime looked
    slower, and a fast ORT model read ~0.26x an OpenVINO baseline it ran at 0.37x of."""
    x, last_calls = torch.zeros(1), {}
    baseline = _Runtime("openvino", ms=1.0, last_calls=last_calls)
    model = _Runtime("onnxruntime", ms=0.5, last_calls=last_calls, spin_s=0.02)
    ratio = paired_latency_ratio((baseline, x), (model, x), EvaluateConfig(iterations=100))
    assert ratio.p50 == pytest.approx(0.5, rel=0.15)
