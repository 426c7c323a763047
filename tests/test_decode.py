"""Compressing a GPT so that it still decodes: step by step with a key/value cache (in
every runtime), the weight-only INT8/INT4 kernels and torchao's per-token INT8 that run its
Linear layers in both forward and decode, structured pruning that removes whole heads, and
a speed check that a language model passes by its decoding."""

import copy
import itertools
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from compress.core.errors import RecipeError
from compress.core.registry import StageContext
from compress.measure import decode
from compress.measure.counts import count_flops, sqnr_db
from compress.measure.decode import (
    decoding_step,
    empty_cache,
    has_decoder,
    measure_decode,
    tokens_per_second,
)
from compress.measure.deploy import export
from compress.measure.runtimes import OnnxRuntimeModel, OpenVinoModel
from compress.models.artifact import load, save
from compress.models.build import build_model
from compress.spec.recipe import ModelConfig, parse_stage_options
from compress.stages.prune import prune
from compress.stages.quantize import PerTokenInt8Model, quantize
from compress.stages.quantize._smooth import smooth
from compress.stages.quantize._speed import _decoding
from tests.conftest import TINY_TEXT

# Widths the int4 kernel takes (outputs a multiple of 16, inputs of the group); the head's
# outputs are the vocabulary (84 characters), which it does not.
GPT = {"context": 32, "layers": 2, "heads": 2, "width": 64}


@pytest.fixture(scope="module")
def gpt(tiny_text):
    torch.manual_seed(0)
    return build_model(ModelConfig(name="compress.models:gpt", kwargs=GPT), data=tiny_text).eval()


def _decoded_logits(step, model, ids: torch.Tensor) -> np.ndarray:
    cache, rows = empty_cache(model), []
    for position in range(ids.shape[1]):
        logits, cache = step(ids[:, position : position + 1].numpy(), np.array([position]), cache)
        rows.append(logits[0, 0])
    return np.stack(rows)


@pytest.mark.parametrize(
    ("runtime", "tolerance"),
    [
        ("torch", 1e-4),
        pytest.param("inductor", 1e-4, marks=pytest.mark.slow),  # ahead of time
        pytest.param("onnxruntime", 1e-4, marks=pytest.mark.slow),
        # OpenVINO runs float models in bf16 where the CPU has it (AVX-512 BF16, AMX).
        pytest.param("openvino", 0.1, marks=pytest.mark.slow),
    ],
)
def test_the_decoding_step_gives_the_forward_passs_logits(
    runtime, tolerance, gpt, tiny_text, tmp_path
):
    if runtime in ("onnxruntime", "openvino"):
        pytest.importorskip(runtime)
    ids = tiny_text.example_input(1)[:, :12]
    expected = gpt(ids)[0].detach().numpy()
    notes: list[str] = []
    step = decoding_step(gpt, runtime, threads=1, folder=tmp_path, notes=notes)
    assert np.abs(_decoded_logits(step, gpt, ids) - expected).max() < tolerance
    assert notes == []  # inductor's step compiled ahead of time, not through torch.compile
    # A timed decoding returns a rate, over positions the cache holds.
    assert tokens_per_second(step, empty_cache(gpt), prompt=20, new_tokens=4) > 0


