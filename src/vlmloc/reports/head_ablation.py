"""Head ablation report (Fig. 5, 15): accuracy per condition and the top heads of each ranking, and
the accuracy vs k figure, rebuilt from a head-ablation run's result rows, its config and the
head rankings (from the cma run's mf.parquet, `vlmloc.head_ranking`).

Writes ``fig5_head_ablation.md`` (accuracy and change from the baseline per condition, then the
top heads of each ranking with their layer and head indices) and ``fig5_head_ablation.png``
(a panel per task: top vs random heads, the classification-critical curve on localization).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from vlmloc.head_ranking import N_TOP_LISTED
from vlmloc.reports.tables import add_baseline_delta, summarize, task_columns, to_markdown
from vlmloc.results import atomic_write

TABLE_FILE = "fig5_head_ablation.md"
FIG_FILE = "fig5_head_ablation.png"
BASELINE = "baseline"  # the clean condition's name (vlmloc.conditions.BASELINE)


def ablation_table(results: pd.DataFrame, names: Sequence[str]) -> pd.DataFrame:
    """One row per condition: head set, k, n, accuracy per task and change from baseline (points)."""
    df = results[results["condition"].isin(list(names))]
    summary = add_baseline_delta(summarize(df)).set_index(["condition", "task"])
    first = df.drop_duplicates("condition").set_index("condition")
    rows = []
    for cond in names:
        if cond not in first.index:
            continue
        row: dict[str, Any] = {"condition": cond, "head_set": first.loc[cond, "head_set"], "k": int(first.loc[cond, "k"]), "n": None}
        row.update(task_columns(summary, cond))
        rows.append(row)
    return pd.DataFrame(rows)


def ranking_markdown(ranks: Mapping[str, pd.DataFrame], n: int = N_TOP_LISTED) -> str:
    """The first `n` heads of each task's ranking (`head_ranking.rank_heads` frames), a table per task."""
    parts = []
    for task, r in ranks.items():
        top = r.head(n).copy()
        top.insert(0, "rank", range(1, len(top) + 1))
        parts += [f"### Top {len(top)} heads by mean MF: {task}", "", to_markdown(top, digits=3), ""]
    return "\n".join(parts)


def plot_head_ablation(table: pd.DataFrame, path: Path, title: str = "") -> None:
    """Accuracy vs k per task panel: top heads solid, random heads (matched per layer) dashed,
    classification-critical heads on the localization panel dash-dotted, baseline dotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(t, s) for t, s in (("localization", "loc"), ("classification", "cls")) if s in table and table[s].notna().any()]
    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(5.2 * max(len(panels), 1), 3.8), squeeze=False)
    styles = {"top": ("-", "tab:red", "top heads (own ranking)"), "random": ("--", "0.45", "random heads, matched per layer"),
              "cls_critical": ("-.", "tab:purple", "classification-critical heads")}
    base = table[table["condition"] == BASELINE]
    for ax, (task, short) in zip(axes[0], panels):
        if len(base) and pd.notna(base[short].iloc[0]):
            ax.axhline(float(base[short].iloc[0]), color="k", linestyle=":", linewidth=1, label="no ablation")
        for head_set, (style, color, label) in styles.items():
            sub = table[(table["head_set"] == head_set) & table[short].notna()].sort_values("k")
            if len(sub):
                ax.plot(sub["k"], sub[short], style, marker="o", markersize=3, color=color, label=label)
        ks = sorted(set(table.loc[table["head_set"] != "none", "k"].astype(int)))
        ax.set_xscale("log")
        ax.set_xticks(ks, [str(k) for k in ks], fontsize=7)
        ax.minorticks_off()
        ax.set_ylim(-2, 102)
        ax.set_xlabel("heads ablated (k, cumulative by mean MF)")
        ax.set_ylabel("accuracy (%)")
        ax.set_title(task)
        ax.legend(fontsize=7, loc="lower left")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)


def write(results: pd.DataFrame, run_dir: Path, cfg: Any, *, names: Sequence[str],
          ranks: Mapping[str, pd.DataFrame]) -> str:
    """The markdown (table of the conditions `names`, in that order, then the top heads of each
    ranking in `ranks`, task -> `rank_heads` frame) and the figure; returns (and prints) the markdown."""
    run_dir = Path(run_dir)
    exp = cfg.experiment
    table = ablation_table(results, names)
    text = "\n".join([
        "# Head ablation (Fig. 5)",
        "",
        f"model={cfg.model.name} | data={cfg.data.name} | {run_dir} | cma_dir={Path(str(exp.cma_dir))}",
        "",
        f"Heads ranked per task by {exp.rank_by} MF over valid rows (positions={exp.mf_positions}); the top k ablated together "
        f"({exp.ablation} ablation, every position). random: as many heads per layer as the top-k set, drawn uniformly "
        "(control). cls_critical: the classification ranking's top k, measured on localization. loc: mean over "
        "IoU 0.5/0.7/0.9 of the hit rates (%); cls: % correct (model.classification.mode: the list names the category, or yes wins); deltas in points vs baseline.",
        "",
        to_markdown(table),
        "",
        ranking_markdown(ranks),
    ])
    atomic_write(run_dir / TABLE_FILE, lambda f: f.write(text.encode("utf-8")))
    if len(table):
        plot_head_ablation(table, run_dir / FIG_FILE, f"Head ablation: model={cfg.model.name}, data={cfg.data.name}, n={table['n'].max()}")
    print(f"\n{text}")
    return text
