"""Summary tables from result rows alone: accuracy per condition x task, change from baseline,
the paper's layouts, markdown."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from vlmloc.results import HIT_COLUMNS, atomic_write, coerce_results, is_missing
SUMMARY_COLUMNS = (
    "condition",
    "task",
    "n",
    "accuracy",
    "acc_50",
    "acc_70",
    "acc_90",
    "mean_iou",
    "n_unparsed",
    "mean_p_yes",
)


def _summarize_localization(loc: pd.DataFrame) -> pd.DataFrame:
    # An NA hit or NaN IoU on a localization row is a failed localization (failure is data),
    # never a row to skip: skipping would inflate accuracy.
    cols = {f"acc_{h[4:]}": loc[h].fillna(False).astype(float) * 100 for h in HIT_COLUMNS}
    parts = pd.DataFrame(
        {
            "condition": loc["condition"],
            "task": loc["task"],
            **cols,
            "iou": loc["iou"].fillna(0.0),
            "unparsed": loc["pred_box"].isna(),
        }
    )
    out = parts.groupby(["condition", "task"], sort=False).agg(
        n=("iou", "size"),
        acc_50=("acc_50", "mean"),
        acc_70=("acc_70", "mean"),
        acc_90=("acc_90", "mean"),
        mean_iou=("iou", "mean"),
        n_unparsed=("unparsed", "sum"),
    )
    out["accuracy"] = out[["acc_50", "acc_70", "acc_90"]].mean(axis=1)
    return out


def _summarize_classification(cls: pd.DataFrame) -> pd.DataFrame:
    parts = pd.DataFrame(
        {
            "condition": cls["condition"],
            "task": cls["task"],
            "correct": cls["correct"].astype(float) * 100,
            "p_yes": cls["p_yes"],
        }
    )
    return parts.groupby(["condition", "task"], sort=False).agg(
        n=("correct", "size"), accuracy=("correct", "mean"), mean_p_yes=("p_yes", "mean")
    )


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (condition, task), conditions in order of first appearance.

    Localization: `acc_50/70/90` = hit rates in %, `accuracy` = their mean (the paper's
    accuracy), `mean_iou`, `n_unparsed` (pred_box None). Classification: `accuracy` = % correct,
    `mean_p_yes`. Columns that do not apply to a task are NaN / NA.
    """
    df = coerce_results(df)
    parts = [
        f(df[df["task"] == task])
        for task, f in (
            ("classification", _summarize_classification),
            ("localization", _summarize_localization),
        )
        if (df["task"] == task).any()
    ]
    if not parts:
        return pd.DataFrame({c: pd.Series([], dtype=float) for c in SUMMARY_COLUMNS}).astype(
            {"condition": "str", "task": "str", "n": "int64", "n_unparsed": "Int64"}
        )
    out = pd.concat(parts).reset_index().reindex(columns=list(SUMMARY_COLUMNS))
    cond_rank = {c: i for i, c in enumerate(pd.unique(df["condition"]))}
    out = out.sort_values(
        ["condition", "task"], key=lambda s: s.map(cond_rank) if s.name == "condition" else s
    )
    return out.astype({"n": "int64", "n_unparsed": "Int64"}).reset_index(drop=True)


def add_baseline_delta(summary: pd.DataFrame, baseline: str = "baseline") -> pd.DataFrame:
    """Copy of a `summarize` table with `delta` = accuracy - the baseline's accuracy of the
    same task (percentage points; negative = a drop). NaN where the task has no baseline row."""
    base = summary.loc[summary["condition"] == baseline].set_index("task")["accuracy"]
    out = summary.copy()
    out["delta"] = out["accuracy"] - out["task"].map(base).astype(float)
    return out


def _cell(value: Any, digits: int) -> str:
    if is_missing(value):
        return ""
    if isinstance(value, (float, np.floating)):
        return f"{value:.{digits}f}"
    return str(value).replace("|", "\\|")