@pytest.mark.parametrize(
    ("method", "options", "kernel", "min_sqnr", "max_size"),
    [
        ("int8_weight_only", {}, "aten._weight_int8pack_mm", 35.0, 0.4),  # 0.35: float embeddings
        ("int4_weight_only", {"group_size": 32}, "aten._weight_int4pack_mm_for_cpu", 15.0, 0.3),
    ],
)
def test_weight_only_kernels_run_forward_and_decode_and_save_narrow(
    method, options, kernel, min_sqnr, max_size, gpt, tiny_text, tmp_path
):
    quantized = quantize(gpt, tiny_text, method=method, **options)
    kernels = [m for m in quantized.modules() if type(m).__name__ == "_PackedLinear"]
    int4 = method == "int4_weight_only"
    # Every block's q, k, v, out and two MLP layers; the head's 84 outputs only in INT8.
    assert len(kernels) == 2 * 6 + (not int4)
    assert f"run in {kernel}" in quantized.notes[0] and ("head" in quantized.notes[0]) != int4
    if int4:  # the int4 kernel's outputs are a multiple of 16: dequantized, and said so
        assert quantized.notes[2].endswith("(no kernel for their shape): head")
    ids = tiny_text.example_input(4)
    with torch.inference_mode():
        logits = quantized(ids)
        assert sqnr_db(gpt(ids), logits) >= min_sqnr
    assert has_decoder(quantized)
    step = decoding_step(quantized, "torch", threads=1, folder=tmp_path)
    decoded = _decoded_logits(step, quantized, ids[:1, :8])
    assert np.abs(decoded - logits[0, :8].numpy()).max() < 1e-4  # the same kernels
    # Saved as codes, loaded into the same kernels: the same logits, a fraction of the size.
    folder = save(quantized, tmp_path / method, tiny_text.example_input(2))
    loaded = load(folder)
    with torch.inference_mode():
        assert torch.equal(loaded(ids), logits)
    float_folder = save(gpt, tmp_path / "float", tiny_text.example_input(2))
    size = sum(f.stat().st_size for f in folder.iterdir())
    assert size <= max_size * sum(f.stat().st_size for f in float_folder.iterdir())


def test_structured_pruning_removes_whole_heads_and_mlp_channels(tiny_text, tmp_path):
    torch.manual_seed(0)
    six = {**GPT, "heads": 6, "width": 96}  # heads 16 wide
    model = build_model(ModelConfig(name="compress.models:gpt", kwargs=six), data=tiny_text).eval()
    config = parse_stage_options("prune", {"method": "structured", "ratio": 0.3, "round_to": 16})
    pruned = prune(model, tiny_text, config, context=StageContext(baseline=model))
    for block in pruned.blocks:
        attention = block.attention
        assert attention.heads == 4  # 2 of 6 heads: whole ones, 16 wide each
        assert attention.query.out_features == attention.key.out_features == 4 * 16
        assert attention.out.in_features == 4 * 16
        hidden = block.mlp[0].out_features
        assert hidden <= 0.7 * 4 * 96 and hidden % 16 == 0  # MLP channels, kernel-friendly
    assert pruned.tokens.embedding_dim == 96 == pruned.head.in_features  # the width stays
    # Saved with its head counts, loaded and decoded as it runs.
    loaded = load(save(pruned, tmp_path / "pruned", tiny_text.example_input(2)))
    ids = tiny_text.example_input(2)
    with torch.inference_mode():
        assert torch.equal(loaded(ids), pruned(ids))
    step = decoding_step(loaded, "torch", threads=1, folder=tmp_path)
    with torch.inference_mode():
        expected = loaded(ids[:1, :6])[0].numpy()
    assert np.abs(_decoded_logits(step, loaded, ids[:1, :6]) - expected).max() < 1e-4


def test_a_macs_search_removes_heads_gradually_and_keeps_one(tiny_text):
    # torch-pruning removes ceil(ratio x heads left) at each of the search's 50 steps: a head
    # a step, until none was left (a ZeroDivisionError in the model's forward).
    torch.manual_seed(0)
    six = {**GPT, "heads": 6, "width": 96}
    model = build_model(ModelConfig(name="compress.models:gpt", kwargs=six), data=tiny_text).eval()
    options = {"method": "structured", "target_macs": 0.6, "round_to": 16}
    config = parse_stage_options("prune", options)
    pruned = prune(model, tiny_text, config, context=StageContext(baseline=model))
    assert 0.55 <= pruned.stage_details["macs_ratio"] <= 0.6
    for block in pruned.blocks:
        assert 1 <= block.attention.heads < 6
        assert block.attention.query.out_features == block.attention.heads * 16
    with torch.inference_mode():
        assert pruned(tiny_text.example_input(2)).shape[-1] == model.head.out_features


def _influence_by_hand(model, block, data) -> float:
    """1 minus the mean cosine of ``block``'s output to its input over every token of the
    first 4 calibration batches."""
    cosines = []
    handle = block.register_forward_hook(
        lambda _, inputs, output: cosines.append(
            torch.nn.functional.cosine_similarity(inputs[0], output, dim=-1).flatten()
        )
    )
    with torch.no_grad():
        for ids, _ in itertools.islice(data.loader("calibration"), 4):
            model(ids)
    handle.remove()
    return 1.0 - torch.cat(cosines).mean().item()


