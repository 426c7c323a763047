"""Tasks (compress.tasks): each task's loss, metric and distillation loss against hand-computed
cases, the paired bootstrap's coverage, errors in words, and segmentation end to end on
real Fashion-MNIST scenes read through the VOC reader."""

import dataclasses
import math

import numpy as np
import pytest
import torch
from PIL import Image
from torch.nn import functional as F
from torch.utils.data import Subset, TensorDataset

import compress
from compress.core.errors import DataError, TaskError
from compress.core.stats import pack_rows, paired_bootstrap, unpack_rows
from compress.data import Data, fashion_mnist_scenes
from compress.data.voc import read_voc
from compress.measure.evaluate import evaluate
from compress.measure.scores import metrics
from compress.models.build import build_model
from compress.spec.recipe import EvaluateConfig
from compress.spec.tasks import IGNORE_INDEX, TASKS, Custom, get_task
from tests.tiny import tiny_segmenter

CLASSIFICATION = get_task("classification")
SEGMENTATION = get_task("segmentation")
FAST = EvaluateConfig(warmup=1, iterations=5, runtimes=["torch"], profile=False)


def test_classification_distillation_loss_matches_hand_computation():
    student = torch.tensor([[1.0, 0.0, -1.0]])
    teacher = torch.tensor([[0.0, 2.0, 0.0]])
    labels = torch.tensor([1])
    t, alpha = 2.0, 0.25

    def softmax(v):
        e = [math.exp(x / t) for x in v]
        return [x / sum(e) for x in e]

    p_s, p_t = softmax([1.0, 0.0, -1.0]), softmax([0.0, 2.0, 0.0])
    kl = sum(pt * (math.log(pt) - math.log(ps)) for pt, ps in zip(p_t, p_s, strict=True))
    ce = -math.log(math.exp(0.0) / sum(math.exp(x) for x in [1.0, 0.0, -1.0]))
    expected = alpha * t * t * kl + (1 - alpha) * ce
    assert CLASSIFICATION.distill_loss(student, teacher, labels, t, alpha).item() == pytest.approx(
        expected, rel=1e-6
    )


def test_classification_distillation_loss_limits():
    logits, labels = torch.randn(8, 5), torch.randint(0, 5, (8,))
    assert CLASSIFICATION.distill_loss(logits, logits, labels, 4.0, 1.0).item() == pytest.approx(
        0.0, abs=1e-6
    )
    ce = torch.nn.functional.cross_entropy(logits, labels)
    assert CLASSIFICATION.distill_loss(
        logits, torch.randn(8, 5), labels, 4.0, 0.0
    ).item() == pytest.approx(ce.item())


def test_segmentation_loss_ignores_the_pixels_marked_255():
    logits = torch.randn(2, 3, 4, 4)
    masks = torch.randint(0, 3, (2, 4, 4))
    masks[0, 0] = IGNORE_INDEX
    kept = masks != IGNORE_INDEX
    picked = logits.permute(0, 2, 3, 1)[kept]  # (pixels, classes)
    expected = F.cross_entropy(picked, masks[kept])
    assert SEGMENTATION.loss(logits, masks).item() == pytest.approx(expected.item(), rel=1e-6)


def test_segmentation_distillation_is_the_per_pixel_kl_over_kept_pixels():
    student, teacher = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    masks = torch.randint(0, 3, (2, 4, 4))
    masks[1] = IGNORE_INDEX  # the second image counts for nothing
    t = 2.0
    p_t = F.softmax(teacher[0] / t, 0)
    kl = (p_t * (F.log_softmax(teacher[0] / t, 0) - F.log_softmax(student[0] / t, 0))).sum(0)
    expected = t * t * kl.mean()
    got = SEGMENTATION.distill_loss(student, teacher, masks, t, 1.0)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)


