"""The detection task: COCO mAP from pycocotools, its paired interval, torchvision's
detectors built for the data, and a detector trained on real Fashion-MNIST scenes."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from compress.core.errors import PruningError, TaskError
from compress.data import build_data
from compress.measure.evaluate import evaluate
from compress.measure.scores import metrics
from compress.models.build import build_model
from compress.models.detector import DetectorNetwork, SplitDetector, head_outputs
from compress.spec.detection import _Matches
from compress.spec.tasks import get_task
from compress.stages.prune import PruneConfig, prune
from compress.training.train import train

pytest.importorskip("pycocotools")
TASK = get_task("detection")


def _truth(*boxes, label=1):
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32),
        "labels": torch.full((len(boxes),), label),
    }


def _found(boxes, scores, labels):
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "scores": torch.tensor(scores, dtype=torch.float32),
        "labels": torch.tensor(labels),
    }


def test_map_of_a_hand_made_case():
    """Two images with one garment each: found exactly in one, missed in the other. COCO's
    precision is 1 up to recall 0.5 and 0 beyond: 51 of its 101 recall points, at every IoU
    threshold; finding both gives 100."""
    truth = [_truth([10, 10, 30, 40]), _truth([5, 5, 25, 25])]
    one = [_found([[10, 10, 30, 40]], [0.9], [1]), _found([], [], [])]
    both = [_found([[10, 10, 30, 40]], [0.9], [1]), _found([[5, 5, 25, 25]], [0.8], [1])]
    assert TASK.summarize(TASK.scores(one, truth))["mAP"] == pytest.approx(100 * 51 / 101)
    assert TASK.summarize(TASK.scores(both, truth)) == pytest.approx(
        {"mAP": 100.0, "mAP@.5": 100.0, "mAP@.75": 100.0}
    )
    wrong_class = [_found([[10, 10, 30, 40]], [0.9], [2]), _found([[5, 5, 25, 25]], [0.8], [1])]
    assert TASK.summarize(TASK.scores(wrong_class, truth))["mAP"] == pytest.approx(100 * 51 / 101)
    # A half-overlapping box (IoU 1/3) misses at every threshold; ranked first, it halves
    # the precision at which the other garment is found: 0.5 up to recall 0.5.
    loose = [_found([[20, 10, 40, 40]], [0.9], [1]), _found([[5, 5, 25, 25]], [0.8], [1])]
    assert TASK.summarize(TASK.scores(loose, truth))["mAP"] == pytest.approx(50 * 51 / 101)


def _random_rows(images: int, noise: float, seed: int):
    generator = torch.Generator().manual_seed(seed)
    truth, found = [], []
    for _ in range(images):
        count = int(torch.randint(1, 4, (1,), generator=generator))
        corner = torch.rand(count, 2, generator=generator) * 40
        boxes = torch.cat([corner, corner + 8 + torch.rand(count, 2, generator=generator) * 20], 1)
        labels = torch.randint(1, 5, (count,), generator=generator)
        truth.append({"boxes": boxes, "labels": labels})
        pick = torch.randint(0, count, (12,), generator=generator)
        found.append(
            {
                "boxes": boxes[pick] + torch.randn(12, 4, generator=generator) * noise,
                "labels": torch.where(torch.rand(12, generator=generator) < 0.8, labels[pick], 1),
                "scores": torch.rand(12, generator=generator),
            }
        )
    return truth, found


def test_resampled_map_is_pycocotools_at_unit_weights():
    """The bootstrap's re-accumulation of COCO matches gives pycocotools' own mAP when every
    image is drawn once, and a different one when some are not."""
    truth, found = _random_rows(60, noise=2.0, seed=0)
    rows = TASK.scores(found, truth)
    matches = _Matches(rows)
    expected = TASK.summarize(rows)["mAP"]
    assert 5 < expected < 95
    assert matches.mean_ap(np.ones((1, 60)))[0] == pytest.approx(expected, abs=1e-9)
    half = np.r_[np.ones(30), np.zeros(30)][None]
    assert matches.mean_ap(half)[0] == pytest.approx(TASK.summarize(rows[:30])["mAP"], abs=1e-9)


def test_drop_pairs_images_and_its_interval_holds_the_point():
    truth, found = _random_rows(80, noise=1.0, seed=1)
    worse = [{**f, "boxes": f["boxes"] + torch.randn_like(f["boxes"]) * 4} for f in found]
    base, mine = TASK.scores(found, truth), TASK.scores(worse, truth)
    same = TASK.drop(base, base)
    assert same.points == 0.0 and same.interval == (0.0, 0.0)
    drop = TASK.drop(base, mine)
    expected = TASK.summarize(base)["mAP"] - TASK.summarize(mine)["mAP"]
    assert drop.points == pytest.approx(expected, abs=1e-9) and drop.points > 0
    assert drop.interval[0] < drop.points < drop.interval[1] and drop.metric == "mAP"
    fewer = [{k: v[: len(v) // 2] for k, v in f.items()} for f in found]  # its own count
    assert TASK.drop(base, TASK.scores(fewer, truth)).points > 0
    with pytest.raises(TaskError, match="different images"):
        TASK.drop(base, TASK.scores(found[:40] * 2, truth[40:] * 2))


def test_a_detector_without_targets_or_loss_is_one_line():
    with pytest.raises(TaskError, match="one dict of boxes, labels and scores"):
        TASK.output(torch.zeros(2, 10))
    with pytest.raises(TaskError, match="one target dict per image"):
        TASK.scores([_found([], [], [])], [])
    with pytest.raises(TaskError, match="loss dict"):
        TASK.train_loss(lambda images, targets: images, torch.zeros(1), [])


@pytest.mark.parametrize(
    "name", ["ssdlite320_mobilenet_v3_large", "fasterrcnn_mobilenet_v3_large_320_fpn"]
)
def test_torchvision_detectors_are_built_for_the_data(name):
    """Grey images, 11 classes with background, the data's own normalisation, the input
    side the recipe asks for: no weights fetched."""
    model = build_model({"name": name, "kwargs": {"image_size": 96}}, num_classes=11, in_channels=1)
    first = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert first.in_channels == 1 and model.transform.min_size == (96,)
    assert model.transform.image_mean == [0.0] and model.transform.image_std == [1.0]
    with torch.no_grad():
        found = TASK.output(model.eval()(torch.randn(2, 1, 64, 64)))
    assert len(found) == 2 and found[0]["boxes"].shape[1] == 4
    assert int(found[0]["labels"].max()) <= 10  # boxes in the input's own pixels
    assert float(found[0]["boxes"].max()) <= 64.0


@pytest.fixture(scope="module")
def boxes(scenes_folder):
    """The session's real scenes (600 train, 200 test) with their boxes, as detection data."""
    config = {"name": "fashion_mnist_boxes", "root": str(scenes_folder), "batch_size": 16}
    return build_data({**config, "calibration_size": 40, "test_subset": 32, "eval_batch_size": 16})