def test_depth_pruning_removes_the_least_influential_whole_blocks(tiny_text, tmp_path):
    torch.manual_seed(0)
    four = {**GPT, "layers": 4}
    model = build_model(ModelConfig(name="compress.models:gpt", kwargs=four), data=tiny_text)
    model.eval()
    with torch.no_grad():  # unequal blocks, so that the ranking is not a tie
        for i, block in enumerate(model.blocks):
            block.mlp[2].weight.mul_(1 + 3 * (i % 2))
    config = parse_stage_options("prune", {"method": "structured", "layers": 2, "ratio": 0.0})
    pruned = prune(model, tiny_text, config, context=StageContext(baseline=model))
    depth = pruned.stage_details["depth"]
    influence, removed = depth["influence"], depth["removed"]
    kept = [i for i in range(4) if i not in removed]
    assert len(pruned.blocks) == 2 and len(removed) == 2 and depth["stack"] == "blocks"
    assert max(influence[i] for i in removed) < min(influence[i] for i in kept)
    for i in (0, 3):
        assert influence[i] == pytest.approx(
            _influence_by_hand(model, model.blocks[i], tiny_text), abs=1e-4
        )
    for block, i in zip(pruned.blocks, kept, strict=True):  # whole blocks, as they were
        assert torch.equal(block.mlp[2].weight, model.blocks[i].mlp[2].weight)
    assert "2 of the 4 blocks in blocks removed" in pruned.notes[0]
    # Saved as its length, loaded and decoded as it runs; with width pruning on top.
    ids = tiny_text.example_input(2)
    loaded = load(save(pruned, tmp_path / "shallow", ids))
    with torch.inference_mode():
        assert len(loaded.blocks) == 2 and torch.equal(loaded(ids), pruned(ids))
        expected = loaded(ids[:1, :6])[0].numpy()
    step = decoding_step(loaded, "torch", threads=1, folder=tmp_path)
    assert np.abs(_decoded_logits(step, loaded, ids[:1, :6]) - expected).max() < 1e-4
    both = parse_stage_options("prune", {"method": "structured", "layers": 1, "ratio": 0.5})
    narrow = prune(model, tiny_text, both, context=StageContext(baseline=model))
    assert len(narrow.blocks) == 3 and narrow.blocks[0].attention.heads == 1
    again = load(save(narrow, tmp_path / "narrow", ids))
    with torch.inference_mode():
        assert torch.equal(again(ids), narrow(ids))
    # Quantized per token, it saves its shapes and depth too, and loads exactly.
    int8 = quantize(narrow, tiny_text, method="int8_dynamic", goal="size")
    loaded_int8 = load(save(int8, tmp_path / "narrow_int8", ids))
    with torch.inference_mode():
        assert len(loaded_int8.inner.blocks) == 3
        assert torch.equal(loaded_int8.reference_module(ids), int8.reference_module(ids))


def test_depth_pruning_says_what_it_cannot_remove(gpt, tiny_text):
    with pytest.raises(
        RecipeError,
        match=r"prune.layers: 2 is not fewer than the 2 blocks of blocks \(allowed: 0 to 1\)",
    ):
        prune(gpt, tiny_text, method="structured", layers=2, ratio=0.0)
    flat = torch.nn.Sequential(torch.nn.Embedding(84, 8), torch.nn.Linear(8, 84))
    with pytest.raises(RecipeError, match="no stack of blocks that keep their input's shape"):
        prune(flat, tiny_text, method="structured", layers=1, ratio=0.0)


