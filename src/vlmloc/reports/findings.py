"""The paper's findings checked as statements on finished runs' rows, each with a verdict and the
numbers behind it (a point value and its bootstrap interval).

Verdicts: "holds" when the whole interval lies on the side the statement claims, "does not hold"
otherwise, "not measured" when the rows it needs are not there. Every function takes frames as the
runs store them (results.parquet rows, mf.parquet, probe_accuracy.parquet) and returns `Finding`s.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

from vlmloc.extension_geometry import grow_box, paper_accuracy
from vlmloc.reports.bootstrap import NOT_MEASURED, Bootstrap, Interval, paired_difference_ci
from vlmloc.reports.heads import head_means, shared_top
from vlmloc.reports.scores import BASELINE, paired_ci, score_matrix

HOLDS, FAILS, UNMEASURED = "holds", "does not hold", "not measured"
OBJECT_VS_RANDOM = "object ablation costs more than random"
SHUFFLE = "intra-object shuffle costs localization less than global shuffle"
DIAGONAL = "the extension matrix's diagonal dominates"
GLOBAL_VIEW = "the global view carries localization in InternVL"
PROBE_PEAK = "probe accuracy peaks mid-LLM (layer)"
SHARED = "top heads of the two tasks share few of {k}"
TOP_VS_RANDOM = "ablating the top k heads costs more than k random heads"
CLS_HEADS = "ablating classification heads costs localization"


@dataclass(frozen=True)
class Finding:
    """One statement checked: its verdict, the value (with interval) it rests on, and how."""

    statement: str
    task: str
    verdict: str
    value: float
    low: float
    high: float
    n: int
    numbers: str


def verdict(iv: Interval, side: str, bound: float = 0.0) -> str:
    """holds when [low, high] lies below `bound` (side "<"), above it (">"), or at most it ("<=")."""
    if not iv.measured or not math.isfinite(iv.low):
        return UNMEASURED
    ok = {"<": iv.high < bound, ">": iv.low > bound, "<=": iv.high <= bound}[side]
    return HOLDS if ok else FAILS


def _finding(statement: str, task: str, iv: Interval, side: str, numbers: str, bound: float = 0.0) -> Finding:
    return Finding(statement, task, verdict(iv, side, bound), iv.estimate, iv.low, iv.high, iv.n, numbers)


def _ci(iv: Interval) -> str:
    return f"{iv.estimate:+.1f} [{iv.low:+.1f}, {iv.high:+.1f}]" if iv.measured else "not measured"


def _gap(rows: pd.DataFrame, statement: str, task: str, a: str, b: str, side: str, boot: Bootstrap) -> Finding:
    """mean(score under a - score under b) per object, with a's and b's change from the baseline."""
    m = score_matrix(rows, task)
    gap = paired_ci(m, a, b, boot)
    numbers = (f"{a} - {b}: {_ci(gap)} points; change from baseline: {a} {_ci(paired_ci(m, a, BASELINE, boot))}, "
               f"{b} {_ci(paired_ci(m, b, BASELINE, boot))}")
    return _finding(statement, task, gap, side, numbers)


def object_vs_random(results: pd.DataFrame, boot: Bootstrap) -> list[Finding]:
    """Token ablation: object tokens vs as many random tokens, per task (gap < 0 holds)."""
    return [_gap(results, OBJECT_VS_RANDOM, t, "object_tokens", "random_tokens", "<", boot)
            for t in ("localization", "classification")]


def shuffle_containment(results: pd.DataFrame, boot: Bootstrap) -> list[Finding]:
    """Shuffle: intra-object minus global shuffle on localization (gap > 0 holds)."""
    return [_gap(results, SHUFFLE, "localization", "shuffle:object", "shuffle:global", ">", boot)]


def global_view(results: pd.DataFrame, boot: Bootstrap) -> list[Finding]:
    """View ablation on images with a thumbnail: ablating the global view's object tokens minus the
    local crops' on localization (gap < 0 holds)."""
    rows = results[results["has_thumbnail"].astype(bool)] if "has_thumbnail" in results else results
    return [_gap(rows, GLOBAL_VIEW, "localization", "object_tokens:view=global", "object_tokens:view=local", "<", boot)]


def extension_scores(results: pd.DataFrame, levels: Sequence[int]) -> dict[int, pd.DataFrame]:
    """pad p -> [objects, q] localization scores (%) of the prediction against the GT grown by q cells."""
    loc = results[results["task"] == "localization"]
    out = {}
    for pad, rows in loc.groupby("pad", sort=True):
        out[int(pad)] = pd.DataFrame(
            {q: [paper_accuracy(r.pred_box, grow_box(r.gt_box, q, r.cell_w, r.cell_h, r.width, r.height))
                 for r in rows.itertuples(index=False)] for q in levels},
            index=rows["sample_id"].astype(str).to_numpy())
    return out


