"""The ``detection`` task: boxes and labels per image, scored in COCO mAP.

A detector (torchvision's, or the user's with the same contract) takes images and, in
training mode with targets, returns its own loss dict; in eval mode it returns one dict of
``boxes`` (x1, y1, x2, y2 pixels), ``labels`` and ``scores`` per image. Targets are one dict
per image: ``boxes`` (G, 4), ``labels`` (G,), optionally ``iscrowd`` (G,).

The metric is COCO mAP@[.5:.95] (and mAP@.5, mAP@.75) from pycocotools, the reference
implementation, not rewritten here. Each image's row holds its ground truth and its top
:data:`MAX_DETECTIONS` detections, so two models' rows pair image by image. The interval of
a drop is a paired bootstrap over test images: pycocotools matches each image's detections
once (``COCOeval.evaluate``), and each resample re-accumulates precision and recall from
those matches with the images weighted by how often they were drawn — the same arithmetic
as ``COCOeval.accumulate``, equal to it at unit weights (tested).

Example:
    >>> task = get_task("detection")
    >>> rows = task.scores(detector(images), targets)
    >>> task.summarize(rows)["mAP"]
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import replace

import numpy as np
import torch

from compress.core import stats
from compress.core.errors import TaskError
from compress.spec.tasks import Task, register_task

# COCO scores the 100 best detections of an image (COCOeval's largest maxDets).
MAX_DETECTIONS = 100
# Ground-truth boxes a row holds (COCO val2017's busiest image has 63 annotations).
MAX_OBJECTS = 100
_BOX = 6  # x1, y1, x2, y2, label, then iscrowd (truth) or score (detection)


@register_task("detection")
class Detection(Task):
    """Boxes and classes per image. COCO mAP@[.5:.95] in points (pycocotools), with mAP@.5
    and mAP@.75; the training loss is the detector's own (the sum of its loss dict)."""

    metric = "mAP"
    interval_method = "paired bootstrap over test images (COCO matches re-accumulated)"
    augmentable = False  # a crop or flip would have to move the boxes too
    own_distillation = True  # the detector's loss and backbone hints: NMS'd boxes carry no KL

    def collate(self, items: list) -> tuple:
        """Images stacked (a list where their sizes differ), targets a list of dicts."""
        images = [item[0] for item in items]
        same = all(image.shape == images[0].shape for image in images)
        return (torch.stack(images) if same else images, [item[1] for item in items])

    def output(self, raw):
        if not isinstance(raw, (list, tuple)) or not all(isinstance(d, dict) for d in raw):
            raise TaskError(
                f"task detection: the model returned {type(raw).__name__}; expected one dict"
                " of boxes, labels and scores per image (a torchvision detector in eval mode)"
            )
        return list(raw)

    def difference(self, output, expected) -> float:
        """The largest difference of the best detections' boxes and scores, image by image
        (as many as both outputs have: a score that moves across the threshold adds one)."""
        largest = 0.0
        for mine, theirs in zip(output, expected, strict=True):
            for key in ("boxes", "scores"):
                count = min(len(mine[key]), len(theirs[key]))
                if count:
                    step = (mine[key][:count].float() - theirs[key][:count].float()).abs().max()
                    largest = max(largest, float(step))
        return largest

    def train_loss(self, model, inputs, targets, label_smoothing: float = 0.0):
        """The detector's own loss (the sum of the dict it returns given targets); no
        output to score while training."""
        losses = model(inputs, targets)
        if not isinstance(losses, dict) or not losses:
            raise TaskError(
                "task detection: in training mode the model must return its loss dict given"
                f" (images, targets), as torchvision's detectors do; got {type(losses).__name__}"
            )
        return sum(losses.values()), None

    def check_targets(self, output, targets):
        if not isinstance(targets, (list, tuple)) or len(targets) != len(output):
            raise TaskError(
                f"task detection: expected one target dict per image ({len(output)});"
                f" got {type(targets).__name__}"
            )
        for target in targets:
            if not isinstance(target, dict) or not {"boxes", "labels"} <= set(target):
                raise TaskError("task detection: a target is a dict with 'boxes' and 'labels'")
            if len(target["boxes"]) > MAX_OBJECTS:
                raise TaskError(
                    f"task detection: an image has {len(target['boxes'])} boxes; at most"
                    f" {MAX_OBJECTS} are scored"
                )

    def scores(self, output, targets):
        """Per image: its box count, detection count, truth boxes (x1, y1, x2, y2, label,
        iscrowd) then its best detections (x1, y1, x2, y2, label, score), zero-padded."""
        self.check_targets(output, targets)
        rows = np.zeros((len(output), 2 + (MAX_OBJECTS + MAX_DETECTIONS) * _BOX))
        for row, found, truth in zip(rows, output, targets, strict=True):
            boxes = truth["boxes"].detach().reshape(-1, 4).double().cpu()
            crowd = truth.get("iscrowd", torch.zeros(len(boxes)))
            gt = torch.cat(
                [boxes, truth["labels"].reshape(-1, 1).cpu(), crowd.reshape(-1, 1).cpu()], 1
            )
            best = found["scores"].detach().float().argsort(descending=True)[:MAX_DETECTIONS]
            dt = torch.cat(
                [
                    found["boxes"][best].detach().reshape(-1, 4).double().cpu(),
                    found["labels"][best].reshape(-1, 1).cpu(),
                    found["scores"][best].reshape(-1, 1).detach().cpu(),
                ],
                1,
            )
            row[:2] = len(gt), len(dt)
            row[2 : 2 + gt.numel()] = gt.numpy().ravel()
            start = 2 + MAX_OBJECTS * _BOX
            row[start : start + dt.numel()] = dt.numpy().ravel()
        return rows

    def summarize(self, rows):
        rows = np.asarray(rows, np.float64)
        evaluation = _coco_eval(rows)
        if evaluation is None:
            return {"mAP": 0.0, "mAP@.5": 0.0, "mAP@.75": 0.0}
        mean = 100.0 * evaluation.stats
        return {"mAP": float(mean[0]), "mAP@.5": float(mean[1]), "mAP@.75": float(mean[2])}

    def drop(self, baseline, model, seed=0):
        """Points of mAP lost, paired image by image: every resample weights both models'
        matched detections with the same image counts."""
        baseline, model = np.asarray(baseline, np.float64), np.asarray(model, np.float64)
        truth = [0, *range(2, 2 + MAX_OBJECTS * _BOX)]  # box count and boxes; not column 1,
        same = baseline.shape == model.shape  # the detection count, which is each model's own
        if not same or not np.array_equal(baseline[:, truth], model[:, truth]):
            raise TaskError("task detection: the two models were scored on different images")
        theirs, mine = _Matches(baseline), _Matches(model)
        drop = stats.bootstrap_drops(
            lambda weights: theirs.mean_ap(weights) - mine.mean_ap(weights), len(baseline), seed
        )
        return replace(drop, method=self.interval_method, metric=self.metric)