def test_miou_and_pixel_accuracy_match_a_hand_computed_case():
    # Image 1: truth [[0, 1], [1, 1]], predicted [[0, 1], [0, 1]]; image 2: truth all 2,
    # predicted all 2 but one pixel ignored.
    truth = torch.tensor([[[0, 1], [1, 1]], [[2, 2], [2, IGNORE_INDEX]]])
    predicted = torch.tensor([[[0, 1], [0, 1]], [[2, 2], [2, 0]]])
    logits = F.one_hot(predicted, 3).permute(0, 3, 1, 2).float()
    rows = SEGMENTATION.scores(logits, truth)
    # class 0: I 1, U 2; class 1: I 2, U 3; class 2: I 3, U 3 (the ignored pixel counts for none)
    expected_miou = 100 * (1 / 2 + 2 / 3 + 3 / 3) / 3
    figures = SEGMENTATION.summarize(rows)
    assert figures["mIoU"] == pytest.approx(expected_miou)
    assert figures["pixel accuracy"] == pytest.approx(100 * 6 / 7)
    # a class absent from both truth and prediction does not count
    wider = torch.cat([logits, torch.full((2, 1, 2, 2), -9.0)], 1)
    assert SEGMENTATION.summarize(SEGMENTATION.scores(wider, truth))["mIoU"] == pytest.approx(
        expected_miou
    )


def test_bootstrap_interval_covers_a_known_drop_at_about_its_rate():
    """Two models whose per-example hit rates differ by a known 5 points: over 200 seeded
    draws of 400 examples, the 95 % interval holds the true drop about 95 % of the time."""
    rng = np.random.default_rng(0)
    mean = lambda totals: 100 * totals[:, 0] / totals[:, 1]  # noqa: E731
    covered = 0
    for draw in range(200):
        base = rng.random(400) < 0.80
        worse = base & (rng.random(400) >= 0.0625)  # loses 6.25 % of its hits: 5 points
        rows = lambda hits: np.stack([hits, np.ones_like(hits)], 1).astype(np.float64)  # noqa: E731
        drop = paired_bootstrap(rows(base), rows(worse), mean, seed=draw, resamples=400)
        covered += drop.interval[0] <= 5.0 <= drop.interval[1]
    assert 0.88 <= covered / 200 <= 0.99


def test_bootstrap_of_identical_models_is_zero_and_rows_pack_exactly():
    rows = np.random.default_rng(1).integers(0, 9, (50, 6)).astype(np.int32)
    drop = SEGMENTATION.drop(rows, rows)
    assert drop.points == 0 and drop.interval == (0.0, 0.0) and drop.within_noise
    assert np.array_equal(unpack_rows(pack_rows(rows)), rows)
    with pytest.raises(ValueError, match="not readable"):
        unpack_rows({"shape": [1 << 20, 1 << 20], "dtype": "int32", "data": ""})


@pytest.mark.parametrize("name", sorted(TASKS))
def test_every_task_names_its_metric_and_reads_dict_and_tuple_outputs(name):
    task = get_task(name) if name != "custom" else Custom(metric=lambda o, t: 1.0)
    assert task.metric and task.name == name
    with pytest.raises(TaskError, match=f"task {name}: the model returned str"):
        task.output("not a tensor")
    if name == "detection":  # one dict per image, as torchvision's detectors give
        found = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0), "scores": torch.zeros(0)}]
        assert task.output(found) == found
        return
    tensor = torch.randn(2, 3, 4)  # (N, T, vocabulary) for a language model
    bare = task.output(tensor)  # a language model's puts the vocabulary in dimension 1
    assert torch.equal(task.output({"out": tensor}), bare)
    assert torch.equal(task.output((tensor, None)), bare)


def test_targets_of_the_wrong_shape_or_type_are_named():
    with pytest.raises(TaskError, match=r"task segmentation: expected logits \(N, classes, H, W\)"):
        SEGMENTATION.scores(torch.randn(2, 3), torch.zeros(2, dtype=torch.long))
    with pytest.raises(TaskError, match="masks must be integer class indices"):
        SEGMENTATION.scores(torch.randn(2, 3, 4, 4), torch.zeros(2, 4, 4))
    with pytest.raises(TaskError, match="labels must be integers"):
        CLASSIFICATION.scores(torch.randn(2, 3), torch.zeros(2))
    with pytest.raises(TaskError, match="unknown task 'detect'; known: classification, custom"):
        get_task("detect")


def test_a_custom_metric_that_raises_or_returns_nan_is_one_line():
    def broken(output, targets):
        raise KeyError("boxes")

    with pytest.raises(TaskError, match="the metric 'Dice' raised KeyError"):
        Custom(metric=broken, name="Dice").scores(torch.randn(2, 3), torch.zeros(2))
    with pytest.raises(TaskError, match="returned NaN"):
        Custom(metric=lambda o, t: float("nan")).scores(torch.randn(2, 3), torch.zeros(2))


