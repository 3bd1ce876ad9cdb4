"""Bootstrap intervals against hand computations, and the paired design's narrower interval."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from vlmloc.reports.bootstrap import (Bootstrap, mean_ci, paired_difference_ci, percentile_interval,
                                      resample_counts, unpaired_difference_ci)
from vlmloc.reports.heads import critical_counts, head_means, shared_top, top_heads


def _hand_percentile(sorted_stats: list[float], q: float) -> float:
    """Linear interpolation between the order statistics around rank q/100 * (B - 1)."""
    pos = q / 100 * (len(sorted_stats) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_stats[lo] + (sorted_stats[hi] - sorted_stats[lo]) * (pos - lo)


def test_mean_ci_equals_a_hand_computation():
    values = [0.0, 100.0, 100.0, 50.0, 0.0, 100.0]
    boot = Bootstrap(resamples=40, seed=7, level=0.9)
    rng = np.random.default_rng(7)
    idx = rng.integers(0, len(values), size=(40, len(values)))
    means = sorted(sum(values[i] for i in row) / len(values) for row in idx)
    ci = mean_ci(values, boot)
    assert ci.estimate == pytest.approx(sum(values) / 6) and ci.n == 6
    assert ci.low == pytest.approx(_hand_percentile(means, 5.0))
    assert ci.high == pytest.approx(_hand_percentile(means, 95.0))
    assert ci.contains(ci.estimate) and ci.low < ci.high
    counts = resample_counts(6, boot)
    assert counts.shape == (40, 6) and (counts.sum(axis=1) == 6).all()
    assert counts[0].tolist() == np.bincount(idx[0], minlength=6).tolist()


def test_paired_ci_is_the_mean_ci_of_differences_and_keeps_pairs():
    rng = np.random.default_rng(0)
    base = rng.uniform(0, 100, 60)
    cond = base - 10 + rng.normal(0, 3, 60)  # strongly correlated with the baseline
    boot = Bootstrap(resamples=2000, seed=1, level=0.95)
    paired = paired_difference_ci(cond, base, boot)
    by_hand = mean_ci(cond - base, boot)
    assert (paired.estimate, paired.low, paired.high) == (by_hand.estimate, by_hand.low, by_hand.high)
    unpaired = unpaired_difference_ci(cond, base, boot)
    assert paired.estimate == pytest.approx(unpaired.estimate)
    assert paired.high - paired.low < 0.5 * (unpaired.high - unpaired.low)
    for ci in (paired, unpaired):
        assert ci.contains(ci.estimate)
    assert paired.high < 0 and unpaired.low < 0 < unpaired.high + 20  # the pairing is what resolves -10


@pytest.mark.parametrize("seed", range(5))
def test_an_interval_contains_its_estimate(seed):
    values = np.random.default_rng(seed).choice([0.0, 100.0 / 3, 200.0 / 3, 100.0], size=25)
    ci = mean_ci(values, Bootstrap(500, seed, 0.95))
    assert ci.low <= ci.estimate <= ci.high


def test_degenerate_inputs():
    boot = Bootstrap(100, 0, 0.95)
    assert not mean_ci([], boot).measured and math.isnan(mean_ci([math.nan], boot).estimate)
    one = mean_ci([42.0], boot)
    assert (one.estimate, one.low, one.high) == (42.0, 42.0, 42.0)
    assert percentile_interval(np.array([1.0, 2.0, 3.0]), 0.5) == (1.5, 2.5)
    with pytest.raises(ValueError, match="level"):
        Bootstrap(100, 0, 1.0)
    with pytest.raises(ValueError, match="resamples"):
        Bootstrap(0, 0, 0.95)


def _mf(values: dict[str, list[list[float]]]) -> pd.DataFrame:
    """task -> [pairs][heads] MF over 1 layer x len(heads) heads."""
    rows = []
    for task, grid in values.items():
        for p, per_head in enumerate(grid):
            for h, v in enumerate(per_head):
                rows.append({"sample_id": f"p{p}", "task": task, "layer": 0, "head": h, "mf": v, "valid": not math.isnan(v)})
    return pd.DataFrame(rows)


def test_head_statistics_match_the_pairs():
    mf = _mf({"classification": [[0.9, 0.1, 0.0, 0.5], [0.7, 0.3, 0.0, math.nan]],
              "localization": [[0.0, 0.8, 0.6, 0.0], [0.2, 0.6, 0.4, 0.0]]})
    boot = Bootstrap(300, 0, 0.95)
    means = head_means(mf, boot)
    cls, loc = means["classification"], means["localization"]
    np.testing.assert_allclose(cls.point, [0.8, 0.2, 0.0, 0.5])  # the NaN row is left out of head 3
    assert top_heads(cls, 2) == [(0, 0), (0, 3)] and top_heads(loc, 2) == [(0, 1), (0, 2)]
    assert shared_top(cls, loc, 2, boot.level).estimate == 0
    assert shared_top(cls, loc, 3, boot.level).estimate == 2  # cls top 3 {0, 3, 1}, loc {1, 2, 0}: heads 0 and 1
    crit = critical_counts(means, [0.5], boot.level).set_index("task")
    assert crit.loc["classification", "critical_heads"] == 2 and crit.loc["localization", "critical_heads"] == 2
    assert crit.loc["classification", "heads"] == "L0H0, L0H3"
    assert crit.loc["localization", "low"] <= 2 <= crit.loc["localization", "high"]