def _truth_and_detections(rows: np.ndarray):
    """pycocotools' ground truth (a COCO index) and detections (a list of dicts) of rows."""
    from pycocotools.coco import COCO  # the detection extra; imported when detection runs

    images: list[dict] = []
    annotations: list[dict] = []
    detections: list[dict] = []
    categories: set[int] = set()
    for image, row in enumerate(rows):
        count, found = int(row[0]), int(row[1])
        images.append({"id": image})
        gt = row[2 : 2 + count * _BOX].reshape(-1, _BOX)
        start = 2 + MAX_OBJECTS * _BOX
        dt = row[start : start + found * _BOX].reshape(-1, _BOX)
        for x1, y1, x2, y2, label, crowd in gt:
            annotations.append(
                {
                    "id": len(annotations) + 1,  # COCO's "unmatched" is id 0
                    "image_id": image,
                    "category_id": int(label),
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": float((x2 - x1) * (y2 - y1)),
                    "iscrowd": int(crowd),
                }
            )
            categories.add(int(label))
        detections += [
            {
                "image_id": image,
                "category_id": int(label),
                "bbox": [x1, y1, x2 - x1, y2 - y1],
                "score": float(score),
            }
            for x1, y1, x2, y2, label, score in dt
        ]
    truth = COCO()
    truth.dataset = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": c} for c in sorted(categories)],
    }
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        truth.createIndex()
    return truth, detections