def test_ssdlite_learns_on_real_scenes(boxes):
    """A few steps of the detector's own loss on real scenes lower it on a fixed batch, and
    the evaluator scores the result in COCO mAP; augmentation that would move boxes is
    refused in one line."""
    torch.manual_seed(0)
    model = build_model(
        {"name": "ssdlite320_mobilenet_v3_large", "kwargs": {"image_size": 64}}, data=boxes
    )
    images, targets = next(iter(boxes.loader("test")))
    assert images.shape == (16, 1, 64, 64) and isinstance(targets, list)

    def loss() -> float:
        model.train()  # a detector gives its losses in training mode alone
        with torch.no_grad():
            value = float(TASK.train_loss(model, images, targets)[0])
        model.eval()
        return value

    before = loss()
    train(model, boxes, {"epochs": 0, "max_steps": 25, "lr": 0.02, "augment": "none"})
    assert loss() < 0.8 * before
    figures = metrics(model, boxes)
    assert set(figures) == {"mAP", "mAP@.5", "mAP@.75"} and 0.0 <= figures["mAP"] <= 100.0
    with pytest.raises(TaskError, match="task detection: its targets would have to move"):
        train(model, boxes, {"epochs": 0, "max_steps": 1, "augment": "flip"})


def test_the_split_detector_is_the_detector():
    """Backbone and head as one network, anchors and NMS (compress's whole-tensor
    post-processing) around it: the same detections; torch's threads as they were."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    model = build_model(
        {"name": "ssdlite320_mobilenet_v3_large", "kwargs": {"image_size": 96}},
        num_classes=11,
        in_channels=1,
    ).eval()
    for parameter in model.head.parameters():  # scores away from uniform: NMS has work
        parameter.data.normal_(0, 0.05)
    images = torch.randn(2, 1, 64, 64)
    split = SplitDetector(model)
    with torch.no_grad():
        expected, found = model(images), split(images)
        expected_one = model(images[1:])  # batch 1 rounds a little otherwise: not batch 2's
        rows = DetectorNetwork(model)(split.resized(images))
        # Again (the anchors kept from the first call), and at another batch shape.
        again, one = split(images), split(images[1:])
    assert rows.shape[0] == 2 and rows.shape[2] == 4 + 11  # anchors' boxes, then classes
    for mine, theirs in zip(found + again + one, expected + expected + expected_one, strict=True):
        assert len(mine["boxes"]) > 10
        # Equal scores may come in either order (a random head ties many): as sets.
        assert torch.allclose(_detection_rows(mine), _detection_rows(theirs), atol=1e-4)
    assert len(split._anchors) == 2 and torch.get_num_threads() == threads


def _detection_rows(found: dict) -> torch.Tensor:
    """An image's detections as rows (score, label, box), sorted: comparable as a set."""
    rows = torch.cat([found["scores"][:, None], found["labels"][:, None], found["boxes"]], 1)
    return torch.tensor(sorted(rows.round(decimals=4).tolist()))


