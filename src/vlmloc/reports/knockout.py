"""Attention knockout report (Fig. 3, 12): the condition x task table and the accuracy vs blocked
layers figure, rebuilt from a knockout run's result rows and its config.

Writes ``fig3_knockout.md`` (accuracy per condition and task, change from the baseline in points,
mean key tokens blocked) and ``fig3_knockout.png`` (a line per task, object keys solid, random keys
dashed, the clean baseline dotted).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from vlmloc.reports.tables import add_baseline_delta, summarize, task_columns, to_markdown
from vlmloc.results import atomic_write

TABLE_FILE = "fig3_knockout.md"
FIG_FILE = "fig3_knockout.png"
TASK_COLORS = {"localization": "tab:blue", "classification": "tab:orange"}
BASELINE = "baseline"  # the clean condition's name (vlmloc.conditions.BASELINE)


def knockout_table(results: pd.DataFrame, names: Sequence[str]) -> pd.DataFrame:
    """One row per condition (in `names` order): keys, layers, n, accuracy per task and its change
    from the baseline (points), mean number of key tokens blocked."""
    df = results[results["condition"].isin(list(names))]
    summary = add_baseline_delta(summarize(df)).set_index(["condition", "task"])
    first = df.drop_duplicates("condition").set_index("condition")
    n_keys = df.groupby("condition")["knockout_keys"].mean() if "knockout_keys" in df else pd.Series(dtype=float)
    rows = []
    for cond in names:
        if cond not in first.index:
            continue
        row: dict[str, Any] = {
            "condition": cond,
            "keys": first.loc[cond, "keys"] if "keys" in first else None,
            "layers": first.loc[cond, "layers"] if "layers" in first else None,
            "key_tokens": n_keys.get(cond),
            "n": None,
        }
        row.update(task_columns(summary, cond))
        rows.append(row)
    return pd.DataFrame(rows)


def plot_knockout(tables: Mapping[str, pd.DataFrame], path: Path, title: str = "") -> None:
    """Accuracy vs blocked layers; one row of panels per model (windows | single layers), a colour per
    task, object keys solid, random keys dashed, the clean baseline dotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.lines
    import matplotlib.pyplot as plt

    models = list(tables)
    fig, axes = plt.subplots(len(models), 2, figsize=(11, 3.4 * len(models)), squeeze=False, gridspec_kw={"width_ratios": [1, 2]})
    for row, model in enumerate(models):
        tab = tables[model]
        base = tab[tab["condition"] == BASELINE]
        windows = tab[tab["layers"].astype(str).str.contains("-")]
        singles = tab[tab["condition"].str.contains(":layer=", regex=False)]
        for ax, part, what in ((axes[row][0], windows, "windows"), (axes[row][1], singles, "single layers")):
            labels = list(dict.fromkeys(part["layers"].astype(str)))
            xs = {lab: i for i, lab in enumerate(labels)}
            for task, short in (("localization", "loc"), ("classification", "cls")):
                if short not in tab:
                    continue
                color = TASK_COLORS[task]
                if len(base) and pd.notna(base[short].iloc[0]):
                    ax.axhline(float(base[short].iloc[0]), color=color, linestyle=":", linewidth=1)
                for keys, style in (("object", "-"), ("random", "--")):
                    sub = part[part["keys"] == keys]
                    if len(sub) and sub[short].notna().any():
                        ax.plot([xs[str(v)] for v in sub["layers"]], sub[short], style, marker="o", markersize=3,
                                color=color, label=f"{task}, {keys} keys")
            ax.set_xticks(range(len(labels)), labels, rotation=90 if len(labels) > 12 else 0, fontsize=7)
            ax.set_ylim(-2, 102)
            ax.set_xlabel(f"blocked layers ({what})")
            ax.set_ylabel("accuracy (%)")
            ax.set_title(f"{model}: {what}", fontsize=9)
    legend = {}
    for ax in axes.flat:
        legend.update(zip(*reversed(ax.get_legend_handles_labels())))
    labels, handles = list(legend), list(legend.values())
    handles.append(matplotlib.lines.Line2D([], [], color="0.3", linestyle=":", linewidth=1))
    labels.append("no knockout (per task colour)")
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=3, fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120, bbox_inches="tight"))
    plt.close(fig)


def write(results: pd.DataFrame, run_dir: Path, cfg: Any, *, names: Sequence[str]) -> str:
    """The markdown table and the figure from the stored rows of the conditions `names` (in that
    order); returns (and prints) the markdown."""
    run_dir = Path(run_dir)
    table = knockout_table(results, names)
    head = f"model={cfg.model.name} | data={cfg.data.name} | {run_dir}"
    text = "\n".join([
        "# Attention knockout (Fig. 3)",
        "",
        head,
        "",
        f"Attention from every position after the image (prompt and generated answer) to the key tokens is "
        f"blocked in the listed layers (windows of {int(cfg.experiment.window)}, then single layers). keys: object = "
        "the object's tokens; random = as many random visual tokens (control). key_tokens: mean keys blocked per "
        "row. loc: mean over IoU 0.5/0.7/0.9 of the hit rates (%); cls: % correct (model.classification.mode: the list names the category, or yes wins); deltas in points vs baseline.",
        "",
        to_markdown(table),
        "",
    ])
    atomic_write(run_dir / TABLE_FILE, lambda f: f.write(text.encode("utf-8")))
    if len(table):
        plot_knockout({str(cfg.model.name): table}, run_dir / FIG_FILE, f"Attention knockout: data={cfg.data.name}, n={table['n'].max()}")
    print(f"\n{text}")
    return text
