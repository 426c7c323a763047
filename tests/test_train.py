"""The shared training loop: seeded, checkpointed atomically, resumable, loud on NaN."""

import pytest
import torch
from torch import nn

from compress.core.registry import StageContext
from compress.data import build_data
from compress.models.build import build_model
from compress.spec.recipe import DataConfig, ModelConfig, TrainConfig
from compress.training.augment import augment
from compress.training.schedule import cooldown_config
from compress.training.train import TrainingError, train

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


def test_best_checkpoint_is_kept_and_can_be_the_result(small, tmp_path):
    config = TrainConfig(epochs=3, lr=0.05, use_best=True)
    model = train(_fresh(), small, config, seed=2, checkpoint_dir=tmp_path)
    last = torch.load(tmp_path / "last.pt", weights_only=True)
    best = torch.load(tmp_path / "best.pt", weights_only=True)
    assert last["epoch"] == 2 and 0 <= last["best"]["epoch"] <= 2
    # use_best: the returned weights are the best epoch's, and they validate at its score.
    assert all(torch.equal(v, best[k]) for k, v in model.state_dict().items())
    from compress.measure.scores import metrics

    top1 = metrics(model, small, split="calibration")["top-1"]
    assert top1 == pytest.approx(last["best"]["score"])


def test_a_stage_context_gives_each_training_its_own_checkpoint_folder(small, tmp_path):
    context = StageContext(device="cpu", seed=5, checkpoints=tmp_path)
    train(_fresh(), small, TrainConfig(epochs=1), desc="fine-tune 1/2", context=context)
    train(_fresh(), small, TrainConfig(epochs=1), desc="QAT", context=context)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["01-fine-tune-1-2", "02-qat"]
    assert (tmp_path / "02-qat" / "last.pt").is_file()
    # Without a context nothing is written.
    train(_fresh(), small, TrainConfig(epochs=1))
    assert len(list(tmp_path.iterdir())) == 2


def test_accumulated_micro_batches_equal_one_larger_batch():
    """train.accumulate: 2 micro-batches of 32 step like one batch of 64 (an MLP: no batch
    statistics, so the two are the same arithmetic up to float rounding)."""
    from compress.models.build import mlp

    weights = []
    for batch, accumulate in ((64, 1), (32, 2)):
        data = build_data(
            DataConfig(train_subset=512, test_subset=100, calibration_size=100, batch_size=batch),
            seed=0,
        )
        torch.manual_seed(0)
        model = mlp(hidden=32)
        config = TrainConfig(epochs=2, lr=0.05, validate=False, accumulate=accumulate)
        weights.append(_weights(train(model, data, config, seed=0)))
    for x, y in zip(*weights, strict=True):
        assert torch.allclose(x, y, atol=1e-5), (x - y).abs().max()
    torch.manual_seed(0)
    other = mlp(hidden=32)  # and the figure could fail: other weights are far off
    assert not torch.allclose(_weights(other)[0], weights[0][0], atol=1e-3)


@pytest.mark.parametrize(
    ("schedule", "expected"),
    [
        # (learning rate at 0 %, 25 %, 60 %, 80 % and 100 % of 100 steps) / train.lr
        ("onecycle", lambda r: r[1] == pytest.approx(1.0, abs=0.01) and r[0] < 0.1 and r[4] < 1e-3),
        (
            "cosine",
            lambda r: r[0] == 1.0 and r[2] == pytest.approx(0.3455, abs=1e-3) and r[4] < 1e-3,
        ),
        (
            "step",
            lambda r: r[1] == 1.0 and r[2] == pytest.approx(0.1) and r[3] == pytest.approx(0.01),
        ),
        ("constant", lambda r: r == [1.0] * 5),
    ],
)
def test_each_schedule_shapes_the_learning_rate_as_documented(schedule, expected):
    from compress.training.schedule import optimizer_for, scheduler_for

    config = TrainConfig(lr=0.2, schedule=schedule)
    optimizer = optimizer_for(nn.Linear(2, 2), config)
    scheduler = scheduler_for(optimizer, config, total_steps=100)
    rates = []
    for step in range(101):
        if step in (0, 25, 60, 80, 100):
            rates.append(optimizer.param_groups[0]["lr"] / config.lr)
        if step < 100:
            optimizer.step()
            scheduler.step()
    assert expected(rates), rates


def test_label_smoothing_and_grad_clip_change_the_step_as_configured(small):
    """Smoothing raises the loss of a confident, correct model; a tight clip shrinks the
    first update to the clip's norm."""
    results = {}
    for name, options in {
        "plain": {},
        "smooth": {"label_smoothing": 0.2},
        "clip": {"grad_clip": 1e-3},
    }.items():
        model = _fresh()
        before = [p.detach().clone() for p in model.parameters()]
        config = TrainConfig(
            epochs=0,
            max_steps=1,
            lr=0.1,
            momentum=0.0,
            weight_decay=0.0,
            schedule="constant",
            validate=False,
            **options,
        )
        train(model, small, config, seed=0)
        results[name] = torch.cat(
            [(p.detach() - b).flatten() for p, b in zip(model.parameters(), before, strict=True)]
        )
    # One SGD step without momentum moves the weights by lr x the (clipped) gradient.
    assert results["clip"].norm().item() == pytest.approx(0.1 * 1e-3, rel=1e-3)
    assert results["plain"].norm() > 10 * results["clip"].norm()
    assert not torch.allclose(
        results["smooth"], results["plain"]
    )  # a different target, a different step


