"""Paper-layout tables shared by the token-level experiments (Tables 1 and 2)."""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from vlmloc.results import add_baseline_delta, summarize, to_markdown


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


def write_summary(ctx, results: pd.DataFrame, table: pd.DataFrame, filename: str) -> str:
    """Write the paper table as markdown into the run directory and print it with the run's identity."""
    text = to_markdown(table)
    (ctx.run_dir / filename).write_text(text + "\n")
    cfg = ctx.cfg
    print(f"\n{cfg.experiment.name} | model={cfg.model.name} | data={cfg.data.name} | {ctx.run_dir}\n{text}")
    return text