@pytest.mark.slow  # exports to ONNX Runtime
def test_a_detector_is_measured_network_alone_and_end_to_end(boxes, monkeypatch):
    """ONNX Runtime runs the network; the evaluator times it alone and with the detector's
    own pre- and post-processing in torch, and scores the runtime's detections in mAP."""
    pytest.importorskip("onnxruntime")
    from compress.measure import latency

    timed: list[tuple[str, tuple[int, ...]]] = []  # what each timing ran, on what input
    measure = latency.measure_latency

    def recording(model, batch, *args, **kwargs):
        timed.append((type(model).__name__, tuple(batch.shape)))
        return measure(model, batch, *args, **kwargs)

    monkeypatch.setattr(latency, "measure_latency", recording)
    torch.manual_seed(0)
    model = build_model(
        {"name": "ssdlite320_mobilenet_v3_large", "kwargs": {"image_size": 64}}, data=boxes
    )
    config = {"runtimes": ["torch", "onnxruntime"], "warmup": 2, "iterations": 5, "profile": False}
    result = evaluate(model.eval(), boxes, config)
    # Not one time against the other (5 calls each on a shared machine can swap them): each
    # runtime timed its whole detector and, apart, its network alone on the resized batch.
    assert ("SplitDetector", (1, 1, 64, 64)) in timed
    assert ("OnnxRuntimeModel", (1, 1, 64, 64)) in timed  # the network as ORT runs it
    for runtime in ("torch", "onnxruntime"):
        row = result.runtimes[runtime]
        assert row["network_p50_ms"] > 0 and row["latency_ms"].p50 > 0
    assert result.runtimes["onnxruntime"]["score"] == pytest.approx(result.score, abs=0.5)
    assert any("network alone / end to end" in note for note in result.notes)


def test_structured_pruning_keeps_the_heads_outputs(boxes):
    """Backbone and head channels pruned through the network; the head's outputs (classes
    and boxes per anchor) keep their counts, so the detector still detects."""
    torch.manual_seed(0)
    model = build_model(
        {"name": "ssdlite320_mobilenet_v3_large", "kwargs": {"image_size": 64}}, data=boxes
    ).eval()
    kept = {name: model.get_submodule(name).out_channels for name in head_outputs(model)}
    before = sum(p.numel() for p in model.parameters())
    pruned = prune(model, boxes, PruneConfig(method="structured", ratio=0.5))
    assert {name: pruned.get_submodule(name).out_channels for name in kept} == kept
    assert sum(p.numel() for p in pruned.parameters()) < 0.4 * before
    with torch.no_grad():
        found = pruned.eval()(torch.randn(1, 1, 64, 64))
    assert found[0]["boxes"].shape[1] == 4 and int(found[0]["labels"].max()) <= 10