def to_markdown(table: pd.DataFrame, *, digits: int = 2) -> str:
    """GitHub-flavoured markdown table (no `tabulate` needed); floats with `digits` decimals,
    missing values blank, numeric columns right-aligned."""
    cols = [str(c) for c in table.columns]
    numeric = [
        pd.api.types.is_numeric_dtype(table[c]) and not pd.api.types.is_bool_dtype(table[c])
        for c in table.columns
    ]
    rows = [[_cell(v, digits) for v in row] for row in table.itertuples(index=False, name=None)]
    widths = [max([len(c), 3, *(len(r[i]) for r in rows)]) for i, c in enumerate(cols)]

    def line(cells: list[str]) -> str:
        padded = (c.rjust(w) if num else c.ljust(w) for c, w, num in zip(cells, widths, numeric))
        return "| " + " | ".join(padded) + " |"

    rule = "| " + " | ".join("-" * (w - 1) + ":" if n else "-" * w for w, n in zip(widths, numeric))
    return "\n".join([line(cols), rule + " |", *(line(r) for r in rows)])


def task_columns(summary: pd.DataFrame, condition: str) -> dict:
    """n, loc, loc_delta, cls, cls_delta of one condition from a summary indexed by (condition, task)."""
    out: dict = {}
    for task, short in (("localization", "loc"), ("classification", "cls")):
        if (condition, task) in summary.index:
            out["n"] = int(summary.loc[(condition, task), "n"])
            out[short] = summary.loc[(condition, task), "accuracy"]
            out[f"{short}_delta"] = summary.loc[(condition, task), "delta"]
    return out


def paper_table(results: pd.DataFrame, conditions: Sequence[str]) -> pd.DataFrame:
    """One row per condition: % visual tokens edited, localization and classification accuracy (%) and
    their change from the baseline (points), in the given condition order."""
    summary = add_baseline_delta(summarize(results)).set_index(["condition", "task"])
    frac = results.groupby("condition")["frac_edited"].mean() * 100 if "frac_edited" in results else pd.Series(dtype=float)
    rows = []
    for cond in conditions:
        row = {"condition": cond, "n": None, "tokens_%": frac.get(cond)}
        row.update(task_columns(summary, cond))
        rows.append(row)
    return pd.DataFrame(rows)


def with_paper(table: pd.DataFrame, paper: Mapping[str, Mapping[str, float]] | None) -> pd.DataFrame:
    """`table` (a `paper_table`) with the paper's accuracy per condition beside ours: paper_loc,
    paper_cls (NaN where the paper states none) and loc_vs_paper, cls_vs_paper (ours minus the
    paper's, points). paper: condition -> {loc, cls} (`model_paper_values`); None or
    empty: the table unchanged."""
    if not paper:
        return table
    out = table.copy()
    for short in ("loc", "cls"):
        if short not in out:
            continue
        out[f"paper_{short}"] = [float((paper.get(c) or {}).get(short, math.nan)) for c in out["condition"]]
        out[f"{short}_vs_paper"] = out[short].astype(float) - out[f"paper_{short}"]
    return out


def model_paper_values(cfg: Any, table: str) -> dict[str, dict[str, float]] | None:
    """The paper's values of `table` for the run's model (configs/paper/<model.name>.yaml,
    `vlmloc.reports.paper_values`): condition -> {loc, cls, ...}; None if it states none."""
    from vlmloc.reports.paper_values import PaperValues

    rows = PaperValues.for_model(str(cfg.model.name)).rows(table)
    return rows or None


def write_summary(run_dir: Path, cfg: Any, table: pd.DataFrame, filename: str) -> str:
    """Write a table as markdown into the run directory and print it with the run's identity."""
    text = to_markdown(table)
    atomic_write(Path(run_dir) / filename, lambda f: f.write((text + "\n").encode("utf-8")))
    print(f"\n{cfg.experiment.name} | model={cfg.model.name} | data={cfg.data.name} | {run_dir}\n{text}")
    return text
