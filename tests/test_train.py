"""The shared training loop: seeded, checkpointed atomically, resumable, loud on NaN."""

import pytest
import torch

from compress.data import build_data
from compress.models import build_model
from compress.recipe import DataConfig, ModelConfig, TrainConfig
from compress.train import TrainingError, train

CONFIG = TrainConfig(epochs=2, lr=0.05)  # onecycle: the scheduler's state must resume too


@pytest.fixture(scope="module")
def small():
    return build_data(
        DataConfig(train_subset=640, test_subset=100, calibration_size=100, batch_size=64), seed=0
    )


def _fresh():
    torch.manual_seed(0)
    return build_model(ModelConfig(name="tests.tiny:tiny_cnn"), num_classes=10, in_channels=1)


def _cross_entropy(model, images, labels):
    logits = model(images)
    return torch.nn.functional.cross_entropy(logits, labels), logits


def _weights(model):
    return [t.clone() for t in model.state_dict().values()]


def test_seeded_runs_are_identical(small):
    a, b = train(_fresh(), small, CONFIG, seed=3), train(_fresh(), small, CONFIG, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(_weights(a), _weights(b), strict=True))


def test_resume_equals_uninterrupted(small, tmp_path):
    whole = _weights(train(_fresh(), small, CONFIG, seed=1, checkpoint_dir=tmp_path / "whole"))
    calls = {"n": 0}

    def crash_in_second_epoch(model, images, labels):
        calls["n"] += 1
        if calls["n"] == 15:  # 10 steps per epoch: dies mid-way through epoch 1
            raise KeyboardInterrupt
        return _cross_entropy(model, images, labels)

    with pytest.raises(KeyboardInterrupt):
        train(
            _fresh(),
            small,
            CONFIG,
            seed=1,
            loss_fn=crash_in_second_epoch,
            checkpoint_dir=tmp_path / "cut",
        )
    assert torch.load(tmp_path / "cut" / "last.pt", weights_only=True)["epoch"] == 0
    resumed = _weights(train(_fresh(), small, CONFIG, seed=1, checkpoint_dir=tmp_path / "cut"))
    assert all(torch.equal(x, y) for x, y in zip(whole, resumed, strict=True))
    assert not list((tmp_path / "cut").glob(".*tmp*"))  # atomic writes leave no temporary files


def test_non_finite_loss_names_step_and_last_checkpoint(small, tmp_path):
    calls = {"n": 0}

    def explode(model, images, labels):
        calls["n"] += 1
        loss, logits = _cross_entropy(model, images, labels)
        return (loss * float("nan") if calls["n"] == 13 else loss), logits

    with pytest.raises(TrainingError) as info:
        train(_fresh(), small, CONFIG, loss_fn=explode, checkpoint_dir=tmp_path)
    message = str(info.value)
    assert "non-finite loss (nan) at epoch 1, step 12" in message
    assert f"last good checkpoint: {tmp_path / 'last.pt'}" in message
