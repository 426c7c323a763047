"""What the search keeps of each (keep, format) point of its grid: a typed record, written to search.json."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields

from compress.core.stats import Drop
from compress.core.storage import as_json


@dataclass(frozen=True)
class Cost:
    """A model's p50 in the fastest of the runtimes tried, which one, and its size on disk."""

    runtime: str
    latency_ms: float
    size_mb: float

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Candidate:
    """One (keep, format) point of the grid and what the search learnt of it, phase by
    phase: each phase gives a new candidate (``dataclasses.replace``). A figure a phase has
    not reached is None and is left out of search.json.

    Example:
        >>> c = Candidate(keep=0.5, format="float", macs=900_000, macs_x=0.49, params=40_000)
        >>> replace(c, latency_ms_predicted=0.31).to_dict()["latency_ms_predicted"]
        0.31
    """

    keep: float  # the MACs fraction asked of the pruner
    format: str  # one of FORMATS
    macs: int  # reached (round_to makes a staircase of them)
    macs_x: float  # macs / the baseline's
    params: int
    stretch: int = 1  # the distillation's length, in the recipe's epochs
    trained: bool = False
    # The cost model (phase 2): measured on PROBES per format, predicted for all.
    probe: Cost | None = None
    latency_ms_predicted: float | None = None
    size_mb_predicted: float | None = None
    meets_predicted: bool | None = None
    within_reach: bool | None = None  # within the latency slack: trained first
    # Trained and measured (phases 3 and 4), on the calibration split.
    distill_train: dict | None = None
    calibration_score: float | None = None
    calibration_drop: Drop | None = None
    latency_ms: float | None = None  # p50 in `runtime`
    runtime: str | None = None
    size_mb: float | None = None
    meets_target: bool | None = None
    meets_floor: bool | None = None
    minutes: float | None = None  # its training and measuring
    skipped: str | None = None  # "budget": it and the final run would not have fitted
    chosen: bool | None = None

    @property
    def drop(self) -> float:
        """Its calibration drop in points (trained candidates only)."""
        assert self.calibration_drop is not None, "an untrained candidate has no drop"
        return self.calibration_drop.points

    def to_dict(self) -> dict:
        plain = {f.name: as_json(getattr(self, f.name)) for f in fields(self)}
        return {k: v for k, v in plain.items() if v is not None}
