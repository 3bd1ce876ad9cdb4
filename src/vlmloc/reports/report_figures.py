"""Figures of the paper report, as PNG bytes: accuracy per condition with its 95 % interval, one
colour per model, the paper's value as a black cross; CMA's critical-head counts per threshold."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def _figure(width: float, height: float, cols: int):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    return fig, fig.subplots(1, cols, squeeze=False)[0]


def _series(table: pd.DataFrame) -> pd.Series:
    """A colour per model, and per image set when the table holds several (its data column)."""
    several = "data" in table and table["data"].nunique() > 1
    return table["model"].astype(str) + (" / " + table["data"].astype(str) if several else "")


def accuracy_figure(table: pd.DataFrame, title: str) -> bytes | None:
    """A `ci_table` (with model and optional data columns): one panel per task, conditions down the y
    axis, a colour per model (and image set). None for
    a table that splits a condition over several rows (e.g. by object size): its all-rows table
    has the figure."""
    if not len(table) or "accuracy" not in table:
        return None
    table = table.assign(series=_series(table))
    if table.duplicated(["series", "task", "condition"]).any():
        return None
    tasks = [t for t in ("localization", "classification") if t in set(table["task"])]
    conds = list(dict.fromkeys(table["condition"]))
    models = list(dict.fromkeys(table["series"]))
    fig, axes = _figure(5.2 * len(tasks), 0.32 * len(conds) * max(len(models), 1) + 1.4, len(tasks))
    step = 0.8 / max(len(models), 1)
    for ax, task in zip(axes, tasks):
        for m, model in enumerate(models):
            sub = table[(table["task"] == task) & (table["series"] == model)].set_index("condition")
            ys = [i + (m - (len(models) - 1) / 2) * step for i, c in enumerate(conds) if c in sub.index]
            got = sub.loc[[c for c in conds if c in sub.index]]
            err = np.vstack([got["accuracy"] - got["acc_low"], got["acc_high"] - got["accuracy"]])
            ax.errorbar(got["accuracy"], ys, xerr=err, fmt="o", ms=4, capsize=2, label=model)
            if "paper_acc" in got and got["paper_acc"].notna().any():
                ax.plot(got["paper_acc"], ys, "kx", ms=6, label=f"paper ({model})")
        ax.set_yticks(range(len(conds)), conds, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlim(-2, 102)
        ax.set_xlabel("accuracy (%), 95 % bootstrap interval")
        ax.set_title(task, fontsize=9)
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(title, fontsize=9)
    return _png(fig)


def critical_figure(counts: pd.DataFrame, title: str) -> bytes | None:
    """Critical heads (mean MF >= threshold) vs the threshold, a line per model and task, intervals shaded."""
    if not len(counts):
        return None
    fig, axes = _figure(5.5, 3.4, 1)
    ax = axes[0]
    for (model, task), sub in counts.groupby(["model", "task"], sort=False):
        sub = sub.sort_values("mf_threshold")
        ax.plot(sub["mf_threshold"], sub["critical_heads"], marker="o", label=f"{model}, {task}")
        ax.fill_between(sub["mf_threshold"], sub["low"], sub["high"], alpha=0.2)
    ax.set_xlabel("MF threshold for a critical head")
    ax.set_ylabel("critical heads")
    ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    return _png(fig)
