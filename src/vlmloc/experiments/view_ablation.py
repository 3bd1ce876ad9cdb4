"""View ablation, InternVL only (Table 3, Fig. 10): object tokens of the global thumbnail vs the local crops.

Conditions: the clean model ("baseline") and ``object_tokens:view=<v>`` for v in global / local /
both: the object's tokens (any-pixel overlap, no padding) of that view are replaced at the LM
input with the mean visual embedding (``vlmloc.engine.mean_embedding``, cached on disk).
Results are split by object size: ``area_frac`` (mask area / image area) binned with
left-closed edges, by default COCO's small / medium / large (32^2 and 96^2 pixels) relative to a
640x480 image: 0.0033 and 0.03.

Images InternVL keeps as a single tile have no thumbnail; their one tile is labelled "global"
(so "global" and "both" ablate the same tokens and "local" ablates nothing). Their rows are
evaluated and stored (``has_thumbnail`` False) but reported in a separate section, never mixed into
the main table, whose heading gives their count.

Paper (InternVL-3.5-8B): global loc -36.4 / cls -9.5 points; local loc -9.7 / cls -6.6; large
objects lean on the global view (removing the local crops' object tokens even gains +6.5).

Outputs: ``results.parquet`` (extra columns ``view``, ``n_tiles``, ``has_thumbnail``,
``size_bin``), ``table3_view_ablation.md``, ``fig10_view_ablation.png``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from vlmloc.runner import RunContext
from vlmloc.conditions import BASELINE, Condition, ObjectTokens, Replace
from vlmloc.experiments.extension import layout_for_size
from vlmloc.models.layout import GLOBAL, LOCAL
from vlmloc.reports.tables import add_baseline_delta, summarize, to_markdown
from vlmloc.results import atomic_write

log = logging.getLogger("vlmloc.experiments.view_ablation")

VIEWS = (GLOBAL, LOCAL, "both")
TABLE_FILE = "table3_view_ablation.md"
FIG_FILE = "fig10_view_ablation.png"
ALL = "all"


def check_config(cfg: Any) -> None:
    """Fail fast, before data or model work: the experiment needs a model with global and local views."""
    family = str(cfg.model.family)
    if family != "internvl":
        raise ValueError(
            f"view_ablation needs a model with global and local views (InternVL); "
            f"model={cfg.model.name} is {family}"
        )
    edges = list(cfg.experiment.size_bins.edges)
    floor = cfg.data.get("filters", {}).get("min_area_frac")
    if edges and floor is not None and float(floor) >= float(edges[0]):
        log.warning("data.filters.min_area_frac=%s drops every object below the first size bin edge %s: the %r bin "
                    "will be empty (on COCO use data=coco_sizes, or lower data.filters.min_area_frac)",
                    floor, edges[0], str(cfg.experiment.size_bins.labels[0]))


def condition_name(view: str) -> str:
    return f"object_tokens:view={view}"


def view_conditions(views: Sequence[str] = VIEWS) -> list[Condition]:
    """The clean baseline plus one condition per view, replacing the object's tokens (p = 0) of that
    view ("global", "local" or "both") with the mean visual embedding; column `view` ("none" for baseline)."""
    conditions = [Condition(BASELINE.name, (), {"view": "none"})]
    for view in views:
        if view not in VIEWS:
            raise ValueError(f"unknown view {view!r} in experiment.views; expected a subset of {VIEWS}")
        tokens = ObjectTokens(0, None if view == "both" else view)
        conditions.append(Condition(condition_name(view), (Replace(tokens),), {"view": view}))
    return conditions


# --------------------------------------------------------------------------- size bins and tables


def check_bins(edges: Sequence[float], labels: Sequence[str]) -> tuple[list[float], list[str]]:
    edges, labels = [float(e) for e in edges], [str(s) for s in labels]
    if len(labels) != len(edges) + 1:
        raise ValueError(f"experiment.size_bins: {len(edges)} edges need {len(edges) + 1} labels, got {labels}")
    if any(b <= a for a, b in zip(edges, edges[1:])):
        raise ValueError(f"experiment.size_bins.edges must increase strictly, got {edges}")
    if ALL in labels or len(set(labels)) != len(labels):
        raise ValueError(f"experiment.size_bins.labels must be distinct and not {ALL!r}, got {labels}")
    return edges, labels


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
    counts = long[long["condition"] == BASELINE.name].groupby("size_bin")["n"].max()
    out = tab[present].reset_index()
    rank = {c: i for i, c in enumerate(conditions)}
    out = out[out["condition"].isin(rank)]
    out = out.sort_values(["task", "condition"], key=lambda s: s.map(rank) if s.name == "condition" else s)
    out.columns = ["task", "condition", *(f"{b} (n={int(counts.get(b, 0))})" for b in present)]
    return out.reset_index(drop=True)


def table_markdown(
    long: pd.DataFrame, conditions: Sequence[str], edges: Sequence[float], labels: Sequence[str], head: str
) -> str:
    bins = [*labels, ALL]
    lines = ["# View ablation (Table 3)", "", head, ""]
    multi = long[long["group"] == "multi_tile"]
    single = long[long["group"] == "single_tile"]
    n_single = int(single.loc[single["size_bin"] == ALL, "n"].max()) if len(single) else 0
    lines += [
        "Object tokens replaced with the mean visual embedding in the global thumbnail, the local crops, or both. "
        f"Size bins on area_frac = object area / image area, left-closed edges {list(edges)} -> {list(labels)}; n = objects per bin "
        "and task. Localization accuracy: mean over IoU 0.5/0.7/0.9 of the hit rates; classification: % yes.",
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
            if cond != BASELINE.name:
                for x, v, a in zip(xs, vals, acc):
                    if len(v) and np.isfinite(a):
                        ax.text(x, a + 1, f"{float(v['delta'].iloc[0]):+.1f}", ha="center", va="bottom", fontsize=7, rotation=90)
        n = sub[sub["condition"] == BASELINE.name].set_index("size_bin")["n"]
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


# --------------------------------------------------------------------------- run


def _settings(cfg: Any) -> tuple[list[str], list[str], list[float], list[str]]:
    exp = cfg.experiment
    views = [str(v) for v in exp.views]
    bad = [v for v in views if v not in VIEWS]
    if not views or bad or len(set(views)) != len(views):
        raise ValueError(f"experiment.views must be distinct values of {list(VIEWS)}, got {views}")
    tasks = [str(t) for t in exp.tasks]
    edges, labels = check_bins(exp.size_bins.edges, exp.size_bins.labels)
    return views, tasks, edges, labels


def run(ctx: RunContext) -> None:
    cfg = ctx.cfg
    check_config(cfg)
    views, tasks, edges, labels = _settings(cfg)
    conditions = view_conditions(views)
    size = {s.sample_id: (s.width, s.height) for s in ctx.samples}
    tiles: dict[tuple[int, int], int] = {}

    def n_tiles(sid: str) -> int:
        if size[sid] not in tiles:
            tiles[size[sid]] = layout_for_size(ctx.adapter, *size[sid]).n_tiles
        return tiles[size[sid]]

    def view_columns(df: pd.DataFrame) -> pd.DataFrame:
        df["n_tiles"] = df["sample_id"].map(n_tiles).astype("int64")
        df["has_thumbnail"] = df["n_tiles"] > 1
        df["size_bin"] = size_bins(df["area_frac"], edges, labels)
        return df

    def provenance() -> dict:
        mean = ctx.resources["mean_embedding"]
        return {"mean_embedding": {"norm": float(mean.float().norm()), "hidden": int(mean.shape[0])}}

    results = ctx.run_conditions(conditions, tasks, columns=view_columns, provenance=provenance)
    report(results, ctx.run_dir, names=[c.name for c in conditions], edges=edges, labels=labels, cfg=cfg)


def report(df: pd.DataFrame, run_dir: Path, *, names: Sequence[str], edges: Sequence[float], labels: Sequence[str], cfg: Any) -> str:
    """Table 3 markdown and Fig. 10 from the stored rows; returns (and prints) the markdown."""
    run_dir = Path(run_dir)
    df = df[df["condition"].isin(list(names))]
    long = view_table(df, edges, labels)
    head = f"model={cfg.model.name} | data={cfg.data.name} | {run_dir}"
    text = table_markdown(long, names, edges, labels, head)
    atomic_write(run_dir / TABLE_FILE, lambda f: f.write(text.encode("utf-8")))
    if len(long):
        plot_views(long, names, labels, run_dir / FIG_FILE, f"View ablation (multi-tile images): model={cfg.model.name}, data={cfg.data.name}")
    print(f"\n{text}")
    return text
