"""A detector split where tracing tools can follow it: the *network* (backbone and head,
tensors in and out) and the rest (resizing, anchors, box decoding, NMS), which is
data-dependent and stays in torch.

The network is what exports to ONNX Runtime and OpenVINO, what a runtime times "network
only", and what INT8 compresses; :class:`SplitDetector` runs any module standing for the
network (a runtime's session, a compiled graph) inside the detector's own pre- and
post-processing, so end-to-end figures come from the same code as torch's. Today:
torchvision's SSD family (``ssdlite320_mobilenet_v3_large``, ``ssd300_vgg16``), whose head
gives one row per anchor.

Example:
    >>> network = DetectorNetwork(detector)               # images (N, C, S, S) -> (N, A, 4 + K)
    >>> split = SplitDetector(detector, onnx_session)     # end to end, the network in ORT
    >>> split(images)[0]["boxes"]
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, cast

import torch
from torch import nn
from torchvision.models.detection.ssd import SSD
from torchvision.ops import boxes as box_ops

# The head's outputs, in the order the network concatenates them along its last dimension.
_SSD_OUTPUTS = ("bbox_regression", "cls_logits")


def splits_as_network(model: nn.Module) -> bool:
    """Whether ``model`` is a detector whose network :class:`DetectorNetwork` can take out."""
    return isinstance(model, SSD)


class DetectorNetwork(nn.Module):
    """A detector's backbone and head as one module: resized, normalised images (N, C, S, S)
    in, one tensor out — the head's box regression and class logits per anchor, side by
    side along the last dimension (N, anchors, 4 + classes)."""

    def __init__(self, detector: nn.Module):
        super().__init__()
        self.backbone = cast(nn.Module, detector.backbone)
        self.head = cast(nn.Module, detector.head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.backbone(x)
        if isinstance(features, torch.Tensor):
            features = OrderedDict([("0", features)])
        outputs = self.head(list(features.values()))
        return torch.cat([outputs[key] for key in _SSD_OUTPUTS], dim=-1)


class SplitDetector(nn.Module):
    """``detector`` end to end with ``network`` (anything that maps its resized images to
    :class:`DetectorNetwork`'s output) in place of its backbone and head. The anchors
    depend on the input's size alone: made once per batch shape and kept (a tenth of a
    millisecond to half of one per call otherwise, at 128 pixels on one core).

    Example:
        >>> SplitDetector(detector, DetectorNetwork(detector))(images)  # as detector(images)
    """

    def __init__(self, detector: nn.Module, network: nn.Module | None = None):
        super().__init__()
        self.detector: Any = detector  # torchvision's SSD: transform, anchors, post-processing
        self.network = network if network is not None else DetectorNetwork(detector)
        self._anchors: dict[tuple, list[torch.Tensor]] = {}
        for key in ("file", "precision"):  # a runtime's, for the report
            if hasattr(self.network, key):
                setattr(self, key, getattr(self.network, key))

    def resized(self, images) -> torch.Tensor:
        """The batch the network takes: ``images`` resized and normalised as the detector
        does (what "network only" is timed on)."""
        return self.detector.transform(list(images))[0].tensors

    def forward(self, images):
        original = [tuple(image.shape[-2:]) for image in images]
        with _one_torch_thread():
            resized, _ = self.detector.transform(list(images))
        rows = self.network(resized.tensors)
        with _one_torch_thread():
            anchors = self._anchors_for(resized)
            if type(self.detector).postprocess_detections is SSD.postprocess_detections:
                found = ssd_detections(self.detector, rows, anchors, resized.image_sizes)
            else:  # a subclass's own post-processing
                head = {"bbox_regression": rows[..., :4], "cls_logits": rows[..., 4:]}
                found = self.detector.postprocess_detections(head, anchors, resized.image_sizes)
            return self.detector.transform.postprocess(found, resized.image_sizes, original)

    def _anchors_for(self, resized) -> list[torch.Tensor]:
        """The anchor generator's boxes for this batch (they depend on its shape and the
        feature maps' shapes alone), computed once per shape and kept."""
        batch = resized.tensors
        key = (batch.shape, tuple(map(tuple, resized.image_sizes)), batch.dtype, batch.device)
        if key not in self._anchors:
            with torch.no_grad():
                features = self.detector.backbone(batch[:1])
            if isinstance(features, torch.Tensor):
                features = {"0": features}
            # Empty stand-ins: the generator reads the maps' shapes, dtype and device only.
            shapes = [torch.empty(0, 0, *f.shape[-2:], dtype=f.dtype) for f in features.values()]
            self._anchors[key] = self.detector.anchor_generator(resized, shapes)
        return self._anchors[key]


