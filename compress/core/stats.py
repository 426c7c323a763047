"""Uncertainty of the figures the evaluator compares: accuracy drops and latency ratios.

An accuracy drop compares two models on the same test images, so it is paired: only the
images whose verdict flipped carry information. :func:`paired_drop` gives the exact
McNemar interval: conditional on the ``m`` images that flipped, the number lost is
Binomial(m, p); a Clopper-Pearson interval for p maps to one for the drop
``m (2p - 1) / n``. A model that flips no image has drop 0 and interval [0, 0]. (scipy's
``binomtest`` does the binomial arithmetic.)

A latency ratio comes from alternating rounds (baseline, model, baseline, ...):
:func:`median_interval` gives a distribution-free interval for the median round ratio from
order statistics, so a drift of the shared machine between two measurements widens the
interval instead of biasing the ratio.
"""

from __future__ import annotations

import base64
import zlib
from dataclasses import dataclass, fields, replace

import numpy as np

CONFIDENCE = 0.95
# Resamples of a paired bootstrap: the 2.5 % and 97.5 % quantiles of 2,000 resamples move
# by ~0.05 of the interval's width from seed to seed.
BOOTSTRAP_RESAMPLES = 2000


def pack(correct: np.ndarray) -> str:
    """Per-image correctness (bools, in test-split order) as compact text (base64 bits).

    Example:
        >>> pack(np.array([True, False, True]))
        'oA=='
    """
    return base64.b64encode(np.packbits(np.asarray(correct, dtype=bool)).tobytes()).decode()


def unpack(text: str, count: int) -> np.ndarray:
    """The inverse of :func:`pack`: ``count`` bools."""
    bits = np.frombuffer(base64.b64decode(text.encode(), validate=True), dtype=np.uint8)
    if bits.size != (count + 7) // 8:
        raise ValueError(f"{bits.size} bytes of correctness do not hold {count} images")
    return np.unpackbits(bits)[:count].astype(bool)


