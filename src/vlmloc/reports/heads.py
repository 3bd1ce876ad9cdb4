"""Head statistics of a CMA run with bootstrap intervals over pairs, from mf.parquet alone.

Every statistic is recomputed on each resample of the pairs (one resample of the pair ids serves
both tasks, so the two tasks' top-k sets of a resample come from the same pairs): a head's mean MF,
the overlap of the two tasks' top-k sets, the number of heads at or above an MF threshold.
Rankings break ties as `reports.cma.top_heads` does: higher mean MF, then lower layer, lower head.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from vlmloc.reports.bootstrap import Bootstrap, Interval, percentile_interval, resample_counts, resampled_means


@dataclass(frozen=True)
class HeadMeans:
    """Mean MF per head of one task: `point` [heads], `resampled` [resamples, heads], `heads` the
    (layer, head) of each column in (layer, head) order, `n_pairs` pairs with a valid row."""

    heads: list[tuple[int, int]]
    point: np.ndarray
    resampled: np.ndarray
    n_pairs: int


def head_means(mf: pd.DataFrame, boot: Bootstrap) -> dict[str, HeadMeans]:
    """task -> `HeadMeans` over valid rows (mf not NaN), pairs resampled jointly across tasks."""
    valid = mf[mf["valid"].astype(bool) & mf["mf"].notna()]
    pairs = sorted(mf["sample_id"].astype(str).unique())
    counts = resample_counts(len(pairs), boot)
    out = {}
    for task in sorted(mf["task"].unique()):
        sub = mf[mf["task"] == task]
        heads = sorted({(int(a), int(b)) for a, b in zip(sub["layer"], sub["head"])})
        v = valid[valid["task"] == task]
        grid = v.pivot_table(index=v["sample_id"].astype(str), columns=["layer", "head"], values="mf", aggfunc="mean")
        grid = grid.reindex(index=pairs, columns=pd.MultiIndex.from_tuples(heads, names=["layer", "head"]))
        values = grid.to_numpy(dtype=float)
        point = np.array([np.nanmean(c) if np.isfinite(c).any() else np.nan for c in values.T])
        out[task] = HeadMeans(heads, point, resampled_means(values, counts), int(np.isfinite(values).any(axis=1).sum()))
    return out


def _top(means: np.ndarray, k: int) -> np.ndarray:
    """[..., heads] mean MF -> [..., k] column indices of the k highest (NaN last; ties: lower column)."""
    keyed = np.where(np.isfinite(means), means, -np.inf)
    return np.argsort(-keyed, axis=-1, kind="stable")[..., :k]


def top_heads(hm: HeadMeans, k: int) -> list[tuple[int, int]]:
    """The k heads with the highest mean MF (point estimate)."""
    return [hm.heads[i] for i in _top(hm.point, k)]


def head_interval(hm: HeadMeans, head: tuple[int, int], level: float) -> Interval:
    """A head's mean MF over pairs with its interval."""
    i = hm.heads.index(head)
    low, high = percentile_interval(hm.resampled[:, i], level)
    return Interval(float(hm.point[i]), low, high, hm.n_pairs)


def shared_top(a: HeadMeans, b: HeadMeans, k: int, level: float) -> Interval:
    """How many heads the two tasks' top-k sets share, with its interval over pair resamples."""
    if a.heads != b.heads:
        raise ValueError("the two tasks were patched on different heads; their top-k sets cannot be compared")
    point = len(set(_top(a.point, k).tolist()) & set(_top(b.point, k).tolist()))
    ta, tb = _top(a.resampled, k), _top(b.resampled, k)
    stats = np.array([len(np.intersect1d(x, y)) for x, y in zip(ta, tb)], dtype=float)
    low, high = percentile_interval(stats, level)
    return Interval(float(point), low, high, min(a.n_pairs, b.n_pairs))


def critical_counts(means: dict[str, HeadMeans], thresholds: Sequence[float], level: float) -> pd.DataFrame:
    """task x threshold: heads with mean MF >= threshold (count, its interval), and their
    (layer, head) indices."""
    rows = []
    for task, hm in means.items():
        for thr in thresholds:
            stats = (np.nan_to_num(hm.resampled, nan=-np.inf) >= float(thr)).sum(axis=1).astype(float)
            low, high = percentile_interval(stats, level)
            crit = [h for h, m in zip(hm.heads, hm.point) if np.isfinite(m) and m >= float(thr)]
            rows.append({"task": task, "mf_threshold": float(thr), "critical_heads": len(crit), "low": low,
                         "high": high, "heads": ", ".join(f"L{layer}H{head}" for layer, head in crit[:20])
                         + (" ..." if len(crit) > 20 else "")})
    return pd.DataFrame(rows, columns=["task", "mf_threshold", "critical_heads", "low", "high", "heads"])