def ssd_detections(
    detector: Any, rows: torch.Tensor, anchors: list[torch.Tensor], image_sizes: list
) -> list[dict[str, torch.Tensor]]:
    """torchvision's SSD post-processing on :class:`DetectorNetwork`'s ``rows``: boxes
    decoded from the anchors and clipped, each class's top ``topk_candidates`` above
    ``score_thresh``, class-wise NMS, the best ``detections_per_img`` kept: the detections
    of ``SSD.postprocess_detections`` (equal scores may swap places), in whole-tensor ops
    rather than its loop over classes, and a softmax of our own (torch's takes ~0.1 ms on
    11 classes): 0.65 -> 0.35 ms per image at 128 pixels on one thread.

    Example:
        >>> ssd_detections(ssdlite, DetectorNetwork(ssdlite)(x), anchors, sizes)[0]["boxes"]
    """
    coder = detector.box_coder
    weights = torch.tensor(coder.weights, dtype=rows.dtype, device=rows.device)
    logits = rows[..., 4:]
    exp = (logits - logits.amax(-1, keepdim=True)).exp()
    all_scores = (exp / exp.sum(-1, keepdim=True))[..., 1:]  # the background column dropped
    detections = []
    per_image = zip(rows[..., :4], all_scores, anchors, image_sizes, strict=True)
    for regression, scores, anchor, size in per_image:
        # BoxCoder.decode_single's arithmetic, in its order (same floats).
        anchor = anchor.to(rows.dtype)
        extent = anchor[:, 2:] - anchor[:, :2]
        centre = anchor[:, :2] + 0.5 * extent
        offsets = regression / weights
        box_centre = offsets[:, :2] * extent + centre
        half = 0.5 * (offsets[:, 2:].clamp(max=coder.bbox_xform_clip).exp() * extent)
        boxes = torch.cat([box_centre - half, box_centre + half], dim=1)
        boxes = box_ops.clip_boxes_to_image(boxes, size)
        top, index = scores.topk(min(detector.topk_candidates, len(scores)), dim=0)
        top, index = top.T, index.T  # class by class, best first, as torchvision concatenates
        kept = top > detector.score_thresh
        labels = torch.arange(1, top.shape[0] + 1, device=rows.device)[:, None].expand_as(top)[kept]
        chosen_boxes, chosen_scores = boxes[index[kept]], top[kept]
        keep = box_ops.batched_nms(chosen_boxes, chosen_scores, labels, detector.nms_thresh)
        keep = keep[: detector.detections_per_img]
        detections.append(
            {"boxes": chosen_boxes[keep], "scores": chosen_scores[keep], "labels": labels[keep]}
        )
    return detections


@contextmanager
def _one_torch_thread() -> Iterator[None]:
    """Torch's part of a detector (tiny tensors) on one thread: a runtime's threads spin
    for a while after each call, and a second torch thread waiting for a core they hold
    cost 3-4 ms per image at batch 1 on 2 cores (ONNX Runtime's network 1.3 ms, its
    post-processing 5 ms instead of 1)."""
    threads = torch.get_num_threads()  # process-wide: torch in other threads meanwhile too
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def split_detector(model: nn.Module) -> SplitDetector | None:
    """``model`` (or the detector a partly quantized model wraps) split at its network, or
    None where it is no detector this module splits."""
    inner = getattr(model, "model", model)  # PartlyQuantizedModel keeps the detector here
    return (
        SplitDetector(inner) if isinstance(inner, nn.Module) and splits_as_network(inner) else None
    )


def pyramid_backbone(detector: nn.Module) -> tuple[nn.Module, list[str]] | None:
    """A detector whose heads read a feature pyramid (torchvision's Faster/Mask R-CNN,
    RetinaNet, FCOS): its backbone (images in, the pyramid's levels out) and the names,
    within it, of the convolutions that give each level, whose channel count every head
    expects; None for any other model. Structured pruning prunes the backbone alone.

    Example:
        >>> backbone, outputs = pyramid_backbone(fasterrcnn)
        >>> outputs[0]
        'fpn.layer_blocks.0.0'
    """
    backbone = getattr(detector, "backbone", None)
    fpn = getattr(backbone, "fpn", None)
    if not isinstance(backbone, nn.Module) or not isinstance(fpn, nn.Module):
        return None
    outputs = [
        f"fpn.{name}"
        for name, module in fpn.named_modules()
        if isinstance(module, nn.Conv2d) and name.startswith(("layer_blocks", "extra_blocks"))
    ]
    return backbone, outputs


def head_outputs(detector: nn.Module) -> list[str]:
    """Names of the convolutions that give the head's outputs (classes x anchors, 4 x
    anchors per feature map): structured pruning keeps their output channels.

    Example:
        >>> head_outputs(ssdlite)[0]
        'head.classification_head.module_list.0.1'
    """
    names = []
    for branch in ("classification_head", "regression_head"):
        entries = detector.get_submodule(f"head.{branch}.module_list")
        for index, entry in enumerate(cast(nn.ModuleList, entries)):
            last = [n for n, m in entry.named_modules() if isinstance(m, nn.Conv2d)][-1]
            names.append(f"head.{branch}.module_list.{index}" + (f".{last}" if last else ""))
    return names
