"""Depthwise-separable factorisation: the fit, exact MACs arithmetic, the artifact."""

import pytest
import torch
from torch import nn

from compress.measure.counts import count_flops
from compress.models.artifact import load, save
from compress.stages.factorize import factorize, separable_fit, svd_fit


def _relative_error(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_a_separable_kernel_is_fitted_exactly(fmnist):
    conv = nn.Conv2d(1, 8, 3, padding=1)
    images = conv(fmnist.example_input(8))  # a real batch, 8 channels
    layer = nn.Conv2d(8, 16, 3, stride=2, padding=1)
    depthwise, pointwise = torch.randn(8, 3, 3), torch.randn(16, 8)
    with torch.no_grad():  # W[o, i] = P[o, i] * D[i]: depthwise-separable by construction
        layer.weight.copy_(pointwise[:, :, None, None] * depthwise[None])
    pair, error = separable_fit(layer)
    assert error < 1e-5
    assert _relative_error(pair(images), layer(images)) < 1e-5


def test_trained_layer_fit_is_the_svd_optimum_and_close(tiny, fmnist):
    conv = tiny.get_submodule("8")  # 64 -> 64, 3x3, trained on real data
    features = tiny[:8](fmnist.example_input(16)).detach()
    pair, error = separable_fit(conv)
    fitted = pair[1].weight[:, :, 0, 0, None, None] * pair[0].weight[:, 0][None]
    assert _relative_error(fitted, conv.weight) == pytest.approx(error, rel=1e-4)
    assert error < 0.9  # a real fit, not nothing
    assert _relative_error(pair(features), conv(features)) < 1.0


def test_macs_arithmetic_is_exact(tiny, fmnist):
    example = fmnist.example_input(1)
    thin = factorize(tiny, fmnist, linear_rank=0.5)
    rows = {r["layer"]: r for r in thin.stage_details["layers"]}
    assert set(rows) == {"4", "8", "13"}  # layer 0 has 1 input channel: skipped
    assert rows["4"]["macs_before"] == 14 * 14 * 32 * 9 * 64
    assert rows["4"]["macs_after"] == 14 * 14 * 32 * (9 + 64)
    saved = sum(r["macs_before"] - r["macs_after"] for r in rows.values())
    assert count_flops(thin, example) // 2 == count_flops(tiny, example) // 2 - saved
    assert thin.stage_details["macs_ratio"] < 0.5


def test_linear_svd_split_matches_at_full_rank():
    linear = nn.Linear(12, 8)
    pair, error = svd_fit(linear, rank=8)
    x = torch.randn(4, 12)
    assert error < 1e-6 and torch.allclose(pair(x), linear(x), atol=1e-5)


def test_factorized_model_saves_and_reloads_identically(tiny, fmnist, tmp_path):
    thin = factorize(tiny, fmnist, layers=["8"])
    assert isinstance(thin.get_submodule("8"), nn.Sequential)
    again = load(save(thin, tmp_path / "thin"), trust_code=True)
    images = fmnist.example_input(4)
    assert torch.equal(again(images), thin(images))


def test_named_layer_must_be_a_standard_convolution(tiny, fmnist):
    from compress.core.errors import RecipeError

    with pytest.raises(RecipeError, match="factorize.layers: 13 is not a standard k x k"):
        factorize(tiny, fmnist, layers=["13"])