class _CenterDetector(torch.nn.Module):
    """A user's detector: a small network, then its own data-dependent decoding (a python
    branch on the scores, a boolean mask, a loop over images) that no tracer follows."""

    def __init__(self, num_classes: int = 11, in_channels: int = 1):
        super().__init__()
        self.backbone = torch.nn.Sequential(
            torch.nn.Conv2d(in_channels, 16, 3, stride=2, padding=1),
            torch.nn.ReLU(),
            torch.nn.Conv2d(16, 32, 3, stride=2, padding=1),
            torch.nn.ReLU(),
        )
        self.head = torch.nn.Conv2d(32, num_classes + 4, 1)  # classes, then a box per cell

    def forward(self, images, targets=None):
        rows = self.head(self.backbone(images))  # (N, classes + 4, h, w)
        logits, boxes = rows[:, :-4], rows[:, -4:].sigmoid() * images.shape[-1]
        found = []
        for image_logits, image_boxes in zip(logits, boxes, strict=True):
            scores, labels = image_logits.softmax(0)[1:].max(0)
            keep = scores > 0.05
            if not keep.any():  # data-dependent: the branch depends on the values
                keep = scores >= scores.max()
            corners = image_boxes.permute(1, 2, 0)[keep]
            corners = torch.cat([corners[:, :2], corners[:, :2] + corners[:, 2:]], 1)
            found.append({"boxes": corners, "scores": scores[keep], "labels": labels[keep] + 1})
        return found


@pytest.mark.slow  # compiles INT8 kernels
def test_a_users_detector_with_its_own_control_flow_is_quantized_in_part(boxes):
    """What traces (its backbone and head) goes INT8; the decoding stays float and is named;
    the result is scored in mAP like the float model, the accuracy-aware fallback's drop
    too. No traceback anywhere."""
    from compress.core.traits import traits
    from compress.stages.quantize import PartlyQuantizedModel, quantize

    model = _CenterDetector().eval()
    quantized = quantize(
        model, boxes, method="int8_static", goal="size", calibration_batches=2, max_accuracy_drop=50
    )
    assert isinstance(quantized, PartlyQuantizedModel)
    assert set(quantized.quantized) == {"backbone", "head"}
    notes = " ".join(traits(quantized).notes)
    assert "the whole model does not export" in notes and "Traceback" not in notes
    (step,) = traits(quantized).details["fallback_steps"]  # within 50 points at once
    assert step["kept_float"] == [] and abs(step["drop"]) < 50.0
    images = boxes.example_input(4)
    with torch.inference_mode():
        mine, theirs = quantized(images), model(images)
    assert len(mine) == 4 and all(set(d) == {"boxes", "scores", "labels"} for d in mine)
    assert abs(metrics(quantized, boxes)["mAP"] - metrics(model, boxes)["mAP"]) < 5.0
    assert sum(len(d["boxes"]) for d in theirs) > 0


