"""INT8 static quantization on a small CNN trained on real Fashion-MNIST."""

import pytest
import torch
from torch import nn

from compress.artifact import load, save
from compress.evaluate import EvaluateConfig, evaluate
from compress.quantize import QUANTIZE_METHODS, QuantizationError, quantize

pytestmark = pytest.mark.slow
FAST_EVAL = EvaluateConfig(warmup=3, iterations=20)


def sqnr_db(reference: torch.Tensor, approximation: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB (as torchao's tests use)."""
    noise = (reference - approximation).pow(2).mean()
    return (10 * torch.log10(reference.pow(2).mean() / noise)).item()


@pytest.fixture(scope="module")
def int8_tiny(trained_tiny, fmnist):
    return quantize(trained_tiny, fmnist, method="int8_static", calibration_batches=4)


@pytest.mark.parametrize("method", sorted(QUANTIZE_METHODS))
def test_method_close_to_float_on_real_data(method, trained_tiny, fmnist):
    qmodel = quantize(trained_tiny, fmnist, method=method, calibration_batches=4)
    images = fmnist.example_input(250)
    with torch.inference_mode():
        assert sqnr_db(trained_tiny(images), qmodel(images)) >= 20.0
    base = evaluate(trained_tiny, fmnist, FAST_EVAL, name="baseline")
    after = evaluate(qmodel, fmnist, FAST_EVAL, baseline=base, name=method)
    assert base.accuracy_top1 > 75.0  # the float model really learned something
    assert after.accuracy_drop["points"] <= 1.0
    assert after.macs == base.macs > 0  # INT8 MACs are counted, never 0
    assert after.memory_access_bytes < 0.35 * base.memory_access_bytes


def test_int8_kernels_really_run(int8_tiny, fmnist):
    with torch.inference_mode():
        int8_tiny(fmnist.example_input(1))
    assert int8_tiny.int8_kernels and int8_tiny.int8_kernels >= 4  # 3 conv + 1 linear lowered
    assert not int8_tiny.notes


def test_any_batch_size_matches_reference(int8_tiny, fmnist):
    images = fmnist.example_input(37)  # padded to the 64 bucket, sliced back
    with torch.inference_mode():
        out = int8_tiny(images)
        ref = int8_tiny.reference_module(images)
    assert out.shape == (37, 10)
    assert sqnr_db(ref, out) >= 30.0


def test_save_load_identical_outputs(int8_tiny, fmnist, tmp_path):
    folder = save(int8_tiny, tmp_path / "int8")
    loaded = load(folder)
    images = fmnist.example_input(8)
    with torch.inference_mode():
        assert torch.equal(int8_tiny.reference_module(images), loaded.reference_module(images))
        assert torch.equal(int8_tiny(images), loaded(images))
    assert loaded.param_counts == int8_tiny.param_counts


def test_int8_artifact_of_resnet18_is_under_0_3x(synthetic, tmp_path):
    from compress.models import build_model
    from compress.recipe import ModelConfig

    model = build_model(ModelConfig(name="resnet18"), num_classes=10, in_channels=1).eval()
    qmodel = quantize(model, synthetic, method="int8_static", calibration_batches=1)
    float_bytes = sum(f.stat().st_size for f in save(model, tmp_path / "f").iterdir())
    int8_bytes = sum(f.stat().st_size for f in save(qmodel, tmp_path / "q").iterdir())
    assert int8_bytes <= 0.3 * float_bytes  # no float copy of the weights left in the archive


def test_skip_keeps_layers_in_float(trained_tiny, fmnist):
    qmodel = quantize(
        trained_tiny, fmnist, method="int8_static", calibration_batches=1, skip=["re:0|4"]
    )
    graph = qmodel.reference_module.graph
    per_channel = [n for n in graph.nodes if "dequantize_per_channel" in str(n.target)]
    assert len(per_channel) == 2  # 4 weighted layers, 2 kept in float
    assert any("kept in float: 0, 4" in note for note in qmodel.notes)
    with pytest.raises(QuantizationError, match="did you mean '4'"):
        quantize(trained_tiny, fmnist, method="int8_static", skip=["44"])


class _Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)

    def forward(self, x):
        if x.sum().item() > 0:  # data-dependent control flow: export cannot trace it
            return self.conv(x).mean((2, 3))
        return -self.conv(x).mean((2, 3))


def test_untraceable_model_is_a_clear_error(fmnist):
    with pytest.raises(QuantizationError) as info:
        quantize(_Untraceable().eval(), fmnist, method="int8_static", calibration_batches=1)
    message = str(info.value)
    assert message.startswith("torch.export could not trace _Untraceable")
    assert "\n" not in message
