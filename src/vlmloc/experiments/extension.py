"""Object extension (Fig. 1, 8, 9): grow the object region by p token rings filled with object tokens.

For every sample and padding level p the ring ``object_tokens(mask, p) & ~object_tokens(mask, 0)``
(per view: LLaVA's one grid; InternVL's local crops AND its thumbnail, both grow) is filled at the
LM input with copies of the object's own tokens, drawn with replacement from the same view by
``row_rng(seed, sample_id, "extension", p)`` (so the thumbnail ring copies thumbnail object
tokens, and a sample draws the same tokens in any batch and for every task). p = 0 is the clean
model, named ``baseline``; p > 0 conditions are ``extension:p=<p>``. Rings are the same p-ring
growth as the padded object tokens of Table 1 (8-neighbourhood, clipped at the grid border), so on
LLaVA's padded square a ring may reach into the padding border; the grown GT box is always
clipped to the image.

The paper's matrix: padding level p x ground-truth box scale -> localization accuracy. Scale
level q grows the GT box by q token cells on every side and clips it to the image; equivalently
it scales the box about its centre by (w + 2 q cell_w) / w in x and (h + 2 q cell_h) / h in y.
The cell (``experiment.cell``) is, in original-image pixels, that of the global view's grid
("global", the default: LLaVA's one 24x24 grid, S/24 for the padded square; InternVL's thumbnail,
W/16 by H/16, or the single tile when there is no thumbnail) or of the finest grid ("local":
InternVL's local-crop canvas, W / (n_cols * 16) by H / (n_rows * 16)). The paper states no
scale factors; q = p is the box an ideal "containerising" model would answer when its boxes
come from that view, and Table 3 finds InternVL's localization in the global view, hence the
default (a thumbnail ring is several local cells wide). Accuracy is the paper's metric (mean
over IoU thresholds 0.5 / 0.7 / 0.9 of the hit rates) of the predicted box against the scaled GT
box. The diagonal dominating means the predicted box grows with the extension.

Every result row carries ``pad``, the cell's grid (``grid_view``, ``grid_x0..grid_y1``,
``grid_rows``, ``grid_cols``) and its cell size (``cell_w``, ``cell_h``) next to ``pred_box`` and
``gt_box``, so the matrix and the example figure (``vlmloc.reports.extension``) are rebuilt from
the parquet (and the images) alone, without the model; the box and grid arithmetic they share is
``vlmloc.extension_geometry``.

Outputs in the run directory: ``results.parquet``, ``extension_matrix.md`` (the matrix plus the
summary table), ``fig8_extension_matrix.png`` (annotated heatmap) and
``fig9_extension_examples.png`` (images with the extended token mask, the scaled GT box and the
predicted box).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from omegaconf import MISSING

from vlmloc.conditions import BASELINE, Condition, Extend
from vlmloc.extension_geometry import GRID_COLUMNS, finest_grid, grid_record
from vlmloc.models.adapter import VLMAdapter
from vlmloc.models.layout import GLOBAL, VisualLayout
from vlmloc.reports import extension as extension_report
from vlmloc.results import TASKS
from vlmloc.runner import RunContext
from vlmloc.settings import at_least, load, one_of, register, subset_of
from vlmloc.paraphrases import Paraphrased

NAME = "extension"
CELLS = ("global", "local")


# --------------------------------------------------------------------------- config


def _distinct_at_least_zero(key: str, values: Sequence[int]) -> None:
    if not values or any(v < 0 for v in values) or len(set(values)) != len(values):
        raise ValueError(f"{key} must be distinct integers >= 0, got {list(values)}")


@register(NAME)
@dataclass(frozen=True)
class Settings(Paraphrased):
    """experiment.* of configs/experiment/extension.yaml, typed and checked."""

    name: str = MISSING
    pads: tuple[int, ...] = MISSING
    scale_levels: tuple[int, ...] = MISSING
    cell: str = MISSING
    tasks: tuple[str, ...] = MISSING
    n_examples: int = MISSING

    def __post_init__(self) -> None:
        _distinct_at_least_zero("experiment.pads", self.pads)
        _distinct_at_least_zero("experiment.scale_levels", self.scale_levels)
        subset_of("experiment.tasks", self.tasks, TASKS)
        if "localization" not in self.tasks:
            raise ValueError(f"experiment.tasks must include localization (the matrix is built from boxes), "
                             f"got {list(self.tasks)}")
        one_of("experiment.cell", self.cell, CELLS)
        at_least("experiment.n_examples", self.n_examples, 0)


def settings(cfg: Any) -> Settings:
    """experiment.* of `cfg` as Settings; a bad value is a ConfigError naming its key."""
    return load(Settings, cfg)


# --------------------------------------------------------------------------- conditions


def condition_name(p: int) -> str:
    """p = 0 is the clean model ("baseline"), so the summary's deltas and other runs line up."""
    return BASELINE.name if p == 0 else f"{NAME}:p={p}"


def extension_conditions(seed: int, pads: Sequence[int]) -> list[Condition]:
    """One condition per padding level (p = 0: the clean model); column `pad` on every row."""
    out = []
    for p in (int(p) for p in pads):
        if p < 0:
            raise ValueError(f"extension needs p >= 0, got {p}")
        out.append(Condition(condition_name(p), (Extend(p, seed, (NAME, p)),) if p else (), {"pad": p}))
    return out


# --------------------------------------------------------------------------- the cell that grows the GT box


def layout_for_size(adapter: VLMAdapter, width: int, height: int) -> VisualLayout:
    """The layout an image of this size gets, without running the processor (positions 0..n-1).

    Grids, views and tiles depend only on the image size; sequence positions are placeholders.
    """
    n = adapter.n_visual_tokens(int(width), int(height))
    ids = torch.full((n,), adapter.image_token_id, dtype=torch.long)
    return adapter.layout(ids, int(width), int(height))


def grid_columns(layout: VisualLayout, cell: str = "global") -> dict[str, Any]:
    """Result columns `GRID_COLUMNS` of the grid whose cell grows the GT box: "global", the global
    view's grid (InternVL's thumbnail, or its single tile; LLaVA's one grid), or "local", the finest
    grid (InternVL's local canvas)."""
    if cell not in CELLS:
        raise ValueError(f"experiment.cell must be one of {list(CELLS)}, got {cell!r}")
    view, grid = (GLOBAL, layout.grids[GLOBAL]) if cell == "global" else finest_grid(layout.grids)
    return grid_record(view, grid)


# --------------------------------------------------------------------------- run


def run(ctx: RunContext) -> None:
    cfg = ctx.cfg
    st = settings(cfg)
    pads, tasks, cell = list(st.pads), list(st.tasks), st.cell
    geo: dict[str, dict[str, Any]] = {}

    def grid_columns_of(df: pd.DataFrame) -> pd.DataFrame:
        for sid in set(df["sample_id"]) - set(geo):
            s = next(s for s in ctx.samples if s.sample_id == sid)
            geo[sid] = grid_columns(layout_for_size(ctx.adapter, s.width, s.height), cell)
        for col in GRID_COLUMNS:
            df[col] = df["sample_id"].map(lambda sid, col=col: geo[sid][col])
        return df

    ctx.run_conditions(extension_conditions(int(cfg.seed), pads), tasks, columns=grid_columns_of)


def report(ctx: RunContext, results: pd.DataFrame) -> None:
    st = settings(ctx.cfg)
    extension_report.write(results, ctx.run_dir, ctx.cfg, names={int(p): condition_name(int(p)) for p in st.pads},
                           levels=list(st.scale_levels), samples=ctx.samples, n_examples=st.n_examples)