def test_int8_dynamic_on_a_gpt_is_per_token_and_its_decoding_runs_int8(gpt, tiny_text, tmp_path):
    quantized = quantize(gpt, tiny_text, method="int8_dynamic", goal="size")
    assert isinstance(quantized, PerTokenInt8Model) and "per-token" in quantized.compute_dtype
    ids = tiny_text.example_input(4)
    eager = quantized.reference_module  # the INT8 layers as they are, uncompiled
    with torch.inference_mode():
        logits = eager(ids)
        assert sqnr_db(gpt(ids), logits) >= 25.0
    weights = [m.weight for m in eager.modules() if isinstance(m, torch.nn.Linear)]
    assert all(type(w).__name__ == "Int8Tensor" for w in weights) and len(weights) == 13
    # Each token is quantized on its own: decoding one at a time gives the same logits but
    # for an activation's rounding flipped by float noise (the masked attention's).
    step = decoding_step(quantized, "torch", threads=1, folder=tmp_path)
    decoded = _decoded_logits(step, quantized, ids[:1, :8])
    assert np.abs(decoded[0] - logits[0, 0].numpy()).max() < 1e-5  # the first: exact
    assert np.abs(decoded - logits[0, :8].numpy()).max() < 0.05
    # Compiled ahead of time by inductor (torchao's INT8 layers exported as they are): the
    # same logits but for roundings flipped by float noise, as above.
    notes: list[str] = []
    step = decoding_step(quantized, "inductor", 1, tmp_path / "inductor", notes=notes)
    assert (
        notes == [] and np.abs(_decoded_logits(step, quantized, ids[:1, :8]) - decoded).max() < 0.05
    )
    # Counted as the float model's MACs (int8 matmuls included), saved as codes, loaded exact.
    assert count_flops(eager, ids[:1]) == count_flops(gpt, ids[:1])
    loaded = load(save(quantized, tmp_path / "int8", tiny_text.example_input(2)))
    with torch.inference_mode():
        assert torch.equal(loaded.reference_module(ids), logits)
    # Exported as its int8 codes, one per weight, which each runtime's own dynamic INT8
    # runs: the same logits but for activations rounded per block there.
    exported = export(quantized, tmp_path / "int8.onnx", "onnx", tiny_text.example_input(1))
    runtime = OnnxRuntimeModel(exported, 1)
    assert runtime.precision == "float32 (int8 weights)"
    assert sqnr_db(logits, runtime(ids)) >= 30.0
    step = decoding_step(quantized, "openvino", threads=1, folder=tmp_path / "openvino")
    decoded = torch.from_numpy(_decoded_logits(step, quantized, ids[:1, :8]))
    assert sqnr_db(logits[:1, :8], decoded) >= 25.0


