"""Means over seeds with Student-t confidence intervals, and paired differences.

For n values with mean m and sample standard deviation s (n − 1 in the denominator), the
two-sided interval at confidence c is m ± t_{(1+c)/2, n−1} · s / √n. A paired difference is the
same interval over d_s = variant_s − baseline_s on the seeds both have. With one value there is
no spread to estimate: the interval is undefined (None), never a made-up width.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from scipy import stats

CONFIDENCE = 0.95


@dataclass(frozen=True)
class Estimate:
    n: int
    mean: float
    half_width: float | None
    """None when n < 2 (the interval is undefined)."""

    @property
    def low(self) -> float | None:
        return None if self.half_width is None else self.mean - self.half_width

    @property
    def high(self) -> float | None:
        return None if self.half_width is None else self.mean + self.half_width

    def to_dict(self) -> dict[str, float | int | None]:
        return {"n": self.n, "mean": self.mean, "low": self.low, "high": self.high}


def mean_interval(values: list[float], confidence: float = CONFIDENCE) -> Estimate:
    """Mean of `values` (at least one) and its Student-t interval."""
    n = len(values)
    mean = math.fsum(values) / n
    if n < 2:
        return Estimate(n, mean, None)
    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    quantile = stats.t.ppf((1 + confidence) / 2, df=n - 1)
    return Estimate(n, mean, float(quantile * sd / math.sqrt(n)))


def paired_difference(
    variant: dict[int, float], baseline: dict[int, float], confidence: float = CONFIDENCE
) -> Estimate | None:
    """variant − baseline over the seeds both have (keys); None when they share none."""
    shared = sorted(variant.keys() & baseline.keys())
    if not shared:
        return None
    return mean_interval([variant[s] - baseline[s] for s in shared], confidence)
