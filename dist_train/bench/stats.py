"""Statistics for benchmarks: robust summaries (median, quartiles), paired ratios, run order.

Pure functions of lists of floats, so they are unit-tested without timing anything.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def quantile(xs: Sequence[float], q: float) -> float:
    """Linear interpolation between order statistics (numpy's default, 'type 7')."""
    if not xs:
        raise ValueError("quantile of an empty sequence")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q must be in [0, 1], got {q}")
    ordered = sorted(xs)
    pos = q * (len(ordered) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def median(xs: Sequence[float]) -> float:
    return quantile(xs, 0.5)


def summarize(xs: Sequence[float]) -> dict[str, float]:
    """Median and spread. The median, not the mean: a noisy machine adds slow outliers, and a
    few of them should not move the headline figure."""
    q1, q3 = quantile(xs, 0.25), quantile(xs, 0.75)
    return {
        "median": median(xs),
        "q1": q1,
        "q3": q3,
        "iqr": q3 - q1,
        "min": min(xs),
        "max": max(xs),
        "mean": sum(xs) / len(xs),
        "n": len(xs),
    }


def round_medians(rounds: Sequence[Sequence[float]]) -> list[float]:
    """One figure per round: the median of its steps, so a burst of load on a shared machine
    that hits a few steps does not move it."""
    return [median(r) for r in rounds]


def paired_ratios(a: Sequence[float], b: Sequence[float]) -> list[float]:
    """a[i] / b[i] per round. Both entries of a round ran back to back, so slow drift of the
    machine (another job, thermal state) cancels in the ratio."""
    if len(a) != len(b):
        raise ValueError(f"unpaired samples: {len(a)} vs {len(b)}")
    return [x / y for x, y in zip(a, b, strict=True)]


def ratio_summary(a: Sequence[float], b: Sequence[float]) -> dict[str, float]:
    """Headline ratio a/b: the median of the per-round ratios, its quartiles, and the plain
    ratio of the two medians for comparison."""
    per_round = paired_ratios(a, b)
    summary = summarize(per_round)
    return {
        "median": summary["median"],
        "q1": summary["q1"],
        "q3": summary["q3"],
        "min": summary["min"],
        "max": summary["max"],
        "ratio_of_medians": median(a) / median(b),
        "per_round": per_round,
    }


def interleaved_order(names: Sequence[str], rounds: int) -> list[list[str]]:
    """The contenders' order in each round, rotated by one every round (AB, BA, AB, ... for two;
    ABC, BCA, CAB, ... for three): every contender runs equally often in each position, so
    neither profits from going first (warm caches) or second (a machine that settles)."""
    n = len(names)
    return [[names[(r + i) % n] for i in range(n)] for r in range(rounds)]
