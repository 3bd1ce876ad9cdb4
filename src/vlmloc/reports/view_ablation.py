"""Report of the view ablation (Table 3, Fig. 10), rebuilt from its result rows alone.

Rows are split by object size (``area_frac`` binned with left-closed edges) and by whether the
image has a thumbnail (``has_thumbnail``): single-tile images, whose one tile counts as the global
view, get their own section and never enter the main table. Deltas are points against the
baseline of the same group, size bin and task.

Files written into the run directory: ``table3_view_ablation.md`` and ``fig10_view_ablation.png``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from vlmloc.reports.tables import add_baseline_delta, summarize, to_markdown
from vlmloc.results import atomic_write

TABLE_FILE = "table3_view_ablation.md"
FIG_FILE = "fig10_view_ablation.png"
BASELINE = "baseline"  # the clean condition's name (vlmloc.conditions.BASELINE)
ALL = "all"  # the size bin of every object; no configured label may take it


def size_bins(area_frac: pd.Series | np.ndarray, edges: Sequence[float], labels: Sequence[str]) -> np.ndarray:
    """Label of each area fraction: bin i holds edges[i-1] <= a < edges[i] (left-closed)."""
    idx = np.searchsorted(np.asarray(edges, dtype=float), np.asarray(area_frac, dtype=float), side="right")
    return np.asarray(labels, dtype=object)[idx]


def view_table(df: pd.DataFrame, edges: Sequence[float], labels: Sequence[str]) -> pd.DataFrame:
    """Long table: group (multi_tile / single_tile) x size bin (and "all") x condition x task ->
    n, accuracy, delta (points vs the baseline of the same group, bin and task)."""
    df = df.copy()
    df["size_bin"] = size_bins(df["area_frac"], edges, labels)
    thumb = df["has_thumbnail"].astype(bool) if "has_thumbnail" in df.columns else pd.Series(True, index=df.index)
    parts = []
    for group, sub in (("multi_tile", df[thumb]), ("single_tile", df[~thumb])):
        for bin_name in [*labels, ALL]:
            rows = sub if bin_name == ALL else sub[sub["size_bin"] == bin_name]
            if not len(rows):
                continue
            s = add_baseline_delta(summarize(rows))[["condition", "task", "n", "accuracy", "delta"]]
            s.insert(0, "size_bin", bin_name)
            s.insert(0, "group", group)
            parts.append(s)
    cols = ["group", "size_bin", "condition", "task", "n", "accuracy", "delta"]
    return pd.concat(parts, ignore_index=True)[cols] if parts else pd.DataFrame(columns=cols)


def _wide(long: pd.DataFrame, value: str, conditions: Sequence[str], bins: Sequence[str]) -> pd.DataFrame:
    """Rows (task, condition), one column per size bin with its object count in the header."""
    tab = long.pivot_table(index=["task", "condition"], columns="size_bin", values=value, aggfunc="first", dropna=False)
    present = [b for b in bins if b in tab.columns]
    counts = long[long["condition"] == BASELINE].groupby("size_bin")["n"].max()
    out = tab[present].reset_index()
    rank = {c: i for i, c in enumerate(conditions)}
    out = out[out["condition"].isin(rank)]
    out = out.sort_values(["task", "condition"], key=lambda s: s.map(rank) if s.name == "condition" else s)
    out.columns = ["task", "condition", *(f"{b} (n={int(counts.get(b, 0))})" for b in present)]
    return out.reset_index(drop=True)


def table_markdown(
    long: pd.DataFrame, conditions: Sequence[str], edges: Sequence[float], labels: Sequence[str], head: str
) -> str:
    """Table 3 as markdown: deltas and accuracies of multi-tile images per size bin, then the
    single-tile images apart (conditions: baseline first, in report order)."""
    bins = [*labels, ALL]
    lines = ["# View ablation (Table 3)", "", head, ""]
    multi = long[long["group"] == "multi_tile"]
    single = long[long["group"] == "single_tile"]
    n_single = int(single.loc[single["size_bin"] == ALL, "n"].max()) if len(single) else 0
    lines += [
        (
            "Object tokens replaced with the mean visual embedding in the global thumbnail, the local crops, or both. "
            f"Size bins on area_frac = object area / image area, left-closed edges {list(edges)} -> {list(labels)}; "
            "n = objects per bin and task. Localization accuracy: mean over IoU 0.5/0.7/0.9 of the hit rates; "
            "classification: % correct (model.classification.mode)."
        ),
        "",
        f"## Images with a thumbnail (multi-tile); {n_single} single-tile object(s) reported separately below",
        "",
    ]
    if len(multi):
        lines += ["### Change vs baseline (points)", "", to_markdown(_wide(multi, "delta", conditions[1:], bins)), ""]
        lines += ["### Accuracy (%)", "", to_markdown(_wide(multi, "accuracy", conditions, bins)), ""]
    else:
        lines += ["(no multi-tile images)", ""]
    lines += [
        "## Single-tile images (no thumbnail: the one tile counts as global, so view=local edits nothing)",
        "",
        to_markdown(_wide(single, "accuracy", conditions, bins)) if len(single) else "(none)",
        "",
    ]
    return "\n".join(lines)


def plot_views(long: pd.DataFrame, conditions: Sequence[str], labels: Sequence[str], path: Path, title: str) -> None:
    """Grouped bars per task: accuracy per size bin (and all), one bar per condition, deltas on top."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    multi = long[long["group"] == "multi_tile"]
    tasks = [t for t in ("localization", "classification") if t in set(multi["task"])]
    fig, axes = plt.subplots(1, max(len(tasks), 1), figsize=(5.5 * max(len(tasks), 1), 3.8), squeeze=False)
    colors = ["0.6", "tab:blue", "tab:orange", "tab:red", "tab:green", "tab:purple"]
    for ax, task in zip(axes[0], tasks):
        sub = multi[multi["task"] == task]
        bins = [b for b in [*labels, ALL] if b in set(sub["size_bin"])]
        width = 0.8 / len(conditions)
        for k, cond in enumerate(conditions):
            vals = [sub[(sub["size_bin"] == b) & (sub["condition"] == cond)] for b in bins]
            acc = [float(v["accuracy"].iloc[0]) if len(v) else np.nan for v in vals]
            xs = np.arange(len(bins)) + (k - (len(conditions) - 1) / 2) * width
            ax.bar(xs, acc, width, label=cond.replace("object_tokens:", ""), color=colors[k % len(colors)])
            if cond != BASELINE:
                for x, v, a in zip(xs, vals, acc):
                    if len(v) and np.isfinite(a):
                        ax.text(x, a + 1, f"{float(v['delta'].iloc[0]):+.1f}", ha="center", va="bottom", fontsize=7, rotation=90)
        n = sub[sub["condition"] == BASELINE].set_index("size_bin")["n"]
        ax.set_xticks(range(len(bins)), [f"{b}\n(n={int(n.get(b, 0))})" for b in bins])
        ax.set_ylim(0, 115)
        ax.set_ylabel("accuracy (%)")
        ax.set_title(task)
    if tasks:
        axes[0][0].legend(fontsize=8, loc="upper left", ncol=2)
    else:
        axes[0][0].text(0.5, 0.5, "no multi-tile images", ha="center", va="center", transform=axes[0][0].transAxes)
        axes[0][0].set_axis_off()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)


def write(
    results: pd.DataFrame,
    run_dir: Path,
    cfg: Any,
    *,
    names: Sequence[str],
    edges: Sequence[float],
    labels: Sequence[str],
) -> str:
    """Table 3 markdown and Fig. 10 from the stored rows; returns (and prints) the markdown.

    names: the conditions to report, baseline first; edges, labels: the size bins (left-closed
    edges of area_frac, one more label than edges).
    """
    run_dir = Path(run_dir)
    df = results[results["condition"].isin(list(names))]
    long = view_table(df, edges, labels)
    head = f"model={cfg.model.name} | data={cfg.data.name} | {run_dir}"
    text = table_markdown(long, names, edges, labels, head)
    atomic_write(run_dir / TABLE_FILE, lambda f: f.write(text.encode("utf-8")))
    if len(long):
        plot_views(long, names, labels, run_dir / FIG_FILE, f"View ablation (multi-tile images): model={cfg.model.name}, data={cfg.data.name}")
    print(f"\n{text}")
    return text
