"""The record of one evaluation: what the evaluator measured for one model, one row of a
report, written to and read back from report.json (old reports included).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from compress.core.stats import Drop, pack_rows, unpack, unpack_rows
from compress.core.storage import as_json
from compress.measure.latency import Latency, LatencyRatio
from compress.spec.tasks import TASKS


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
    latency_ms: Latency  # of one call at `batch_size`, in the fastest runtime
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
    drop: Drop | None = None
    notes: list[str] = field(default_factory=list)
    details: dict = field(
        default_factory=dict
    )  # what the stage reports itself (per-layer tables, ...)
    # Where `latency_ms` was measured: the fastest of the runtimes below.
    runtime: str = "torch"
    # runtime -> {latency_ms (a Latency), score, drop_points, max_abs_diff (logits vs
    # torch), precision, file, size_bytes, decode_tokens_per_s (a language model's)};
    # "torch" is the model as model(x) runs it.
    runtimes: dict[str, dict] = field(default_factory=dict)
    # The task's per-example rows on the test split, in its order (compress.core.stats.pack_rows):
    # what pairs this model's drop with another's.
    examples: dict | None = None
    # p50 against the baseline's, from alternating rounds in each one's fastest runtime.
    latency_ratio: LatencyRatio | None = None
    # The compute-matched control (evaluate.control): the baseline trained for the same
    # steps as the stages so far; {"steps", "score", "drop": a Drop, paired as above}.
    control: dict | None = None
    # The trainings of the step that made this model: {"steps", "config"} each, in order.
    training: list[dict] = field(default_factory=list)
    task: str = "classification"
    metric: str = "top-1"  # the name of `score`
    # Whether a higher `score` is better (top-1, mIoU) or a lower one (a language model's
    # loss): what a chart or front across runs ranks by. Drops are oriented already.
    higher_is_better: bool = True
    metrics: dict[str, float] = field(default_factory=dict)
    # A language model's decoding speed against the baseline's, from alternating rounds of
    # each one's fastest decoding runtime: {"x": tokens/s over the baseline's (the median
    # round), "interval": its 95 % interval, "rounds"}.
    decode_ratio: dict | None = None
    # The fastest deployment, kept in memory for the paired latency rounds; never saved.
    deployment: Any = field(default=None, repr=False, compare=False)
    # The fastest decoding step (compress.measure.decode.Decoding), likewise.
    decoding: Any = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict:
        """As report.json holds it: the typed figures as plain JSON values."""
        return {
            f.name: as_json(getattr(self, f.name))
            for f in fields(self)
            if f.name not in ("deployment", "decoding")
        }

    def best_decode(self) -> tuple[str, float] | None:
        """(runtime, tokens a second) of the runtime that decodes fastest, where timed."""
        rates = {
            name: row["decode_tokens_per_s"]
            for name, row in self.runtimes.items()
            if row.get("decode_tokens_per_s")
        }
        return max(rates.items(), key=lambda item: item[1]) if rates else None

    def example_rows(self) -> np.ndarray | None:
        """The task's per-example rows on the test split, or None where they were not kept."""
        return unpack_rows(self.examples) if self.examples else None

    @classmethod
    def from_dict(cls, raw: dict) -> Evaluation:
        """An evaluation as report.json holds it; one written before tasks (top-1 and its
        per-image correctness bits) reads as classification, one written before
        ``higher_is_better`` takes its task's."""
        raw = dict(raw)
        if "higher_is_better" not in raw:
            task = TASKS.get(raw.get("task") or "classification")
            raw["higher_is_better"] = task.higher_is_better if task is not None else True
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
        return cls(**_typed(raw))


def _typed(raw: dict) -> dict:
    """report.json's plain values for the typed fields made typed again."""
    raw["latency_ms"] = Latency.from_dict(raw["latency_ms"])
    if raw.get("drop") is not None:
        raw["drop"] = Drop.from_dict(raw["drop"])
    if raw.get("latency_ratio") is not None:
        raw["latency_ratio"] = LatencyRatio.from_dict(raw["latency_ratio"])
    raw["runtimes"] = {
        name: {**row, "latency_ms": Latency.from_dict(row["latency_ms"])}
        for name, row in raw.get("runtimes", {}).items()
    }
    if raw.get("control") and raw["control"].get("drop") is not None:
        raw["control"] = {**raw["control"], "drop": Drop.from_dict(raw["control"]["drop"])}
    return raw
