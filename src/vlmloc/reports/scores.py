"""Per-object scores and condition tables with bootstrap intervals, from result rows alone.

An object's score is what the paper's accuracy averages: localization, the mean of its hits at
IoU 0.5 / 0.7 / 0.9 (x 100; a missing hit is a miss, as in `tables.summarize`); classification,
100 if correct else 0. A condition's accuracy is the mean score over its objects; its change from
the baseline is the mean of paired differences over the objects measured under both.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from vlmloc.reports.bootstrap import NOT_MEASURED, Bootstrap, Interval, mean_ci, paired_difference_ci
from vlmloc.results import HIT_COLUMNS

BASELINE = "baseline"  # the clean condition's name (vlmloc.conditions.BASELINE)
SHORT = {"localization": "loc", "classification": "cls"}


def condition_order(results: pd.DataFrame) -> list[str]:
    """The conditions of result rows in order of first appearance, the baseline first."""
    names = list(pd.unique(results["condition"].astype(str)))
    return [BASELINE] + [c for c in names if c != BASELINE] if BASELINE in names else names


def row_scores(rows: pd.DataFrame) -> pd.Series:
    """Each result row's score in %: localization the mean hit over the three IoU thresholds,
    classification 100 x correct."""
    loc = rows["task"] == "localization"
    hits = pd.concat([rows[h].astype("boolean").fillna(False).astype(float) for h in HIT_COLUMNS], axis=1).mean(axis=1)
    correct = rows["correct"].astype("boolean").fillna(False).astype(float)
    return (hits.where(loc, correct) * 100.0).rename("score")


def score_matrix(rows: pd.DataFrame, task: str) -> pd.DataFrame:
    """[objects, conditions] scores of one task: index sample_id, one column per condition (NaN
    where the object has no row under that condition)."""
    sub = rows[rows["task"] == task]
    frame = pd.DataFrame({"sample_id": sub["sample_id"].astype(str), "condition": sub["condition"].astype(str),
                          "score": row_scores(sub)})
    return frame.pivot_table(index="sample_id", columns="condition", values="score", aggfunc="first", sort=False)


def accuracy_ci(matrix: pd.DataFrame, condition: str, boot: Bootstrap) -> Interval:
    """Accuracy of `condition` (mean over its objects) with its interval."""
    return mean_ci(matrix[condition].to_numpy(), boot) if condition in matrix else NOT_MEASURED


def paired_ci(matrix: pd.DataFrame, a: str, b: str, boot: Bootstrap) -> Interval:
    """mean(score under a - score under b) over the objects measured under both."""
    if a not in matrix or b not in matrix:
        return NOT_MEASURED
    both = matrix[[a, b]].dropna()
    return paired_difference_ci(both[a].to_numpy(), both[b].to_numpy(), boot)


def ci_table(rows: pd.DataFrame, conditions: Sequence[str], boot: Bootstrap, *, baseline: str = BASELINE) -> pd.DataFrame:
    """One row per condition x task (conditions in the given order, absent ones skipped): n,
    accuracy with its interval (acc_low, acc_high), delta from `baseline` with its paired
    interval (delta_low, delta_high; NaN for the baseline itself)."""
    out = []
    for task in ("localization", "classification"):
        matrix = score_matrix(rows, task)
        for cond in conditions:
            if cond not in matrix:
                continue
            acc = accuracy_ci(matrix, cond, boot)
            delta = paired_ci(matrix, cond, baseline, boot) if cond != baseline else NOT_MEASURED
            out.append({"condition": cond, "task": task, "n": acc.n, "accuracy": acc.estimate,
                        "acc_low": acc.low, "acc_high": acc.high, "delta": delta.estimate,
                        "delta_low": delta.low, "delta_high": delta.high})
    cols = ["condition", "task", "n", "accuracy", "acc_low", "acc_high", "delta", "delta_low", "delta_high"]
    table = pd.DataFrame(out, columns=cols)
    return table.astype({"n": "int64"}) if len(table) else table


def with_paper_columns(table: pd.DataFrame, paper: dict[str, dict[str, float]] | None) -> pd.DataFrame:
    """`ci_table` with the paper's values beside ours: paper_acc and acc_vs_paper (ours minus the
    paper's) where the paper states the accuracy (`loc` / `cls`), paper_delta and delta_vs_paper
    where it states the change (`loc_delta` / `cls_delta`); NaN where it states neither."""
    paper = paper or {}
    out = table.copy()

    def stated(suffix: str) -> list[float]:
        return [float((paper.get(c) or {}).get(SHORT[t] + suffix, np.nan)) for c, t in zip(out["condition"], out["task"])]

    out["paper_acc"] = stated("")
    out["acc_vs_paper"] = out["accuracy"] - out["paper_acc"]
    out["paper_delta"] = stated("_delta")
    out["delta_vs_paper"] = out["delta"] - out["paper_delta"]
    return out
