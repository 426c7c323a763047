"""The record of one evaluation: what the evaluator measured for one model, one row of a
report, written to and read back from report.json (old reports included).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from compress.core.stats import pack_rows, unpack, unpack_rows


@dataclass
class Evaluation:
    """What the evaluator measured for one model (one row of the report)."""

    name: str
    params: int
    nonzero_params: int
    size_bytes: int
    flops: int  # per image, at batch 1
    macs: int  # multiply-accumulates per image (flops / 2 for conv and matmul)
    memory_access_bytes: int  # weights + activations read and written per image
    compute_dtype: str  # what the MACs run in: float32, int8, ...
    latency_ms: dict[str, float]  # p50, p90, p99, mean of one call at `batch_size`
    batch_size: int
    threads: int
    throughput_per_s: float  # images per second at `batch_size` (from the p50)
    gflops_per_s: float  # achieved, from the p50
    # The task's metric on the test split (`metric` names it: top-1 % for classification,
    # mIoU % for segmentation); `metrics` holds it and the task's other figures.
    score: float | None
    # Against the baseline, paired example by example (compress.spec.tasks, Task.drop): points
    # of the metric (positive: worse), percent, its 95 % interval, within_noise; exact
    # McNemar with images lost and gained and p_value for classification, a seeded paired
    # bootstrap (examples, resamples) for the other tasks.
    drop: dict | None = None
    notes: list[str] = field(default_factory=list)
    details: dict = field(
        default_factory=dict
    )  # what the stage reports itself (per-layer tables, ...)
    # Where `latency_ms` was measured: the fastest of the runtimes below.
    runtime: str = "torch"
    # runtime -> {latency_ms, score, drop_points, max_abs_diff (logits vs
    # torch), precision, file, size_bytes}; "torch" is the model as model(x) runs it.
    runtimes: dict[str, dict] = field(default_factory=dict)
    # The task's per-example rows on the test split, in its order (compress.core.stats.pack_rows):
    # what pairs this model's drop with another's.
    examples: dict | None = None
    # p50 against the baseline's, from alternating rounds in each one's fastest runtime:
    # {"p50": median round ratio, "interval": [low, high] (95 %), "rounds": n}.
    latency_ratio: dict | None = None
    # The compute-matched control (evaluate.control): the baseline trained for the same
    # steps as the stages so far; {"steps", "score", "drop": paired, as above}.
    control: dict | None = None
    # The trainings of the step that made this model: {"steps", "config"} each, in order.
    training: list[dict] = field(default_factory=list)
    task: str = "classification"
    metric: str = "top-1"  # the name of `score`
    metrics: dict[str, float] = field(default_factory=dict)
    # The fastest deployment, kept in memory for the paired latency rounds; never saved.
    deployment: Any = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict:
        return {
            k: v for k, v in asdict(replace(self, deployment=None)).items() if k != "deployment"
        }

    def example_rows(self) -> np.ndarray | None:
        """The task's per-example rows on the test split, or None where they were not kept."""
        return unpack_rows(self.examples) if self.examples else None

    @classmethod
    def from_dict(cls, raw: dict) -> Evaluation:
        """An evaluation as report.json holds it; one written before tasks (top-1 and its
        per-image correctness bits) reads as classification."""
        raw = dict(raw)
        if "accuracy_top1" in raw:
            raw["score"] = raw.pop("accuracy_top1")
            top5 = raw.pop("accuracy_top5", None)
            raw["metrics"] = {"top-1": raw["score"], "top-5": top5} if raw["score"] else {}
            raw["drop"] = raw.pop("accuracy_drop", None)
            correct = raw.pop("correct", None)
            if correct:  # top-1 bits only: its top-5 column repeats top-1 (pairing reads top-1)
                hits = unpack(correct["top1"], correct["images"]).astype(np.uint8)
                raw["examples"] = pack_rows(np.stack([hits, hits, np.ones_like(hits)], 1))
            for row in raw.get("runtimes", {}).values():
                row["score"] = row.pop("accuracy_top1", None)
                if "accuracy_drop_points" in row:
                    row["drop_points"] = row.pop("accuracy_drop_points")
            if raw.get("control"):
                raw["control"] = dict(raw["control"])
                raw["control"]["score"] = raw["control"].pop("accuracy_top1", None)
        return cls(**raw)
