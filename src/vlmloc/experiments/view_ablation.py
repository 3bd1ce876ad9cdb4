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
``size_bin``), ``table3_view_ablation.md``, ``fig10_view_ablation.png`` (``vlmloc.reports.view_ablation``,
from the rows alone).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
from omegaconf import MISSING

from vlmloc.conditions import BASELINE, Condition, ObjectTokens, Replace
from vlmloc.experiments.extension import layout_for_size
from vlmloc.models.layout import GLOBAL, LOCAL
from vlmloc.reports import view_ablation as view_report
from vlmloc.reports.view_ablation import ALL, size_bins
from vlmloc.results import TASKS
from vlmloc.runner import RunContext
from vlmloc.settings import load, register, subset_of
from vlmloc.paraphrases import Paraphrased

log = logging.getLogger("vlmloc.experiments.view_ablation")

VIEWS = (GLOBAL, LOCAL, "both")



# --------------------------------------------------------------------------- config


def check_bins(edges: Sequence[float], labels: Sequence[str]) -> tuple[list[float], list[str]]:
    """The size bins as floats and strings: one more label than edges, edges increasing, labels distinct."""
    edges, labels = [float(e) for e in edges], [str(s) for s in labels]
    if len(labels) != len(edges) + 1:
        raise ValueError(f"experiment.size_bins: {len(edges)} edges need {len(edges) + 1} labels, got {labels}")
    if any(b <= a for a, b in itertools.pairwise(edges)):
        raise ValueError(f"experiment.size_bins.edges must increase strictly, got {edges}")
    if ALL in labels or len(set(labels)) != len(labels):
        raise ValueError(f"experiment.size_bins.labels must be distinct and not {ALL!r}, got {labels}")
    return edges, labels


@dataclass(frozen=True)
class SizeBins:
    """experiment.size_bins: left-closed bin edges on area_frac and one more label than edges."""

    edges: tuple[float, ...] = MISSING
    labels: tuple[str, ...] = MISSING

    def __post_init__(self) -> None:
        check_bins(self.edges, self.labels)


@register("view_ablation")
@dataclass(frozen=True)
class Settings(Paraphrased):
    """experiment.* of configs/experiment/view_ablation.yaml, typed and checked."""

    name: str = MISSING
    views: tuple[str, ...] = MISSING
    tasks: tuple[str, ...] = MISSING
    size_bins: SizeBins = MISSING

    def __post_init__(self) -> None:
        subset_of("experiment.views", self.views, VIEWS, distinct=True)
        subset_of("experiment.tasks", self.tasks, TASKS)


def settings(cfg: Any) -> Settings:
    """experiment.* of `cfg` as Settings; a bad value is a ConfigError naming its key."""
    return load(Settings, cfg)


def check_config(cfg: Any) -> None:
    """Fail fast, before data or model work: valid settings, a model with global and local views."""
    st = settings(cfg)
    family = str(cfg.model.family)
    if family != "internvl":
        raise ValueError(
            f"view_ablation needs a model with global and local views (InternVL); "
            f"model={cfg.model.name} is {family}"
        )
    edges = st.size_bins.edges
    floor = cfg.data.get("filters", {}).get("min_area_frac")
    if edges and floor is not None and float(floor) >= float(edges[0]):
        log.warning("data.filters.min_area_frac=%s drops every object below the first size bin edge %s: the %r bin "
                    "will be empty (on COCO use data=coco_sizes, or lower data.filters.min_area_frac)",
                    floor, edges[0], st.size_bins.labels[0])


# --------------------------------------------------------------------------- conditions


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


# --------------------------------------------------------------------------- run


def run(ctx: RunContext) -> None:
    cfg = ctx.cfg
    check_config(cfg)  # run() may be called without the app, which checks first
    st = settings(cfg)
    views, tasks = list(st.views), list(st.tasks)
    edges, labels = list(st.size_bins.edges), list(st.size_bins.labels)
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

    ctx.run_conditions(conditions, tasks, columns=view_columns, provenance=provenance)


def report(ctx: RunContext, results: pd.DataFrame) -> None:
    st = settings(ctx.cfg)
    view_report.write(results, ctx.run_dir, ctx.cfg, names=[c.name for c in view_conditions(list(st.views))],
                      edges=list(st.size_bins.edges), labels=list(st.size_bins.labels))