@dataclass(frozen=True)
class Drop:
    """Points of a metric a model loses against a reference (positive: worse), with what
    pairs it: an exact McNemar test (classification) or a seeded paired bootstrap. A field a
    method does not give is None and is left out of report.json.

    Example:
        >>> drop = paired_drop(np.array([1, 1, 0, 1], bool), np.array([1, 0, 1, 1], bool))
        >>> drop.points, drop.within_noise, drop.to_dict()["lost"]
        (0.0, True, 1)
    """

    points: float
    interval: tuple[float, float] | None = None  # 95 %, points; None: unpaired
    # Exact McNemar: the top-1 verdicts that flipped each way, of `images`.
    lost: int | None = None
    gained: int | None = None
    images: int | None = None
    p_value: float | None = None  # two-sided
    # Paired bootstrap: test examples resampled `resamples` times.
    examples: int | None = None
    resamples: int | None = None
    method: str | None = None  # in words, for the report
    within_noise: bool | None = None  # the interval holds 0
    percent: float | None = None  # of the reference's metric
    metric: str | None = None  # the metric's name ("top-1", "mIoU")

    def about(self, metric: str, reference_score: float | None = None) -> Drop:
        """This drop named for ``metric``, with its percent of ``reference_score``."""
        percent = self.percent
        if reference_score is not None:
            percent = 100.0 * self.points / max(abs(reference_score), 1e-9)
        return replace(self, metric=metric, percent=percent)

    def to_dict(self) -> dict:
        """As report.json holds it: the fields this drop has, the interval a list."""
        plain = {f.name: getattr(self, f.name) for f in fields(self)}
        if self.interval is not None:
            plain["interval"] = list(self.interval)
        return {k: v for k, v in plain.items() if v is not None}

    @classmethod
    def from_dict(cls, raw: dict) -> Drop:
        """A drop as report.json holds it (keys it does not know are ignored)."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in raw.items() if k in known}
        if values.get("interval") is not None:
            low, high = values["interval"]
            values["interval"] = (float(low), float(high))
        return cls(**values)


def paired_drop(baseline: np.ndarray, model: np.ndarray, confidence: float = CONFIDENCE) -> Drop:
    """The drop in top-1 (points; positive: the model is worse) with its exact McNemar
    interval and the counts of images that flipped each way.

    Example:
        >>> d = paired_drop(np.array([1, 1, 0, 1], bool), np.array([1, 0, 1, 1], bool))
        >>> d.lost, d.gained, d.points
        (1, 1, 0.0)
    """
    baseline, model = np.asarray(baseline, bool), np.asarray(model, bool)
    if baseline.shape != model.shape or baseline.ndim != 1 or baseline.size == 0:
        raise ValueError(f"correctness of {baseline.shape} and {model.shape} images do not pair")
    images = baseline.size
    lost = int(np.sum(baseline & ~model))  # right before, wrong now
    gained = int(np.sum(~baseline & model))
    flipped = lost + gained
    points = 100.0 * (lost - gained) / images
    if flipped == 0:
        low = high = 0.0
        p_value = 1.0
    else:
        from scipy.stats import binomtest  # ~1 s to import: paid by commands that compare

        test = binomtest(lost, flipped)
        ci = test.proportion_ci(confidence_level=confidence, method="exact")
        low = 100.0 * flipped * (2 * ci.low - 1) / images
        high = 100.0 * flipped * (2 * ci.high - 1) / images
        p_value = float(test.pvalue)
    return Drop(
        points,
        (low, high),
        lost=lost,
        gained=gained,
        images=images,
        p_value=p_value,
        within_noise=low <= 0.0 <= high,
    )


def paired_bootstrap(
    baseline: np.ndarray,
    model: np.ndarray,
    metric,
    higher_is_better: bool = True,
    seed: int = 0,
    resamples: int = BOOTSTRAP_RESAMPLES,
    confidence: float = CONFIDENCE,
) -> Drop:
    """The drop in a metric (positive: ``model`` is worse) with a seeded paired bootstrap
    interval: the same resampled examples score both models, and ``metric`` maps summed
    per-example rows (resamples x columns) to the metric of each resample.

    Example:
        >>> rows = lambda hits: np.stack([hits, np.ones_like(hits)], 1)
        >>> mean = lambda totals: 100 * totals[:, 0] / totals[:, 1]
        >>> paired_bootstrap(rows(np.ones(50)), rows(np.r_[np.ones(40), np.zeros(10)]), mean).points
        20.0
    """
    baseline, model = np.asarray(baseline, np.float64), np.asarray(model, np.float64)
    if baseline.shape != model.shape or baseline.ndim != 2 or not len(baseline):
        raise ValueError(f"scores of {baseline.shape} and {model.shape} do not pair")
    sign = 1.0 if higher_is_better else -1.0

    def drops(weights: np.ndarray) -> np.ndarray:
        return sign * (metric(weights @ baseline) - metric(weights @ model))

    return bootstrap_drops(drops, len(baseline), seed, resamples, confidence)


def bootstrap_drops(
    drops,
    examples: int,
    seed: int = 0,
    resamples: int = BOOTSTRAP_RESAMPLES,
    confidence: float = CONFIDENCE,
) -> Drop:
    """A paired bootstrap where ``drops`` maps example weights (resamples x examples: how
    often each example was drawn) to the drop of each resample; for a metric that is not a
    sum of per-example rows (COCO mAP). All ones gives the point estimate.

    Example:
        >>> hits = np.r_[np.ones(40), np.zeros(10)]
        >>> bootstrap_drops(lambda w: 100 * (w.sum(1) - w @ hits) / w.sum(1), 50).points
        20.0
    """
    if examples < 1:
        raise ValueError("a paired bootstrap needs at least one example")
    points = float(drops(np.ones((1, examples)))[0])
    generator = np.random.default_rng(seed)
    resampled = []
    for start in range(0, resamples, 250):  # 250 x examples weights at a time: bounded memory
        count = min(250, resamples - start)
        weights = generator.multinomial(examples, np.full(examples, 1.0 / examples), count)
        resampled.append(drops(weights.astype(np.float64)))
    tail = 100.0 * (1 - confidence) / 2
    low, high = (float(v) for v in np.percentile(np.concatenate(resampled), [tail, 100 - tail]))
    return Drop(
        points,
        (low, high),
        examples=examples,
        resamples=resamples,
        method="paired bootstrap",
        within_noise=low <= 0.0 <= high,
    )


def pack_rows(rows: np.ndarray) -> dict:
    """Per-example score rows as compact JSON-ready data (zlib, base64).

    Example:
        >>> unpack_rows(pack_rows(np.eye(3, dtype=np.uint8))).shape
        (3, 3)
    """
    rows = np.ascontiguousarray(rows)
    if rows.dtype not in (np.uint8, np.int32, np.float64):
        raise ValueError(f"score rows of {rows.dtype} are not stored")
    data = base64.b64encode(zlib.compress(rows.tobytes(), 6)).decode()
    return {"shape": list(rows.shape), "dtype": rows.dtype.name, "data": data}


# A report's rows: at most this many values (10,000 test images of 21 classes' pixel
# counts are 440,000), so that a crafted report.json cannot inflate gigabytes.
MAX_SCORE_VALUES = 1 << 26


def unpack_rows(packed: dict) -> np.ndarray:
    """The inverse of :func:`pack_rows`, bounded by the shape it announces."""
    shape, dtype = packed.get("shape"), packed.get("dtype")
    if (
        not isinstance(shape, list)
        or len(shape) != 2
        or not all(isinstance(v, int) and v >= 0 for v in shape)
        or dtype not in ("uint8", "int32", "float64")
        or shape[0] * shape[1] > MAX_SCORE_VALUES
    ):
        raise ValueError(f"score rows of shape {shape!r} and type {dtype!r} are not readable")
    size = shape[0] * shape[1] * np.dtype(dtype).itemsize
    inflater = zlib.decompressobj()
    raw = inflater.decompress(
        base64.b64decode(packed.get("data", "").encode(), validate=True), size + 1
    )
    if len(raw) != size:
        raise ValueError(f"score rows announce {size} bytes and hold {len(raw)}")
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def median_interval(values: list[float], confidence: float = CONFIDENCE) -> tuple[float, float]:
    """A distribution-free interval for the median of ``values`` (order statistics): the
    widest symmetric pair whose coverage is at least ``confidence``; with too few values
    for that, their range.

    Example:
        >>> median_interval([1.0, 1.1, 0.9, 1.05, 0.95, 1.02, 0.98, 1.01, 0.99, 1.03])
        (0.95, 1.05)
    """
    ordered = sorted(values)
    n = len(ordered)
    if n == 0:
        raise ValueError("no values")
    # Sorted from 0, [ordered[k], ordered[n-1-k]] covers the median with probability
    # 1 - 2 P(Binomial(n, 1/2) <= k).
    from scipy.stats import binom

    k = 0
    while k + 1 < n - 2 - k and 1 - 2 * binom.cdf(k + 1, n, 0.5) >= confidence:
        k += 1
    return ordered[k], ordered[n - 1 - k]
