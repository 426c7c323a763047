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
from typing import Any, cast

import torch
from torch import nn
from torchvision.models.detection.ssd import SSD

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
        resized, _ = self.detector.transform(list(images))
        rows = self.network(resized.tensors)
        regression, logits = rows[..., :4], rows[..., 4:]
        anchors = self._anchors_for(resized)
        head = {"bbox_regression": regression, "cls_logits": logits}
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


def split_detector(model: nn.Module) -> SplitDetector | None:
    """``model`` (or the detector a partly quantized model wraps) split at its network, or
    None where it is no detector this module splits."""
    inner = getattr(model, "model", model)  # PartlyQuantizedModel keeps the detector here
    return (
        SplitDetector(inner) if isinstance(inner, nn.Module) and splits_as_network(inner) else None
    )


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
