"""Tables and figures of the causal mediation analysis (Fig. 4, 13, 14), from its parquet alone.

    text = write(mf, excluded, run_dir, cfg)   # cma_summary.md, fig4_cma_heatmaps.png

`mf` is the experiment's mf.parquet (one row per pair x task x layer x head: p_src, p_base,
p_patched, mf, valid, ...), `excluded` its excluded_pairs.parquet (pairs left out of a task before
patching). The summary lists the top-k heads per task by mean MF with their layer and head indices,
the overlap of the two tasks' top-k sets, the critical-head threshold and count and the pairs left
out; the figure is a layer x head heatmap of mean MF per task.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from vlmloc.head_ranking import mf_per_head
from vlmloc.reports.tables import to_markdown

SUMMARY_FILE = "cma_summary.md"
FIGURE_FILE = "fig4_cma_heatmaps.png"
def top_heads(table: pd.DataFrame, task: str, k: int) -> pd.DataFrame:
    """The k rows of an `mf_per_head` table with the highest mean MF for `task` (ties: lower layer, head)."""
    t = table[table["task"] == task].sort_values(["mean_mf", "layer", "head"], ascending=[False, True, True])
    return t.head(k).reset_index(drop=True)


def summary(mf: pd.DataFrame, excluded: pd.DataFrame, cfg: Any) -> str:
    """The markdown of cma_summary.md: run line, pairs dropped before patching, top-k heads per task
    (critical count, pairs excluded for a small denominator) and the two tasks' top-k overlap."""
    exp = cfg.experiment
    table = mf_per_head(mf)
    k, thr = int(exp.top_k), float(exp.critical_mf)
    lines = [f"CMA | model={cfg.model.name} | pairs={mf['sample_id'].nunique()} | positions={exp.positions} | "
             f"critical: mean MF >= {thr}"]
    pairs = mf.groupby(["task", "sample_id"])["valid"].any().groupby("task")
    small_denominator = (pairs.size() - pairs.sum()).to_dict()
    if "localization" in cfg.tasks:
        missed = int((excluded["task"] == "localization").sum())
        lines.append(f"localization: {missed} pairs dropped before patching because the source box missed "
                     f"(IoU < {exp.localization_source_min_iou}: the source run must answer correctly)")
    tops = {}
    for task in sorted(mf["task"].unique()):
        top = top_heads(table, task, k)
        tops[task] = set(zip(top["layer"], top["head"]))
        n_crit = int((table[table["task"] == task]["mean_mf"] >= thr).sum())
        lines += ["", f"### {task}: top {k} heads ({n_crit} critical; {small_denominator.get(task, 0)} pairs excluded, "
                      f"|P_base - P_src| < {exp.min_denominator})",
                  to_markdown(top[["layer", "head", "mean_mf", "median_mf", "pooled_mf", "n"]], digits=3)]
    if len(tops) == 2:
        a, b = tops.values()
        shared = sorted(a & b)
        lines += ["", f"top-{k} overlap between tasks: {len(shared)} heads {shared}"]
    return "\n".join(lines)


def plot_heatmaps(mf: pd.DataFrame, path: Path, model_name: str) -> None:
    """Fig. 4: one [layers, heads] grid of mean MF per task (heads without valid rows blank)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = mf_per_head(mf)
    tasks = sorted(table["task"].unique())
    n_layers, n_heads = int(mf["layer"].max()) + 1, int(mf["head"].max()) + 1
    fig, axes = plt.subplots(1, max(len(tasks), 1), figsize=(5 * max(len(tasks), 1), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        grid = np.full((n_layers, n_heads), np.nan)
        t = table[table["task"] == task]
        grid[t["layer"], t["head"]] = t["mean_mf"]
        im = ax.imshow(grid, aspect="auto", cmap="RdBu_r", vmin=-1, vmax=1, origin="lower")
        ax.set(title=f"{task}: mean MF", xlabel="head", ylabel="layer")
        fig.colorbar(im, ax=ax)
    fig.suptitle(f"Causal mediation per head ({model_name})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(mf: pd.DataFrame, excluded: pd.DataFrame, run_dir: Path, cfg: Any) -> str:
    """Write cma_summary.md and the Fig. 4 heatmaps into `run_dir`, print the summary, return it."""
    text = summary(mf, excluded, cfg)
    (Path(run_dir) / SUMMARY_FILE).write_text(text + "\n")
    plot_heatmaps(mf, Path(run_dir) / FIGURE_FILE, str(cfg.model.name))
    print("\n" + text)
    return text