def extension_diagonal(results: pd.DataFrame, levels: Sequence[int], boot: Bootstrap) -> list[Finding]:
    """Each row p (with a column q = p) scores best on its diagonal: per row, accuracy at q = p minus
    the best other column, paired over objects; holds when every row's interval is above 0. Value:
    the row with the smallest gap."""
    levels = [int(q) for q in levels]
    gaps = {}
    for pad, scores in extension_scores(results, levels).items():
        others = [q for q in levels if q != pad]
        if pad not in levels or not others:
            continue
        rival = max(others, key=lambda q: (scores[q].mean(), -q))
        gaps[pad] = (rival, paired_difference_ci(scores[pad].to_numpy(), scores[rival].to_numpy(), boot))
    if not gaps:
        return [_finding(DIAGONAL, "localization", NOT_MEASURED, ">", "no pad with a matching GT scale level")]
    worst = min(gaps, key=lambda p: gaps[p][1].estimate)
    held = all(verdict(iv, ">") == HOLDS for _, iv in gaps.values())
    numbers = "; ".join(f"p={p}: GT+{p} - GT+{q} {_ci(iv)}" for p, (q, iv) in gaps.items())
    iv = gaps[worst][1]
    return [Finding(DIAGONAL, "localization", HOLDS if held else FAILS, iv.estimate, iv.low, iv.high, iv.n, numbers)]


def probe_peak(accuracy: pd.DataFrame, band: Sequence[float]) -> list[Finding]:
    """The LLM layer where the main probe (all views) peaks, as a share of the LLM's depth; holds when
    it lies within `band` (e.g. [0.1, 0.9]). No interval: the probes store accuracy per stage only."""
    target = "position" if "position" in set(accuracy["target"]) else "row_col"
    llm = accuracy[(accuracy["kind"] == "llm") & (accuracy["target"] == target) & (accuracy["view"] == "all")]
    if len(llm) < 1:
        return [Finding(PROBE_PEAK, "position", UNMEASURED, math.nan, math.nan, math.nan, 0, "no LLM stage probed")]
    layers = llm["stage"].str.split(".").str[1].astype(int).to_numpy()
    acc = llm["accuracy"].to_numpy(dtype=float)
    peak = int(layers[int(np.argmax(acc))])
    depth = peak / max(int(layers.max()), 1)
    ok = len(layers) >= 3 and float(band[0]) <= depth <= float(band[1])
    numbers = (f"peak at llm.{peak} (accuracy {acc.max():.3f}; {depth:.2f} of the depth, band {list(band)}); "
               f"llm.{layers.min()} {acc[layers.argmin()]:.3f}, llm.{layers.max()} {acc[layers.argmax()]:.3f}; "
               "no interval (accuracy per stage only)")
    return [Finding(PROBE_PEAK, target, HOLDS if ok else FAILS, float(peak), math.nan, math.nan, len(layers), numbers)]


def shared_heads(mf: pd.DataFrame, k: int, max_shared: int, boot: Bootstrap) -> list[Finding]:
    """The two tasks' top-k heads by mean MF share at most `max_shared` (the interval's top included)."""
    means = head_means(mf, boot)
    statement = SHARED.format(k=k)
    if set(means) != {"classification", "localization"}:
        return [_finding(statement, "both", NOT_MEASURED, "<=", "needs MF rows of both tasks", max_shared)]
    iv = shared_top(means["classification"], means["localization"], k, boot.level)
    numbers = f"shared {iv.estimate:.0f} of {k} [{iv.low:.0f}, {iv.high:.0f}] over {iv.n} pairs; few = at most {max_shared}"
    return [_finding(statement, "both", iv, "<=", numbers, max_shared)]


def top_vs_random_heads(results: pd.DataFrame, ks: Sequence[int], boot: Bootstrap) -> list[Finding]:
    """Head ablation: top k minus k random heads (matched per layer), per task and k (gap < 0 holds)."""
    return [_gap(results, f"{TOP_VS_RANDOM} (k={k})", t, f"heads:top:k={k}", f"heads:random:k={k}", "<", boot)
            for k in ks for t in ("localization", "classification")]


def cls_heads_cost_localization(results: pd.DataFrame, ks: Sequence[int], boot: Bootstrap) -> list[Finding]:
    """Head ablation: classification's top k heads, measured on localization, minus the baseline (< 0 holds)."""
    out = []
    for k in ks:
        m = score_matrix(results, "localization")
        iv = paired_ci(m, f"heads:cls_critical:k={k}", BASELINE, boot)
        out.append(_finding(f"{CLS_HEADS} (k={k})", "localization", iv, "<", f"change from baseline {_ci(iv)} points"))
    return out


def as_frame(findings: Sequence[Finding]) -> pd.DataFrame:
    cols = list(Finding.__dataclass_fields__)
    return pd.DataFrame([asdict(f) for f in findings], columns=cols)
