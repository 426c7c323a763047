"""The per-layer cost breakdown and the measured roofline."""

import json
import math

import pytest
import torch

from compress.measure.counts import count_flops
from compress.measure.machine import machine_peaks
from compress.measure.profile import count_memory_access, layer_costs, profile_model
from compress.models.build import build_model
from compress.spec.recipe import ModelConfig
from tests.conftest import run_cli


def test_peaks_are_positive_finite_and_cached():
    peaks = machine_peaks(refresh=True)  # measured here, not read from the session's cache
    for key in ("fp32_gflops", "int8_gops", "bandwidth_gbs"):
        assert math.isfinite(peaks[key]) and peaks[key] > 0
    assert machine_peaks() == peaks  # the second call reads the cache


@pytest.mark.parametrize("name", ["tests.tiny:tiny_cnn", "resnet18"])
def test_layer_rows_add_up_to_the_evaluator(name, fmnist):
    model = build_model(ModelConfig(name=name), num_classes=10, in_channels=1).eval()
    example = fmnist.example_input(1)
    rows = layer_costs(model, example, iterations=2)
    assert sum(r["macs"] for r in rows) == count_flops(model, example) // 2
    assert sum(r["bytes"] for r in rows) == count_memory_access(model, example)
    assert all(r["time_us"] >= 0 for r in rows)
    # Shares of the whole forward's time; the rest is Python between layers.
    assert 0.5 < sum(r["time_share"] for r in rows) <= 1.01
    pools = [r for r in rows if "Pool" in r["type"] and r["downsamples"] > 1]
    assert pools  # pooling layers say how much they shrink what follows


def test_profile_marks_bound_and_roof_share(fmnist):
    model = build_model(ModelConfig(name="tests.tiny:tiny_cnn"), 10, 1).eval()
    result = profile_model(model, fmnist.example_input(1), iterations=2)
    assert {r["bound"] for r in result["layers"]} <= {"memory", "compute"}
    convs = [r for r in result["layers"] if r["type"] == "Conv2d"]
    assert all(r["intensity"] > 1 for r in convs)
    assert 0 < result["model"]["peak_share"] < 1


@pytest.mark.slow
def test_profile_command_writes_breakdown_and_roofline(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "name: r\nmodel: {name: 'tests.tiny:tiny_cnn'}\n"
        "data: {train_subset: 500, test_subset: 200, calibration_size: 200}\n"
        "train: {max_steps: 5}\n"
    )
    out = tmp_path / "profile"
    result = run_cli("profile", str(recipe), "--out", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "| 4 | Conv2d | 64x14x14 |" in result.stdout
    assert (out / "roofline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = json.loads((out / "profile.json").read_text())["layers"]
    assert sum(r["macs"] for r in rows) == 5645440 // 1  # the tiny CNN's MACs at 28x28
    assert "USDT" not in result.stderr  # the profiler's native chatter stays hidden


def test_layer_rows_match_a_hand_count():
    # conv 1->2, 3x3 on 5x5 -> 2x3x3; ReLU; flatten (a view); linear 18 -> 4. fp32: 4 bytes.
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 2, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(18, 4)
    ).eval()
    rows = {r["type"]: r for r in layer_costs(model, torch.rand(1, 1, 5, 5), iterations=1)}
    conv, relu, linear = rows["Conv2d"], rows["ReLU"], rows["Linear"]
    assert conv["macs"] == 18 * 9  # 18 outputs, 9 products each
    assert conv["params"] == 2 * 9 + 2
    # reads the image (25), the weights (18) and bias (2), writes 18 values
    assert conv["bytes"] == 4 * (25 + 18 + 2 + 18)
    assert conv["output"] == "2x3x3"
    assert relu["macs"] == 0 and relu["bytes"] == 4 * (18 + 18)
    assert linear["macs"] == 18 * 4
    assert linear["bytes"] == 4 * (18 + 72 + 4 + 4)  # input, weights, bias; 4 outputs
    assert "Flatten" not in rows  # a view moves no bytes and does no work