def _coco_eval(rows: np.ndarray, summarize: bool = True):
    """pycocotools' COCOeval of rows (evaluated, accumulated and summarized), or None where
    the rows hold no ground truth or no detection."""
    from pycocotools.cocoeval import COCOeval

    if not len(rows):
        raise TaskError("task detection: no test image to score")
    truth, detections = _truth_and_detections(rows)
    if not truth.dataset["annotations"] or not detections:
        return None
    with contextlib.redirect_stdout(io.StringIO()):
        evaluation = COCOeval(truth, truth.loadRes(detections), "bbox")
        evaluation.params.imgIds = list(range(len(rows)))
        evaluation.evaluate()
        if summarize:
            evaluation.accumulate()
            evaluation.summarize()
    return evaluation


class _Matches:
    """One model's COCO matches per category (pycocotools' ``evalImgs`` for all areas and
    100 detections), sorted by score as ``COCOeval.accumulate`` sorts them, ready to be
    re-accumulated with images weighted."""

    def __init__(self, rows: np.ndarray):
        self.images = len(rows)
        self.categories: list[tuple] = []
        evaluation = _coco_eval(rows, summarize=False)
        if evaluation is None:
            return
        params = evaluation.params
        self.thresholds = np.asarray(params.recThrs)
        areas, images = len(params.areaRng), len(params.imgIds)
        for k in range(len(params.catIds)):
            found = [
                (i, e)
                for i, e in enumerate(
                    evaluation.evalImgs[k * areas * images : k * areas * images + images]
                )
                if e is not None
            ]
            if not found:
                continue
            scores = np.concatenate([e["dtScores"] for _, e in found])
            order = np.argsort(-scores, kind="mergesort")
            owner = np.concatenate([np.full(len(e["dtScores"]), i) for i, e in found])[order]
            matched = np.concatenate([e["dtMatches"] for _, e in found], 1)[:, order] > 0
            ignored = np.concatenate([e["dtIgnore"] for _, e in found], 1)[:, order]
            truths = np.zeros(self.images)
            for i, e in found:
                truths[i] = np.count_nonzero(np.asarray(e["gtIgnore"]) == 0)
            self.categories.append((owner, matched & ~ignored, ~ignored, truths))

    def mean_ap(self, weights: np.ndarray) -> np.ndarray:
        """mAP@[.5:.95] in points for each row of image ``weights`` (resamples x images)."""
        weights = np.asarray(weights, np.float64)
        total, counted = np.zeros(len(weights)), np.zeros(len(weights))
        for owner, hits, counts, truths in self.categories:
            positives = weights @ truths  # (B,)
            drawn = weights[:, owner]  # (B, D): a detection counts as often as its image
            # Detections so far (TP + FP, all but ignored ones), shared by the thresholds
            # where no detection is ignored (no crowd box): one cumulative sum, not ten.
            seen = np.cumsum(drawn, axis=1) if counts.all() else None
            for hit, count in zip(hits, counts, strict=True):
                # Interpolated precision changes only where a true positive lands: the
                # curve at those detections is the whole curve COCOeval interpolates.
                at = np.flatnonzero(hit)
                before = seen if seen is not None else np.cumsum(drawn * count, axis=1)
                tp = np.cumsum(drawn[:, at], axis=1)
                summed = self._interpolated(
                    tp / np.maximum(positives, 1e-12)[:, None], tp / (before[:, at] + np.spacing(1))
                )
                present = positives > 0
                total += np.where(present, summed, 0.0)
                counted += present * len(self.thresholds)
        return 100.0 * total / np.maximum(counted, 1)

    def _interpolated(self, recall: np.ndarray, precision: np.ndarray) -> np.ndarray:
        """COCOeval's interpolated precision summed over its recall thresholds, for each row
        of a precision-recall curve (resamples x true positives)."""
        rows, points = recall.shape
        levels = len(self.thresholds)
        if not points:
            return np.zeros(rows)
        precision = np.maximum.accumulate(precision[:, ::-1], axis=1)[:, ::-1]
        # For each recall threshold, the first point whose recall reaches it (COCOeval's
        # searchsorted): the count of points below it, from a histogram of how many
        # thresholds each point's recall reaches.
        reached = np.searchsorted(self.thresholds, recall, side="right")
        where = reached + (levels + 1) * np.arange(rows)[:, None]
        below = np.bincount(where.ravel(), minlength=(levels + 1) * rows)
        first = np.cumsum(below.reshape(rows, levels + 1), axis=1)[:, :levels]
        picked = np.take_along_axis(precision, np.minimum(first, points - 1), 1)
        return np.where(first < points, picked, 0.0).sum(1)