def test_a_users_model_dataset_and_metric_through_the_python_api():
    """A user's own regression-like metric (lower is better) on their own datasets, paired by
    batches: evaluate gives it, its drop has an interval and says how it was paired."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 1, 8, 8, generator=generator)
    y = x.mean((1, 2, 3))
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 1), torch.nn.Flatten(0))
    mae = Custom(
        loss=F.mse_loss,
        metric=lambda out, target: (out - target).abs().mean().item(),
        name="MAE",
        higher_is_better=False,
    )
    data = Data.of(
        TensorDataset(x[:48], y[:48]), TensorDataset(x[48:], y[48:]), task=mae, eval_batch_size=8
    )
    base = evaluate(model, data, FAST, name="base")
    assert base.metric == "MAE" and base.score == pytest.approx(
        (model(x[:48]) - y[:48]).abs().mean().item(), rel=1e-5
    )
    with torch.no_grad():
        model[1].weight.mul_(3)  # a worse model: its MAE grows, so its drop is positive
    worse = evaluate(model, data, FAST, baseline=base, name="worse")
    assert worse.drop.points > 0 and worse.drop.examples == 6  # six batches of 8
    assert "over test batches" in worse.drop.method
    assert "over test batches" in mae.interval_method


def test_scenes_are_deterministic_and_labelled_by_their_garments(scenes_folder, tmp_path):
    train, test, classes = read_voc(scenes_folder)
    assert (len(train), len(test), classes) == (600, 200, 11)
    image, mask = test[0]
    assert image.shape == (1, 64, 64) and mask.shape == (64, 64)
    # a pixel is labelled a garment exactly where a garment is drawn
    assert torch.equal(mask > 0, image[0] > 32 / 255 + 1e-6)
    counts = {"train": 3, "test": 3}
    again = read_voc(fashion_mnist_scenes(tmp_path / "again", counts=counts))[1]
    first = read_voc(fashion_mnist_scenes(tmp_path / "first", counts=counts))[1]
    assert torch.equal(again[2][1], first[2][1])


def test_the_voc_reader_refuses_what_it_cannot_read(tmp_path):
    with pytest.raises(DataError, match="not in the VOC layout"):
        read_voc(tmp_path)
    lists = tmp_path / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True)
    (lists / "train.txt").write_text("../../etc/passwd\n")
    (lists / "test.txt").write_text("a\n")
    with pytest.raises(DataError, match="is not an image id"):
        read_voc(tmp_path)
    (lists / "train.txt").write_text("a\n")
    for sub in ("JPEGImages", "SegmentationClass"):
        (tmp_path / sub).mkdir()
    Image.new("L", (8, 8)).save(tmp_path / "JPEGImages" / "a.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "SegmentationClass" / "a.png")
    train, _, _ = read_voc(tmp_path, classes=3)
    with pytest.raises(DataError, match="one class index per pixel"):
        train[0]
    # a header announcing a huge image is refused before its pixels are decoded
    Image.new("L", (5000, 1)).save(tmp_path / "JPEGImages" / "a.png")
    with pytest.raises(DataError, match="announces 5000x1 pixels"):
        train[0]


@pytest.mark.slow
def test_segmentation_evaluates_quantizes_exports_and_distills_on_real_scenes(
    tiny_segmenter, scenes
):
    """mIoU from real scenes through every figure: the trained model beats predicting
    background; INT8 keeps it within its bootstrap interval, in ONNX Runtime and OpenVINO
    too (each runtime's mIoU measured on the test scenes); distillation trains a student."""
    assert scenes.task == "segmentation" and scenes.num_classes == 11
    base = evaluate(tiny_segmenter, scenes, FAST, name="baseline")
    background_only = metrics(_Constant(), scenes)["mIoU"]  # every pixel background
    assert base.metric == "mIoU" and base.score > background_only + 10
    assert base.metrics["pixel accuracy"] > 85
    int8 = compress.quantize(
        tiny_segmenter, scenes, method="int8_static", goal="size", calibration_batches=1
    )
    runtimes = dataclasses.replace(FAST, runtimes=["torch", "onnxruntime", "openvino"])
    after = evaluate(int8, scenes, runtimes, baseline=base, name="int8")
    drop = after.drop
    assert drop.method.startswith("paired bootstrap over test examples")
    assert drop.examples == 200
    assert drop.interval[0] <= drop.points <= drop.interval[1]
    assert abs(drop.points) < 3
    for runtime in ("onnxruntime", "openvino"):
        assert abs(after.runtimes[runtime]["score"] - after.score) < 1.0, after.runtimes[runtime]
    student = compress.distill(
        build_model("tests.tiny:tiny_segmenter", data=scenes),
        scenes,
        teacher=tiny_segmenter,
        train={"epochs": 5, "lr": 0.2},
    )
    assert metrics(student, scenes)["mIoU"] > background_only


class _Constant(torch.nn.Module):
    def forward(self, x):
        logits = torch.zeros(x.shape[0], 11, *x.shape[-2:])
        logits[:, 0] = 1.0
        return logits


def _readme_own_data_lines() -> str:
    """The README's Python API lines for the user's own model, Datasets and metric."""
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    start = text.index("# Your own model, Datasets and metric")
    lines = text[start:].splitlines()
    end = next(i for i, line in enumerate(lines) if line.startswith("print("))
    return "\n".join(lines[: end + 1])


@pytest.mark.slow
def test_the_readme_runs_a_users_model_datasets_and_metric_through_prune_and_quantize(
    scenes_folder, capsys
):
    """The README's lines, run as written: a segmenter the user built, their VOC Datasets,
    their Dice metric (no per-example values: paired by batches)."""
    from compress.data.voc import PairTransform

    train, test, _ = read_voc(scenes_folder)
    for split in (train, test):
        split.transform = PairTransform([0.1009], [0.2516], None)

    def dice(output, masks):  # foreground Dice over the batch
        predicted, truth = output.argmax(1) > 0, masks > 0
        return (2 * (predicted & truth).sum() / (predicted.sum() + truth.sum()).clamp(min=1)).item()

    torch.manual_seed(0)
    model = tiny_segmenter()
    data = Data.of(
        Subset(test, range(100)),
        Subset(train, range(100)),
        Subset(train, range(100, 600)),
        "segmentation",
    )
    compress.train(model, data, {"epochs": 6, "lr": 0.2, "validate": False})
    namespace = {
        "compress": compress,
        "my_model": model,
        "my_loss": F.cross_entropy,
        "my_metric": dice,
        "my_test": test,
        "my_calibration": Subset(train, range(100)),
        "my_train": Subset(train, range(100, 600)),
    }
    exec(_readme_own_data_lines(), namespace)  # noqa: S102 - the README's own lines
    mine, printed = namespace["mine"], capsys.readouterr().out
    assert mine.metric == "Dice" and 0.3 < mine.score <= 1.0
    assert "over test batches" in printed and "'examples': 4" in printed  # 200 scenes by 50


def test_a_recipe_names_the_users_data_factory_and_task(tmp_path):
    """data.name and data.task as import paths: the run's figures are in the user's metric,
    paired per example, oriented by lower-is-better."""
    import json

    import yaml

    from tests.conftest import run_cli

    recipe = {
        "name": "own",
        "model": {"name": "tests.tiny:tiny_regressor"},
        "data": {"name": "tests.tiny:brightness_data", "task": "tests.tiny:mae_task"},
        "train": {"epochs": 3},
        "stages": [{"prune": {"method": "magnitude", "sparsity": 0.9}}],
        "evaluate": {"runtimes": ["torch"], "warmup": 1, "iterations": 5, "profile": False},
    }
    path = tmp_path / "own.yaml"
    path.write_text(yaml.safe_dump(recipe))
    result = run_cli("run", str(path), "--out", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    base, pruned = report["evaluations"]
    assert base["metric"] == pruned["metric"] == "MAE" and base["task"] == "custom"
    drop = pruned["drop"]
    assert (
        drop["method"].startswith("paired bootstrap over test examples") and drop["examples"] == 40
    )
    # lower is better: the drop is the MAE's rise
    assert drop["points"] == pytest.approx(pruned["score"] - base["score"])
    bad = run_cli("validate", str(path), "--set", "data.task=keypoints")
    assert bad.returncode == 2 and "data.task: unknown task 'keypoints'" in bad.stderr
