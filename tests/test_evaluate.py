"""The shared evaluator against hand-computed figures on tiny models."""

import torch
from torch import nn
from torch.utils.data import TensorDataset

from compress.data import Data
from compress.measure.counts import count_flops, count_params
from compress.measure.evaluate import against_baseline, compare_with_input, evaluate
from compress.measure.latency import Latency
from compress.measure.machine import describe_isa, isa
from compress.measure.profile import count_memory_access
from compress.models.artifact import save
from compress.spec.recipe import DataConfig, EvaluateConfig

CONFIG = EvaluateConfig(warmup=2, iterations=30, runtimes=["torch"])


def _tiny():
    # conv: 1->2 channels, 3x3, on 5x5 -> 2x3x3; linear 18 -> 4
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(18, 4)).eval()


def _labelled_data(n=40, classes=4):
    """Images whose pixel (0, 0) holds the label, so that an oracle model is possible."""
    labels = torch.arange(n) % classes
    images = torch.zeros(n, 1, 5, 5)
    images[:, 0, 0, 0] = labels.float()
    dataset = TensorDataset(images, labels)
    return Data(dataset, dataset, dataset, classes, (1, 5, 5), DataConfig(eval_batch_size=16))


class _Oracle(nn.Module):
    """Ranks the true label first (shift=0) or second (shift=1)."""

    def __init__(self, classes=4, shift=0):
        super().__init__()
        self.classes, self.shift = classes, shift
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        label = x[:, 0, 0, 0].long()
        logits = torch.zeros(x.shape[0], self.classes)
        logits[torch.arange(x.shape[0]), label] = 1.0
        logits[torch.arange(x.shape[0]), (label + self.shift) % self.classes] += 2.0 * self.shift
        return logits


def test_params_exact():
    model = _tiny()
    assert count_params(model) == (1 * 2 * 9 + 2 + 18 * 4 + 4, 96)
    with torch.no_grad():
        model[2].weight[0].zero_()
    assert count_params(model) == (96, 96 - 18)


def test_macs_exact_for_conv_and_linear():
    # conv: 18 outputs x 9 MACs each = 162; linear: 18 x 4 = 72 (biases are additions, not MACs)
    flops = count_flops(_tiny(), torch.randn(1, 1, 5, 5))
    assert flops // 2 == 162 + 72
    assert count_flops(_tiny(), torch.randn(3, 1, 5, 5)) == flops  # per image, whatever the batch


def test_macs_exact_for_attention_as_the_cpu_runs_it():
    """nn.MultiheadAttention in eval takes a fused fast path and SDPA a CPU kernel, neither
    of which torch's counter knows: both must still count, so a quantized copy (which leaves
    the fast path) does not look like more MACs than its float model."""
    tokens, width, heads = 17, 32, 4
    attention = torch.nn.MultiheadAttention(width, heads, batch_first=True).eval()

    class SelfAttention(torch.nn.Module):
        def forward(self, x):
            return attention(x, x, x, need_weights=False)[0]

    projections = 4 * tokens * width * width  # q, k, v and out
    scores_and_mix = 2 * tokens * tokens * width  # QK^T and its product with V, all heads
    assert count_flops(SelfAttention(), torch.randn(1, tokens, width)) // 2 == (
        projections + scores_and_mix
    )
    assert torch.backends.mha.get_fastpath_enabled()  # restored for the latency that follows


def test_memory_access_exact():
    # conv reads x (25) + w (18) + b (2), writes 18; flatten is a view (free);
    # linear reads b (4) + x (18) + w (72), writes 4. All float32: 4 bytes each.
    expected = 4 * ((25 + 18 + 2 + 18) + (4 + 18 + 72 + 4))
    assert count_memory_access(_tiny(), torch.randn(1, 1, 5, 5)) == expected
    assert count_memory_access(_tiny(), torch.randn(1, 1, 5, 5), element_bytes=1) == expected // 4