def test_per_token_int8_with_its_fallback_leaves_inductors_lowering_alone():
    # torchao's x86 quantizer registers inductor patterns for the whole process when it is
    # imported; one lowers per-token INT8 to oneDNN's qlinear, 3x slower at decoding. The
    # accuracy-aware fallback of a per-token model must not import it (a fresh process:
    # this one has it already).
    code = (
        "import sys, torch\n"
        "from compress.data import build_data\n"
        "from compress.models.build import build_model\n"
        "from compress.spec.recipe import ModelConfig\n"
        "from compress.stages.quantize import PerTokenInt8Model, quantize\n"
        f"data = build_data({TINY_TEXT!r})\n"
        f"kwargs = {GPT!r}\n"
        "model = build_model(ModelConfig(name='compress.models:gpt', kwargs=kwargs), data=data)\n"
        "q = quantize(model.eval(), data, method='int8_dynamic', goal='size', max_accuracy_drop=0.5)\n"
        "assert isinstance(q, PerTokenInt8Model), type(q)\n"
        "assert 'fallback' in ' '.join(q.notes)\n"
        "name = 'torchao.quantization.pt2e.quantizer.x86_inductor_quantizer'\n"
        "print(name in sys.modules)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "False"


ROUNDS = {"x": 1.2, "interval": [1.1, 1.4], "rounds": 10}


def test_the_speed_check_of_a_model_that_decodes_is_its_decoding():
    def timed(runtime, rate):
        return SimpleNamespace(best_decode=lambda: (runtime, rate), decode_ratio=None)

    faster, check, said = _decoding(timed("openvino", 500.0), timed("inductor", 650.0), "m")
    assert faster and check["decode_x"] == pytest.approx(1.3) and check["kept"] == "int8"
    assert "1.30x its input's decoding tokens/s (m in inductor against float in openvino" in said
    slower = _decoding(timed("openvino", 500.0), timed("inductor", 400.0), "m")
    assert slower is not None and not slower[0] and slower[1]["kept"] == "float"
    untimed = SimpleNamespace(best_decode=lambda: None, decode_ratio=None)  # its latency decides
    paired = SimpleNamespace(best_decode=lambda: ("inductor", 1.0), decode_ratio=ROUNDS)
    faster, check, said = _decoding(timed("openvino", 2.0), paired, "m")  # the rounds decide
    assert faster and check["interval"] == [1.1, 1.4] and "1.20x [1.10, 1.40]" in said
    assert _decoding(untimed, timed("inductor", 1.0), "m") is None


@pytest.mark.parametrize("default", ["bf16", "f32"])
def test_openvino_decodes_in_its_default_precision_and_f32_and_the_faster_is_kept(
    gpt, monkeypatch, default
):
    def step_in(model, runtime, threads, folder, precision=None, notes=None):
        pause = 0.0 if precision == "f32" else 0.002  # f32 the faster, as on this CPU
        made.append((runtime, precision))

        def step(ids, position, cache):
            if not timeline or timeline[-1] != (runtime, precision):
                timeline.append((runtime, precision))
            time.sleep(pause)
            return np.zeros((1, 1, 84), dtype=np.float32), cache

        return step

    made: list = []
    timeline: list = []  # which step ran, a run of calls to one step as one entry
    monkeypatch.setattr(decode, "decoding_step", step_in)
    monkeypatch.setattr(decode, "openvino_default_precision", lambda: default)
    monkeypatch.setattr(decode, "ROUND_WARMUP_S", 0.0)
    notes: list[str] = []
    rates, fastest = measure_decode(gpt, ["onnxruntime", "openvino"], 1, 8, notes)
    assert set(rates) == {"onnxruntime", "openvino"} and fastest is not None
    if default == "f32":  # one precision: nothing to choose
        assert made == [("onnxruntime", None), ("openvino", None)] and notes == []
        return
    assert made == [("onnxruntime", None), ("openvino", None), ("openvino", "f32")]
    # Every runtime and precision in each of the 3 rounds, every other round reversed: a
    # drift of the machine's speed weighs on them alike (round ends merge into one entry).
    assert timeline == made + made[::-1][1:] + made[1:]
    assert rates["openvino"] > 2 * rates["onnxruntime"]  # f32's rate, not the default's
    assert fastest.rate() > 2 * rates["onnxruntime"]  # and its step, for the paired ratio
    assert len(notes) == 1 and "OpenVINO decodes faster in f32 than in its default bf16" in notes[0]


def _input_peaks(model, data, layer: str, batches: int) -> torch.Tensor:
    peaks = []
    hook = model.get_submodule(layer).register_forward_pre_hook(
        lambda m, args: peaks.append(args[0].abs().reshape(-1, args[0].shape[-1]).amax(0))
    )
    with torch.no_grad():
        for _, (inputs, _targets) in zip(range(batches), data.loader("calibration"), strict=False):
            model(inputs)
    hook.remove()
    return torch.stack(peaks).amax(0)


def test_smoothquant_moves_an_outlier_channel_into_the_weights(gpt, tiny_text):
    outlier = copy.deepcopy(gpt)
    with torch.no_grad():  # one channel 40x the others' range, as in large transformers
        for block in outlier.blocks:
            block.norm1.weight[5] *= 40.0
    smoothed, note = smooth(outlier, tiny_text, alpha=0.5, batches=2)
    assert note.startswith("smoothquant (α = 0.5): 9 Linear layers behind 5 norms smoothed")
    ids = tiny_text.example_input(4)
    with torch.no_grad():
        assert torch.allclose(smoothed(ids), outlier(ids), atol=1e-4)
    # s_j = max|X_j|^α / max|W_:,j|^(1-α), the weight's maximum over q, k and v together.
    peaks = _input_peaks(outlier, tiny_text, "blocks.0.attention.query", 2)
    attention = outlier.blocks[0].attention
    weights = torch.stack(
        [m.weight.abs().amax(0) for m in (attention.query, attention.key, attention.value)]
    )
    factor = peaks.sqrt() / weights.amax(0).sqrt()
    expected = attention.query.weight * factor
    assert torch.allclose(smoothed.blocks[0].attention.query.weight, expected, rtol=1e-5)
    after = _input_peaks(smoothed, tiny_text, "blocks.0.attention.query", 2)
    assert after.max() / after.median() < 0.5 * (peaks.max() / peaks.median())
    # Per-tensor static INT8 of the activations keeps more of the logits once smoothed.
    options = {"method": "int8_static", "goal": "size", "calibration_batches": 2}
    plain = quantize(outlier, tiny_text, **options)
    with_smoothing = quantize(outlier, tiny_text, **options, smoothquant=0.5)
    assert any(n.startswith("smoothquant") for n in with_smoothing.notes)
    with torch.no_grad():
        reference = outlier(ids)
        assert sqnr_db(reference, with_smoothing(ids)) > sqnr_db(reference, plain(ids)) + 3.0


class _NormTwice(torch.nn.Module):
    """One norm feeds a Linear only; the other's output is also added back (not a Linear's
    input alone), so that dividing it by a factor would change the function."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(84, 16)
        self.clean, self.shared = torch.nn.LayerNorm(16), torch.nn.LayerNorm(16)
        self.first, self.second = torch.nn.Linear(16, 16), torch.nn.Linear(16, 84)

    def forward(self, ids):
        x = self.first(self.clean(self.embed(ids)))
        y = self.shared(x)
        return self.second(y) + y.sum(-1, keepdim=True)


def test_smoothquant_leaves_a_norm_whose_output_goes_elsewhere(tiny_text):
    torch.manual_seed(0)
    model = _NormTwice().eval()
    with torch.no_grad():
        model.clean.weight.uniform_(0.5, 3.0)
        model.shared.weight.uniform_(0.5, 3.0)
    smoothed, note = smooth(model, tiny_text, alpha=0.5, batches=1)
    assert "1 Linear layers behind 1 norms smoothed" in note and note.endswith(": shared")
    assert not torch.equal(smoothed.clean.weight, model.clean.weight)
    assert torch.equal(smoothed.shared.weight, model.shared.weight)
    assert torch.equal(smoothed.second.weight, model.second.weight)
    ids = tiny_text.example_input(2)
    with torch.no_grad():
        assert torch.allclose(smoothed(ids), model(ids), atol=1e-4)


@pytest.mark.parametrize(
    "method, options, max_size",
    [("int4_weight_only", {"group_size": 32}, 0.5), ("int8_weight_only", {}, 0.55)],
)
def test_weight_only_models_export_their_codes_to_both_runtimes(
    method, options, max_size, gpt, tiny_text, tmp_path
):
    import onnx

    quantized = quantize(gpt, tiny_text, method=method, **options)
    ids = tiny_text.example_input(2)
    with torch.inference_mode():
        logits = quantized(ids)
    float_file = export(gpt, tmp_path / "float.onnx", "onnx", tiny_text.example_input(1))
    onnx_file = export(quantized, tmp_path / "codes.onnx", "onnx", tiny_text.example_input(1))
    graph = onnx.load(str(onnx_file)).graph
    dequantized = [n for n in graph.node if n.op_type == "DequantizeLinear"]
    assert len(dequantized) == len(quantized.packed) == 13  # every Linear, the head's too
    float_weights = [i for i in graph.initializer if i.data_type == 1 and len(i.dims) == 2]
    linear_shapes = {(64, 64), (64, 256), (256, 64), (64, 84)}  # as MatMul takes them: K x N
    assert not {tuple(i.dims) for i in float_weights} & linear_shapes  # scales, embeddings
    assert onnx_file.stat().st_size <= max_size * float_file.stat().st_size
    # Each runtime runs the codes in its own weight-only kernel (activations rounded per
    # block there): the logits stay the model's, within that rounding.
    for runtime, stem in (("onnxruntime", "codes.onnx"), ("openvino", "codes.xml")):
        path = onnx_file if runtime == "onnxruntime" else tmp_path / stem
        if runtime == "openvino":
            export(quantized, path, "openvino", tiny_text.example_input(1))
            assert path.with_suffix(".bin").stat().st_size <= max_size * float_file.stat().st_size
        model = (OnnxRuntimeModel if runtime == "onnxruntime" else OpenVinoModel)(path, 1)
        assert f"(int{quantized.bits} weights" in model.precision  # said in the report
        assert sqnr_db(logits, model(ids)) >= 30.0
        step = decoding_step(quantized, runtime, threads=1, folder=tmp_path / runtime)
        assert (
            sqnr_db(logits[:1, :8], torch.from_numpy(_decoded_logits(step, quantized, ids[:1, :8])))
            >= 30.0
        )
    decoder = onnx.load(str(tmp_path / "onnxruntime" / "decoder.onnx")).graph
    assert sum(n.op_type == "DequantizeLinear" for n in decoder.node) == 13
