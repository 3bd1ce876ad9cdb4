"""Seeded percentile bootstrap confidence intervals, vectorised with numpy.

A resample draws n units (objects; pairs for CMA) with replacement; `resample_counts` gives, for
each of `resamples` resamples, how often each unit was drawn, so any per-unit statistic's resampled
mean is one matrix product. Intervals are percentile intervals at `level` (numpy's linear
interpolation). The resample count, seed and level are arguments, read from the report's config
(configs/experiment/report.yaml, `experiment.bootstrap`).

    boot = Bootstrap(resamples=2000, seed=0, level=0.95)
    mean_ci(scores, boot)                     # accuracy of a condition, over objects
    paired_difference_ci(cond, base, boot)    # change from baseline: objects resampled, pairs kept
    unpaired_difference_ci(cond, base, boot)  # the same without pairing (each side resampled alone)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Bootstrap:
    """How intervals are drawn: `resamples` resamples from `np.random.default_rng(seed)`, a
    central interval holding `level` of the resampled statistics."""

    resamples: int
    seed: int
    level: float

    def __post_init__(self) -> None:
        if isinstance(self.resamples, bool) or int(self.resamples) < 1:
            raise ValueError(f"bootstrap resamples must be an integer >= 1, got {self.resamples!r}")
        if not 0.0 < float(self.level) < 1.0:
            raise ValueError(f"bootstrap level must lie strictly between 0 and 1, got {self.level!r}")


@dataclass(frozen=True)
class Interval:
    """A point estimate, its bootstrap interval [low, high] and the number of units n."""

    estimate: float
    low: float
    high: float
    n: int

    @property
    def measured(self) -> bool:
        return self.n > 0 and math.isfinite(self.estimate)

    def contains(self, value: float) -> bool:
        return self.low <= value <= self.high


NOT_MEASURED = Interval(math.nan, math.nan, math.nan, 0)


def resample_counts(n: int, boot: Bootstrap, rng: np.random.Generator | None = None) -> np.ndarray:
    """[resamples, n] int: how often each of n units is drawn in each resample.

    The draws are `rng.integers(0, n, size=(resamples, n))` of `np.random.default_rng(boot.seed)`
    (or of `rng`, to continue one stream): resample r holds units idx[r, :]."""
    rng = np.random.default_rng(boot.seed) if rng is None else rng
    idx = rng.integers(0, n, size=(int(boot.resamples), n))
    offsets = np.arange(int(boot.resamples))[:, None] * n
    return np.bincount((idx + offsets).ravel(), minlength=int(boot.resamples) * n).reshape(int(boot.resamples), n)


def resampled_means(values: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Mean of `values` ([n] or [n, k]) over each resample's units, NaN units skipped:
    [resamples] or [resamples, k]; NaN where a resample holds no finite value."""
    values = np.asarray(values, dtype=float)
    finite = np.isfinite(values)
    weights = counts.astype(float)
    total = weights @ np.where(finite, values, 0.0)
    drawn = weights @ finite.astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(drawn > 0, total / np.where(drawn > 0, drawn, 1.0), np.nan)


def percentile_interval(stats: np.ndarray, level: float) -> tuple[float, float]:
    """The central `level` percentile interval of resampled statistics (NaN resamples ignored)."""
    stats = np.asarray(stats, dtype=float)
    stats = stats[np.isfinite(stats)]
    if not len(stats):
        return math.nan, math.nan
    tail = (1.0 - float(level)) / 2.0 * 100.0
    low, high = np.percentile(stats, [tail, 100.0 - tail])
    return float(low), float(high)


def _finite(values: np.ndarray | list[float]) -> np.ndarray:
    values = np.asarray(values, dtype=float)
    return values[np.isfinite(values)]


def mean_ci(values: np.ndarray | list[float], boot: Bootstrap) -> Interval:
    """Mean over units (NaN units left out) with its percentile interval."""
    values = _finite(values)
    if not len(values):
        return NOT_MEASURED
    low, high = percentile_interval(resampled_means(values, resample_counts(len(values), boot)), boot.level)
    return Interval(float(values.mean()), low, high, len(values))


def paired_difference_ci(a: np.ndarray | list[float], b: np.ndarray | list[float], boot: Bootstrap) -> Interval:
    """mean(a - b) over units measured in both (a[i] and b[i] are the same unit, e.g. one object
    under a condition and under the baseline), units resampled with their pairs kept."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"paired values need equal shapes, got {a.shape} and {b.shape}")
    return mean_ci(a - b, boot)


def unpaired_difference_ci(a: np.ndarray | list[float], b: np.ndarray | list[float], boot: Bootstrap) -> Interval:
    """mean(a) - mean(b) with each side resampled on its own (one seeded stream: a's draws, then
    b's): the interval a paired design would not need."""
    a, b = _finite(a), _finite(b)
    if not len(a) or not len(b):
        return NOT_MEASURED
    rng = np.random.default_rng(boot.seed)
    stats = resampled_means(a, resample_counts(len(a), boot, rng)) - resampled_means(b, resample_counts(len(b), boot, rng))
    low, high = percentile_interval(stats, boot.level)
    return Interval(float(a.mean() - b.mean()), low, high, min(len(a), len(b)))