def test_size_is_the_saved_artifacts_bytes(tmp_path):
    from compress.models.build import model_from_spec

    model = model_from_spec(
        {
            "name": "tests.tiny:tiny_cnn",
            "kwargs": {},
            "num_classes": 4,
            "in_channels": 1,
            "weights": None,
        }
    )
    data = _labelled_data()
    folder = save(model, tmp_path / "m", data.example_input(2))  # as a run saves a stage
    on_disk = sum(f.stat().st_size for f in folder.iterdir())
    result = evaluate(model, data, CONFIG, name="m", artifact=folder)
    assert result.size_bytes == on_disk
    assert evaluate(model, data, CONFIG, name="m").size_bytes == on_disk  # measured on a temp copy


def test_latency_percentiles_ordered_and_throughput_consistent():
    result = evaluate(_tiny(), _labelled_data(), CONFIG, name="tiny")
    lat = result.latency_ms
    assert 0 < lat.p50 <= lat.p90 <= lat.p99
    assert result.throughput_per_s == 1e3 * result.batch_size / lat.p50
    assert result.threads >= 1


def test_score_top5_and_drop():
    data = _labelled_data()
    exact = evaluate(_Oracle(), data, CONFIG, name="oracle")
    assert (exact.score, exact.metrics["top-5"], exact.metric) == (100.0, 100.0, "top-1")
    second = evaluate(_Oracle(shift=1), data, CONFIG, baseline=exact, name="second")
    assert second.score == 0.0
    assert second.metrics["top-5"] == 100.0  # 4 classes: the label is always in the top 5
    drop = second.drop
    assert (drop.points, drop.percent) == (100.0, 100.0)
    assert (drop.lost, drop.gained, drop.images) == (40, 0, 40)


def _scaled(latency: Latency, factor: float) -> Latency:
    return Latency(**{k: v * factor for k, v in latency.to_dict().items()})


def test_not_faster_is_said_in_words():
    data = _labelled_data()
    base = evaluate(_tiny(), data, CONFIG, name="baseline")
    slower = evaluate(_tiny(), data, CONFIG, name="same")
    slower.latency_ms = _scaled(base.latency_ms, 2)
    slower.notes.clear()
    against_baseline(slower, base)
    assert any("not faster than the baseline" in n for n in slower.notes)
    step = evaluate(_tiny(), data, CONFIG, name="step")
    step.latency_ms, step.notes = _scaled(base.latency_ms, 1.5), []
    compare_with_input(step, slower)  # a chained step faster than its input: nothing to say
    compare_with_input(step, base)  # one that only trained the same network: nothing either
    assert not step.notes
    step.compute_dtype = "int8"
    compare_with_input(step, base)
    assert any("not faster than its input (baseline)" in n and "1.50x" in n for n in step.notes)
    assert "the MACs 1.00x" in step.notes[-1]
    faster = evaluate(_tiny(), data, CONFIG, name="fast")
    faster.latency_ms = _scaled(base.latency_ms, 0.5)
    faster.notes.clear()
    against_baseline(faster, base)
    assert not faster.notes


def test_the_isa_is_read_from_cpuinfo_and_said_with_amx_or_its_absence():
    xeon = "processor : 0\nflags : fpu avx2 avx512f avx512_vnni avx512_bf16 amx_bf16 amx_int8\n"
    assert isa(xeon) == ["AVX2", "AVX-512", "AVX-512 VNNI", "AVX-512 BF16", "AMX INT8", "AMX BF16"]
    assert describe_isa(isa(xeon)).endswith("AMX BF16")
    epyc = "flags : fpu avx2 avx512f avx512_vnni avx512_bf16\n"
    assert describe_isa(isa(epyc)) == "AVX2, AVX-512, AVX-512 VNNI, AVX-512 BF16; no AMX"
    assert isa("no flags here") == [] and describe_isa([]) == ""
