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

import numpy as np

CONFIDENCE = 0.95


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


def paired_drop(baseline: np.ndarray, model: np.ndarray, confidence: float = CONFIDENCE) -> dict:
    """The drop in top-1 (points; positive: the model is worse) with its exact McNemar
    interval and the counts of images that flipped each way.

    Example:
        >>> d = paired_drop(np.array([1, 1, 0, 1], bool), np.array([1, 0, 1, 1], bool))
        >>> d["lost"], d["gained"], d["points"]
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
    return {
        "points": points,
        "interval": [low, high],
        "lost": lost,
        "gained": gained,
        "images": images,
        "p_value": p_value,  # exact McNemar (two-sided)
        "within_noise": low <= 0.0 <= high,
    }


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