def test_a_detector_distils_by_its_own_loss_and_backbone_hints(boxes):
    """Distillation of a detector: its own loss plus hints on each feature map the backbone
    gives the head (the default pairs). With the hints weighted 0 it is exactly the same
    steps of its own loss; with the default hints the student ends elsewhere."""
    from compress.stages.distill import DistillConfig, LayerPair, _detector_hints, distill

    torch.manual_seed(0)
    teacher = build_model(
        {"name": "ssdlite320_mobilenet_v3_large", "kwargs": {"image_size": 64}}, data=boxes
    ).eval()
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        for parameter in student.backbone.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    hints = _detector_hints(student, teacher)
    assert [h.student for h in hints][:2] == ["backbone.features.0", "backbone.features.1"]
    assert len(hints) == 6  # two backbone stages and four extra layers: six feature maps
    schedule = {"epochs": 0, "max_steps": 5, "lr": 0.01, "augment": "none"}
    alone = train(copy.deepcopy(student), boxes, schedule)
    silent = [LayerPair(student="backbone.features.1", teacher="backbone.features.1", weight=0)]
    unhinted = distill(
        copy.deepcopy(student),
        boxes,
        DistillConfig(train=schedule, features=silent),
        teacher=teacher,
    )
    hinted = distill(student, boxes, DistillConfig(train=schedule), teacher=teacher)

    def weights(model):
        return torch.cat([p.detach().flatten() for p in model.backbone.parameters()])

    assert torch.allclose(weights(unhinted), weights(alone), atol=1e-6)
    assert not torch.allclose(weights(hinted), weights(alone), atol=1e-4)
    assert 0.0 <= metrics(hinted, boxes)["mAP"] <= 100.0


@pytest.mark.slow  # compiles INT8 kernels
def test_faster_rcnn_is_pruned_in_its_backbone_and_quantized_in_part(boxes, tmp_path):
    """Faster R-CNN's heads (proposals, ROI pooling) do not trace: structured pruning prunes
    its backbone with the pyramid's levels kept at the width its heads expect, and INT8
    quantizes what traces and names what stays float; the result still detects, and saved
    and loaded (its INT8 backbone returns named feature maps) detects the same."""
    from compress.core.traits import traits
    from compress.models.artifact import load, save
    from compress.stages.quantize import PartlyQuantizedModel, quantize

    torch.manual_seed(0)
    size = {"min_size": 64, "max_size": 64}  # the scenes' own size: no resizing
    model = build_model(
        {"name": "fasterrcnn_mobilenet_v3_large_320_fpn", "kwargs": size}, data=boxes
    ).eval()
    pruned = prune(copy.deepcopy(model), boxes, method="structured", target_macs=0.6)
    levels = [m for n, m in pruned.backbone.fpn.named_modules() if n.startswith("layer_blocks")]
    widths = {m.out_channels for m in levels if isinstance(m, torch.nn.Conv2d)}
    assert widths == {model.backbone.out_channels}
    body = [
        m.out_channels for m in pruned.backbone.body.modules() if isinstance(m, torch.nn.Conv2d)
    ]
    original = [
        m.out_channels for m in model.backbone.body.modules() if isinstance(m, torch.nn.Conv2d)
    ]
    assert sum(body) < 0.9 * sum(original)
    # Built with pretrained weights its batch norms are frozen: refused in one line.
    from torchvision.ops import FrozenBatchNorm2d

    frozen = copy.deepcopy(model)
    name = next(
        n for n, m in frozen.backbone.named_modules() if isinstance(m, torch.nn.BatchNorm2d)
    )
    parent, _, leaf = name.rpartition(".")
    norm = FrozenBatchNorm2d(frozen.backbone.get_submodule(name).num_features)
    setattr(frozen.backbone.get_submodule(parent), leaf, norm)
    with pytest.raises(PruningError, match="FrozenBatchNorm2d.*on_unprunable: skip"):
        prune(frozen, boxes, method="structured", target_macs=0.6)
    quantized = quantize(model, boxes, method="int8_static", goal="size", calibration_batches=2)
    assert isinstance(quantized, PartlyQuantizedModel) and "backbone" in quantized.quantized
    notes = " ".join(traits(quantized).notes)
    assert "the whole model does not export" in notes and "left in float" in notes
    images = boxes.example_input(2)
    save(quantized, tmp_path / "int8")
    with torch.inference_mode():
        for detections in (pruned(list(images)), quantized(images)):
            assert len(detections) == 2 and all(
                set(d) == {"boxes", "scores", "labels"} for d in detections
            )
        for mine, theirs in zip(load(tmp_path / "int8")(images), quantized(images), strict=True):
            assert torch.equal(mine["labels"], theirs["labels"])
            assert torch.allclose(mine["boxes"], theirs["boxes"])
