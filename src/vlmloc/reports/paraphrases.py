"""How much a table moves when its questions are worded otherwise (`vlmloc.paraphrases`), from the
runs' rows alone.

`rows` maps a wording label ("default", "0", "1", ...) to that wording's result rows. Per condition
and task: the accuracy under each wording, their min and max, and, with a bootstrap, the mean over
wordings with its interval over objects (each object's scores averaged over the wordings, then
objects resampled: the objects measured under every wording); the same for the change from the
baseline, each wording's change paired with its own baseline.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from vlmloc.reports.bootstrap import Bootstrap, mean_ci
from vlmloc.reports.scores import BASELINE, condition_order, score_matrix
from vlmloc.results import RESULTS_FILE, ResultStore

DEFAULT = "default"


def load_wordings(run_dir: Path, labels: Sequence[str]) -> dict[str, pd.DataFrame] | None:
    """{"default": the run's rows, label: rows of paraphrases/<label>/}; None while one is unmerged."""
    from vlmloc.paraphrases import SUBDIR

    dirs = {DEFAULT: Path(run_dir), **{k: Path(run_dir) / SUBDIR / k for k in labels}}
    if not all((d / RESULTS_FILE).is_file() for d in dirs.values()):
        return None
    return {k: ResultStore(d).load() for k, d in dirs.items()}


def _per_object(rows: Mapping[str, pd.DataFrame], task: str) -> dict[str, pd.DataFrame]:
    return {k: score_matrix(r, task) for k, r in rows.items()}


def _delta(matrix: pd.DataFrame, cond: str) -> pd.Series:
    """Per object: score under `cond` minus under the baseline (NaN where either is missing)."""
    if BASELINE not in matrix or cond not in matrix:
        return pd.Series(np.nan, index=matrix.index)
    return matrix[cond] - matrix[BASELINE]


def accuracy_by_wording(rows: Mapping[str, pd.DataFrame], boot: Bootstrap | None = None) -> pd.DataFrame:
    """One row per condition x task of the default wording's rows: n (objects under the default),
    `default` and `wording_<k>` accuracies, min / max over all wordings, delta_default, delta_min,
    delta_max (change from baseline, points); with `boot` also mean, mean_low, mean_high and
    delta_mean, delta_low, delta_high (mean over wordings, interval over objects)."""
    labels = list(rows)
    out = []
    for task in ("localization", "classification"):
        mats = _per_object(rows, task)
        for cond in condition_order(rows[DEFAULT][rows[DEFAULT]["task"] == task]):
            acc = {k: float(m[cond].mean()) if cond in m else np.nan for k, m in mats.items()}
            delta = {k: float(_delta(m, cond).mean()) for k, m in mats.items()}
            rec = {"condition": cond, "task": task, "n": int(mats[DEFAULT][cond].notna().sum()),
                   "wordings": int(sum(np.isfinite(v) for v in acc.values())), DEFAULT: acc[DEFAULT],
                   **{f"wording_{k}": acc[k] for k in labels if k != DEFAULT},
                   "min": np.nanmin(list(acc.values())), "max": np.nanmax(list(acc.values()))}
            if cond != BASELINE:
                rec.update(delta_default=delta[DEFAULT], delta_min=np.nanmin(list(delta.values())),
                           delta_max=np.nanmax(list(delta.values())))
            if boot is not None:
                both = pd.concat([m[cond].rename(k) for k, m in mats.items() if cond in m], axis=1).dropna()
                iv = mean_ci(both.mean(axis=1).to_numpy(), boot)
                rec.update(mean=iv.estimate, mean_low=iv.low, mean_high=iv.high)
                if cond != BASELINE:
                    d = pd.concat([_delta(m, cond).rename(k) for k, m in mats.items()], axis=1).dropna()
                    dv = mean_ci(d.mean(axis=1).to_numpy(), boot)
                    rec.update(delta_mean=dv.estimate, delta_low=dv.low, delta_high=dv.high)
            out.append(rec)
    return pd.DataFrame(out)
