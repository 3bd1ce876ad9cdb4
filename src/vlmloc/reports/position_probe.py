"""Position-probe report (paper Fig. 2 and 11), rebuilt from the experiment's two result frames.

    table = write(acc, run_dir, cfg, per_position=per_pos, heatmap_stages=["vision.last", ...])

`acc` is probe_accuracy.parquet (one row per stage x target x view: stage, stage_index, kind,
view, target, accuracy, chance, ...), `per_pos` is per_position.parquet (one row per grid cell:
stage, target, view, row, col, accuracy, ...). Writes fig2_position_probe.png (accuracy per
stage), fig11_heatmaps.png (per-position accuracy grids) and summary.md (accuracy per stage and
target), and prints the table with the run's identity.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from vlmloc.reports.tables import to_markdown
from vlmloc.results import atomic_write

FIG2_FILE = "fig2_position_probe.png"
FIG11_FILE = "fig11_heatmaps.png"
SUMMARY_FILE = "summary.md"

# Stage kinds as the result rows' `kind` column spells them (the capture's stage kinds).
VISION, PROJECTOR, LLM = "vision", "projector", "llm"


def _main_target(df: pd.DataFrame) -> str:
    return "position" if "position" in set(df["target"]) else "row_col"


def position_grid(per_position: pd.DataFrame, stage: str, target: str, view: str = "all") -> np.ndarray:
    """[G, G] per-position accuracy of one probe: token (r, c) lands at [r, c]; NaN where unseen."""
    df = per_position[(per_position.stage == stage) & (per_position.target == target) & (per_position.view == view)]
    if df.empty:
        raise KeyError(f"no per-position scores for stage={stage} target={target} view={view}")
    g = int(max(df["row"].max(), df["col"].max())) + 1
    grid = np.full((g, g), np.nan)
    grid[df["row"].to_numpy(), df["col"].to_numpy()] = df["accuracy"].to_numpy()
    return grid


def plot_accuracy(acc: pd.DataFrame, title: str = ""):
    """Fig. 2: accuracy per stage (x in model order), chance per stage, vision / projector / LLM marked."""
    from matplotlib.figure import Figure

    stages = acc.drop_duplicates("stage").sort_values("stage_index")
    n = len(stages)
    fig = Figure(figsize=(max(6.0, 0.16 * n + 2.5), 3.8), layout="constrained")
    ax = fig.add_subplot()
    styles = {"all": "-", "global": "--", "local": ":"}
    for (target, view), d in acc.sort_values("stage_index").groupby(["target", "view"], sort=False):
        main = target == _main_target(acc)
        ax.plot(d["stage_index"], d["accuracy"], styles.get(view, "-."), marker="o", ms=3 if main else 2,
                lw=1.6 if main else 0.9, label=f"{target}" + ("" if view == "all" else f" ({view})"))
    chance = acc[acc.target == _main_target(acc)].drop_duplicates("stage").sort_values("stage_index")
    ax.step(chance["stage_index"], chance["chance"], where="mid", color="grey", ls="--", lw=0.9, label="chance")
    for kind, colour in ((VISION, "tab:blue"), (PROJECTOR, "tab:orange"), (LLM, "tab:green")):
        idx = stages.loc[stages.kind == kind, "stage_index"]
        if len(idx):
            ax.axvspan(idx.min() - 0.5, idx.max() + 0.5, color=colour, alpha=0.08, lw=0)
            label = {VISION: "vision encoder", PROJECTOR: "proj.", LLM: "LLM"}[kind]
            ax.text((idx.min() + idx.max()) / 2, 1.04, label, ha="center", va="bottom", fontsize=8,
                    transform=ax.get_xaxis_transform())
    labels = ["P" if k == PROJECTOR else s.split(".")[1] for s, k in zip(stages["stage"], stages["kind"])]
    step = max(1, n // 40)
    ticks = [i for i in range(n) if i % step == 0 or stages["kind"].iloc[i] == PROJECTOR]
    ax.set_xticks(stages["stage_index"].iloc[ticks], [labels[i] for i in ticks], fontsize=7)
    ax.set_xlim(stages["stage_index"].min() - 0.7, stages["stage_index"].max() + 0.7)
    ax.set_ylim(0, 1.0)
    ax.set_xlabel("stage (vision layer | projector | LLM layer)")
    ax.set_ylabel("test accuracy")
    ax.legend(fontsize=7, loc="upper right", ncols=2)
    if title:
        fig.suptitle(title, fontsize=9)
    return fig


def plot_heatmaps(per_position: pd.DataFrame, stage_names: Sequence[str], title: str = ""):
    """Fig. 11: per-position accuracy grids (cell [r, c] = token at row r, column c), one column
    per stage, one row per view ("all", then global / local where a stage saw both)."""
    from matplotlib.figure import Figure

    target = _main_target(per_position)
    views = ["all"] + sorted(set(per_position["view"]) - {"all"})
    fig = Figure(figsize=(2.6 * len(stage_names) + 0.8, 2.6 * len(views) + 0.4), layout="constrained")
    axes = fig.subplots(len(views), len(stage_names), squeeze=False)
    im = None
    for i, view in enumerate(views):
        for j, stage in enumerate(stage_names):
            ax = axes[i][j]
            try:
                grid = position_grid(per_position, stage, target, view)
            except KeyError:
                ax.set_axis_off()
                continue
            im = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="viridis", interpolation="nearest")
            name = stage if view == "all" else f"{stage} ({view})"
            ax.set_title(f"{name}\nacc {np.nanmean(grid):.2f}", fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
    if im is not None:
        fig.colorbar(im, ax=axes, shrink=0.8, label=f"{target} accuracy")
    if title:
        fig.suptitle(title, fontsize=9)
    return fig


def summary_table(acc: pd.DataFrame) -> str:
    """Markdown: one row per stage, one accuracy column per target (and view where there are several)."""
    views = sorted(set(acc["view"]))
    key = acc["target"] if views == ["all"] else acc["target"] + "/" + acc["view"]
    wide = acc.assign(col=key).pivot_table(
        index=["stage_index", "stage", "kind"], columns="col", values="accuracy", sort=False)
    chance = acc[acc.target == _main_target(acc)].drop_duplicates("stage").set_index("stage")["chance"]
    wide = wide.reset_index().sort_values("stage_index")
    wide["chance"] = wide["stage"].map(chance)
    return to_markdown(wide.drop(columns="stage_index").reset_index(drop=True), digits=3)


def _save_figure(fig: Any, path: Path) -> None:
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=130))


def write(
    results: pd.DataFrame, run_dir: Path, cfg: Any, *, per_position: pd.DataFrame, heatmap_stages: Sequence[str]
) -> str:
    """Fig. 2, Fig. 11 and summary.md of a run into `run_dir`; prints and returns the markdown table.

    `results`: the probe accuracy rows; `per_position`: the per-grid-cell rows; `heatmap_stages`:
    the stage names of Fig. 11's columns, in order. `cfg` names the run (experiment, model, data).
    """
    run_dir = Path(run_dir)
    title = f"position probes | model={cfg.model.name} | data={cfg.data.name}"
    _save_figure(plot_accuracy(results, title), run_dir / FIG2_FILE)
    _save_figure(plot_heatmaps(per_position, heatmap_stages, title), run_dir / FIG11_FILE)
    table = summary_table(results)
    atomic_write(run_dir / SUMMARY_FILE, lambda f: f.write((table + "\n").encode()))
    print(f"\n{cfg.experiment.name} | model={cfg.model.name} | data={cfg.data.name} | {run_dir}\n{table}")
    return table