@pytest.mark.parametrize("kind", ["flip", "crop", "crop_flip"])
def test_augment_moves_each_image_by_its_own_draw(kind):
    images = torch.rand(64, 2, 9, 7)
    out = augment(images, kind, padding=2, generator=torch.Generator().manual_seed(0))
    again = augment(images, kind, padding=2, generator=torch.Generator().manual_seed(0))
    assert out.shape == images.shape and torch.equal(out, again)  # seeded: resumable
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2), mode="replicate")
    moves = set()
    for i in range(len(images)):
        # Each output is one window of the padded image, flipped or not (both channels alike).
        found = [
            (dy, dx, flip)
            for dy in range(5 if "crop" in kind else 1)
            for dx in range(5 if "crop" in kind else 1)
            for flip in ((False, True) if "flip" in kind else (False,))
            if torch.equal(
                _window(padded[i] if "crop" in kind else images[i], dy, dx, 9, 7, flip), out[i]
            )
        ]
        assert found, f"image {i} is no window of its padded original"
        moves.add(found[0])
    assert len(moves) >= (2 if kind == "flip" else 5)  # drawn per image, not once per batch
    assert torch.equal(augment(images, "none"), images)


def _window(image, dy, dx, height, width, flip):
    window = image[:, dy : dy + height, dx : dx + width]
    return window.flip(2) if flip else window


def test_erase_blanks_one_rectangle_in_about_half_the_images():
    images = torch.rand(400, 2, 28, 28) + 1  # no pixel is 0 before erasing
    out = augment(images, "erase", generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, augment(images, "erase", generator=torch.Generator().manual_seed(0)))
    erased = out == 0
    assert torch.equal(erased[:, 0], erased[:, 1])  # every channel alike
    assert torch.equal(out[~erased], images[~erased])  # the rest untouched
    hit = erased[:, 0].flatten(1).any(1)
    assert 0.4 < hit.float().mean() < 0.6
    for mask in erased[hit, 0]:
        rows, columns = mask.any(1).nonzero(), mask.any(0).nonzero()
        height, width = len(rows), len(columns)
        assert mask.sum() == height * width  # one solid rectangle
        assert rows.max() - rows.min() + 1 == height and columns.max() - columns.min() + 1 == width
        assert 0.01 * 784 <= height * width <= 0.34 * 784


def test_a_cooldown_is_a_clean_second_phase_that_resumes(small, tmp_path):
    config = TrainConfig(
        epochs=1, lr=0.05, augment="crop_flip", label_smoothing=0.1, cooldown_epochs=1
    )
    context = StageContext(device="cpu", seed=2)
    whole = _weights(train(_fresh(), small, config, context=context, checkpoint_dir=tmp_path))
    phases = [entry["config"] for entry in context.budget]
    assert [p["augment"] for p in phases] == ["crop_flip", "none"]
    assert [p["label_smoothing"] for p in phases] == [0.1, 0.0]
    assert [(p["schedule"], p["lr"]) for p in phases] == [("onecycle", 0.05), ("cosine", 0.02)]
    # The same as the schedule alone, then its cooldown_config alone.
    first = train(_fresh(), small, TrainConfig(**{**phases[0], "cooldown_epochs": 0}), seed=2)
    two_calls = _weights(train(first, small, cooldown_config(config), seed=2))
    assert all(torch.equal(x, y) for x, y in zip(whole, two_calls, strict=True))
    # Called again on its checkpoints, both phases are found finished: nothing changes.
    again = _weights(train(_fresh(), small, config, seed=2, checkpoint_dir=tmp_path))
    assert all(torch.equal(x, y) for x, y in zip(whole, again, strict=True))
    assert cooldown_config(TrainConfig(epochs=3)) is None


def test_max_steps_bounds_the_schedule_and_its_cooldown_together(small):
    """A quick run (max_steps) stays quick on a recipe with a cooldown."""
    steps_per_epoch = len(small.loader("train", shuffle=True, seed=0))
    context = StageContext(device="cpu", seed=0)
    config = TrainConfig(epochs=1, max_steps=steps_per_epoch + 2, cooldown_epochs=3)
    train(_fresh(), small, config, context=context)
    assert [entry["steps"] for entry in context.budget] == [steps_per_epoch, 2]
    # With epochs 0 the schedule takes every step: no cooldown, whatever its epochs.
    context = StageContext(device="cpu", seed=0)
    train(_fresh(), small, TrainConfig(epochs=0, max_steps=3, cooldown_epochs=3), context=context)
    assert [entry["steps"] for entry in context.budget] == [3]
    assert cooldown_config(TrainConfig(epochs=0, max_steps=3, cooldown_epochs=3)) is None


def test_a_last_batch_of_one_image_is_left_out_of_training():
    """129 images in batches of 128 would end in a batch of one, which ResNet-18's last
    BatchNorm (1x1 at 28x28) cannot normalise in training: it raised ValueError before."""
    data = build_data(
        DataConfig(train_subset=129, test_subset=10, calibration_size=100, batch_size=128), seed=0
    )
    assert [len(labels) for _, labels in data.loader("train", shuffle=True)] == [128]
    assert [len(labels) for _, labels in data.loader("train")] == [128, 1]  # evaluation: all
    model = build_model("resnet18", data=data)
    before = model.layer4[1].bn2.running_mean.clone()
    train(model, data, TrainConfig(epochs=1, validate=False), seed=0)
    assert not torch.equal(before, model.layer4[1].bn2.running_mean)  # it trained one step
