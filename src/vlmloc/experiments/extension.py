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
``gt_box``, so the matrix and the example figure are rebuilt from the parquet (and the images)
alone, without the model.

Outputs in the run directory: ``results.parquet``, ``extension_matrix.md`` (the matrix plus the
summary table), ``fig8_extension_matrix.png`` (annotated heatmap) and
``fig9_extension_examples.png`` (images with the extended token mask, the scaled GT box and the
predicted box).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from vlmloc import geometry
from vlmloc.runner import RunContext
from vlmloc.data.sample import Sample
from vlmloc.conditions import BASELINE, Condition, Extend
from vlmloc.evaluation import IOU_THRESHOLDS
from vlmloc.models.adapter import VLMAdapter
from vlmloc.models.layout import GLOBAL, VisualLayout
from vlmloc.reports.tables import add_baseline_delta, summarize, to_markdown
from vlmloc.results import atomic_write

log = logging.getLogger("vlmloc.experiments.extension")

NAME = "extension"
MATRIX_FILE = "extension_matrix.md"
MATRIX_FIG = "fig8_extension_matrix.png"
EXAMPLES_FIG = "fig9_extension_examples.png"
GRID_COLUMNS = ("grid_view", "grid_x0", "grid_y0", "grid_x1", "grid_y1", "grid_rows", "grid_cols", "cell_w", "cell_h")


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


# --------------------------------------------------------------------------- geometry of the matrix


def layout_for_size(adapter: VLMAdapter, width: int, height: int) -> VisualLayout:
    """The layout an image of this size gets, without running the processor (positions 0..n-1).

    Grids, views and tiles depend only on the image size; sequence positions are placeholders.
    """
    n = adapter.n_visual_tokens(int(width), int(height))
    ids = torch.full((n,), adapter.image_token_id, dtype=torch.long)
    return adapter.layout(ids, int(width), int(height))


def finest_grid(layout: VisualLayout) -> tuple[str, geometry.TokenGrid]:
    """(view name, grid) of the layout's grid with the smallest cell area (InternVL: the local canvas)."""

    def cell_area(item: tuple[str, geometry.TokenGrid]) -> tuple[float, str]:
        g = item[1]
        return ((g.x1 - g.x0) / g.cols * (g.y1 - g.y0) / g.rows, item[0])

    return min(layout.grids.items(), key=cell_area)


CELLS = ("global", "local")


def cell_grid(layout: VisualLayout, cell: str) -> tuple[str, geometry.TokenGrid]:
    """(view name, grid) whose cell grows the GT box: "global", the global view's grid (InternVL's
    thumbnail, or its single tile; LLaVA's one grid), or "local", the finest grid (the local canvas)."""
    if cell not in CELLS:
        raise ValueError(f"experiment.cell must be one of {list(CELLS)}, got {cell!r}")
    return (GLOBAL, layout.grids[GLOBAL]) if cell == "global" else finest_grid(layout)


def grid_columns(layout: VisualLayout, cell: str = "global") -> dict[str, Any]:
    """The grid whose cell grows the GT box (`cell_grid`) and that cell's size in original pixels,
    as result columns."""
    view, g = cell_grid(layout, cell)
    return {
        "grid_view": view,
        "grid_x0": float(g.x0),
        "grid_y0": float(g.y0),
        "grid_x1": float(g.x1),
        "grid_y1": float(g.y1),
        "grid_rows": int(g.rows),
        "grid_cols": int(g.cols),
        "cell_w": (g.x1 - g.x0) / g.cols,
        "cell_h": (g.y1 - g.y0) / g.rows,
    }


def grow_box(xyxy: Sequence[float], q: float, cell_w: float, cell_h: float, width: int, height: int) -> geometry.Box:
    """The box grown by q token cells on every side, clipped to the image.

    The same as scaling about the centre by (w + 2 q cell_w) / w in x and (h + 2 q cell_h) / h in y.
    """
    x1, y1, x2, y2 = (float(v) for v in xyxy)
    dx, dy = q * float(cell_w), q * float(cell_h)
    return geometry.clip_box((x1 - dx, y1 - dy, x2 + dx, y2 + dy), width, height)


def _area(b: Sequence[float]) -> float:
    return max(float(b[2]) - float(b[0]), 0.0) * max(float(b[3]) - float(b[1]), 0.0)


def paper_accuracy(pred: Sequence[float] | None, gt: Sequence[float]) -> float:
    """Mean over the IoU thresholds of the hits, in % (one row's share of the paper's accuracy)."""
    iou = geometry.box_iou(None if _missing_box(pred) else pred, gt)
    return 100.0 * float(np.mean([iou >= t for t in IOU_THRESHOLDS]))


def _missing_box(box: Any) -> bool:
    return box is None or (np.ndim(box) == 0 and pd.isna(box))


def extension_matrix(df: pd.DataFrame, levels: Sequence[int]) -> pd.DataFrame:
    """Localization rows -> one row per pad: n, accuracy vs the GT grown by q cells for each level
    (columns ``q=<q>``), the mean linear scale factor of each level (``scale_q=<q>``: sqrt of the
    clipped grown-box area over the GT area), ``best_q`` and ``pred_gt_size`` (median
    sqrt(pred area / GT area) over parsed predictions)."""
    loc = df[df["task"] == "localization"]
    out = []
    for pad, rows in loc.groupby("pad", sort=True):
        rec: dict[str, Any] = {"pad": int(pad), "condition": condition_name(int(pad)), "n": len(rows)}
        accs = {}
        for q in levels:
            per_row, scales = [], []
            for r in rows.itertuples(index=False):
                grown = grow_box(r.gt_box, q, r.cell_w, r.cell_h, r.width, r.height)
                per_row.append(paper_accuracy(r.pred_box, grown))
                scales.append(math.sqrt(_area(grown) / _area(r.gt_box)) if _area(r.gt_box) > 0 else math.nan)
            accs[q] = float(np.mean(per_row))
            rec[f"q={q}"] = accs[q]
            rec[f"scale_q={q}"] = float(np.nanmean(scales)) if len(scales) else math.nan
        top = max(accs.values())
        winners = [q for q in levels if accs[q] == top]
        rec["best_q"] = winners[0] if len(winners) == 1 else pd.NA  # a tie (e.g. all 0) names no level
        ratios = [
            math.sqrt(_area(r.pred_box) / _area(r.gt_box))
            for r in rows.itertuples(index=False)
            if not _missing_box(r.pred_box) and _area(r.gt_box) > 0
        ]
        rec["pred_gt_size"] = float(np.median(ratios)) if ratios else math.nan
        out.append(rec)
    matrix = pd.DataFrame(out)
    if len(matrix):
        matrix["best_q"] = matrix["best_q"].astype("Int64")
    return matrix


def matrix_markdown(matrix: pd.DataFrame, levels: Sequence[int]) -> str:
    """The matrix as markdown: columns labelled with q and its mean scale factor."""
    table = pd.DataFrame({"pad": matrix["pad"], "condition": matrix["condition"], "n": matrix["n"]})
    for q in levels:
        table[f"GT+{q} (x{matrix[f'scale_q={q}'].mean():.2f})"] = matrix[f"q={q}"]
    table["best q"] = matrix["best_q"]
    table["pred/GT size"] = matrix["pred_gt_size"]
    return to_markdown(table)


# --------------------------------------------------------------------------- figures


def plot_matrix(matrix: pd.DataFrame, levels: Sequence[int], path: Path, title: str) -> None:
    """Annotated heatmap: rows = padding p, columns = GT scale level q."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = matrix[[f"q={q}" for q in levels]].to_numpy(dtype=float)
    fig, ax = plt.subplots(figsize=(1.3 * len(levels) + 2.2, 1.0 * len(matrix) + 1.6))
    im = ax.imshow(values, cmap="viridis", vmin=0, vmax=100)
    ax.set_xticks(range(len(levels)), [f"+{q}\n(x{matrix[f'scale_q={q}'].mean():.2f})" for q in levels])
    ax.set_yticks(range(len(matrix)), [f"p={p}" for p in matrix["pad"]])
    ax.set_xlabel("GT box grown by q token cells (mean scale factor)")
    ax.set_ylabel("object extended by p tokens")
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            v = values[i, j]
            ax.text(j, i, f"{v:.1f}", ha="center", va="center", color="black" if v > 60 else "white", fontsize=10)
    fig.colorbar(im, ax=ax, label="localization accuracy (%)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    _save(fig, path)


def _save(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)


def pick_examples(loc: pd.DataFrame, samples: Sequence[Sample], pads: Sequence[int], n: int) -> list[Sample]:
    """Up to n samples with a localization row for every pad; parsed predictions first, then data order."""
    by_id = {s.sample_id: s for s in samples}
    order = {s.sample_id: i for i, s in enumerate(samples)}
    cand = []
    for sid, rows in loc.groupby("sample_id"):
        if sid in by_id and set(int(p) for p in pads) <= set(rows["pad"].astype(int)):
            cand.append((-int(rows["pred_box"].notna().sum()), order[sid], sid))
    return [by_id[sid] for *_, sid in sorted(cand)[: max(int(n), 0)]]


def plot_examples(loc: pd.DataFrame, examples: Sequence[Sample], pads: Sequence[int], path: Path, title: str) -> None:
    """One row per example, one panel per p: object tokens (blue) and the added ring (orange) on the
    finest grid, GT grown by q = p cells (green; dashed: the original GT) and the prediction (red)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch, Rectangle

    n_rows, n_cols = max(len(examples), 1), len(pads)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(3.2 * n_cols, 3.0 * n_rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, sample in enumerate(examples):
        image = np.asarray(sample.load_image())
        mask = sample.mask()
        rows = loc[loc["sample_id"] == sample.sample_id].set_index("pad")
        for j, p in enumerate(pads):
            ax = axes[i, j]
            r = rows.loc[int(p)]
            grid = geometry.TokenGrid(r.grid_x0, r.grid_y0, r.grid_x1, r.grid_y1, int(r.grid_rows), int(r.grid_cols))
            obj = geometry.grid_mask(mask, grid)
            ring = geometry.pad_token_mask(obj, int(p)) & ~obj
            overlay = np.zeros((*obj.shape, 4))
            overlay[obj] = (0.1, 0.3, 1.0, 0.35)
            overlay[ring] = (1.0, 0.55, 0.0, 0.5)
            ax.imshow(image)
            ax.imshow(overlay, extent=(grid.x0, grid.x1, grid.y1, grid.y0), interpolation="nearest")
            ax.set_xlim(0, sample.width)
            ax.set_ylim(sample.height, 0)
            gt = r.gt_box
            grown = grow_box(gt, int(p), r.cell_w, r.cell_h, sample.width, sample.height)
            if int(p) != 0:
                ax.add_patch(Rectangle(gt[:2], gt[2] - gt[0], gt[3] - gt[1], fill=False, ec="lime", lw=1, ls="--"))
            ax.add_patch(Rectangle(grown[:2], grown[2] - grown[0], grown[3] - grown[1], fill=False, ec="lime", lw=2))
            pred = r.pred_box
            if not _missing_box(pred):
                ax.add_patch(Rectangle(pred[:2], pred[2] - pred[0], pred[3] - pred[1], fill=False, ec="red", lw=2))
            iou = geometry.box_iou(None if _missing_box(pred) else pred, grown)
            ax.set_title(f"{sample.category} p={p}: IoU(pred, GT+{p})={iou:.2f}", fontsize=8)
    handles = [
        Patch(fc=(0.1, 0.3, 1.0, 0.35), label="object tokens"),
        Patch(fc=(1.0, 0.55, 0.0, 0.5), label="extension ring"),
        Patch(fill=False, ec="lime", lw=2, label="GT grown by p cells"),
        Patch(fill=False, ec="red", lw=2, label="predicted box"),
    ]
    fig.legend(handles=handles, loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.04, 1, 0.97))
    _save(fig, path)


# --------------------------------------------------------------------------- run


def _settings(cfg: Any) -> tuple[list[int], list[int], list[str], int, str]:
    exp = cfg.experiment
    pads = [int(p) for p in exp.pads]
    levels = [int(q) for q in exp.scale_levels]
    tasks = [str(t) for t in exp.tasks]
    if not pads or any(p < 0 for p in pads) or len(set(pads)) != len(pads):
        raise ValueError(f"experiment.pads must be distinct integers >= 0, got {pads}")
    if not levels or any(q < 0 for q in levels) or len(set(levels)) != len(levels):
        raise ValueError(f"experiment.scale_levels must be distinct integers >= 0, got {levels}")
    if "localization" not in tasks:
        raise ValueError(f"experiment.tasks must include localization (the matrix is built from boxes), got {tasks}")
    if str(exp.cell) not in CELLS:
        raise ValueError(f"experiment.cell must be one of {list(CELLS)}, got {exp.cell!r}")
    return pads, levels, tasks, int(exp.n_examples), str(exp.cell)


def run(ctx: RunContext) -> None:
    cfg = ctx.cfg
    pads, levels, tasks, n_examples, cell = _settings(cfg)
    geo: dict[str, dict[str, Any]] = {}

    def grid_columns_of(df: pd.DataFrame) -> pd.DataFrame:
        for sid in set(df["sample_id"]) - set(geo):
            s = next(s for s in ctx.samples if s.sample_id == sid)
            geo[sid] = grid_columns(layout_for_size(ctx.adapter, s.width, s.height), cell)
        for col in GRID_COLUMNS:
            df[col] = df["sample_id"].map(lambda sid, col=col: geo[sid][col])
        return df

    results = ctx.run_conditions(extension_conditions(int(cfg.seed), pads), tasks, columns=grid_columns_of)
    report(results, ctx.samples, ctx.run_dir, pads=pads, levels=levels, n_examples=n_examples, cfg=cfg)


def report(
    df: pd.DataFrame,
    samples: Sequence[Sample],
    run_dir: Path,
    *,
    pads: Sequence[int],
    levels: Sequence[int],
    n_examples: int,
    cfg: Any,
) -> str:
    """Matrix markdown and both figures from the stored rows; returns (and prints) the markdown."""
    run_dir = Path(run_dir)
    df = df[df["pad"].isin(list(pads))] if "pad" in df.columns else df.iloc[0:0]
    matrix = extension_matrix(df, levels)
    head = f"model={cfg.model.name} | data={cfg.data.name} | {run_dir}"
    summary = to_markdown(add_baseline_delta(summarize(df)))
    text = "\n".join(
        [
            "# Object extension (Fig. 8)",
            "",
            head,
            "",
            "Rows: the object's token region grown by p rings filled with the object's own tokens "
            "(p = 0: clean model). Columns: localization accuracy (%, mean over IoU 0.5/0.7/0.9) of the "
            "predicted box against the ground-truth box grown by q cells of the finest token grid on "
            "every side and clipped to the image (mean linear scale factor in brackets). best q: the "
            "column with the highest accuracy (blank on a tie); pred/GT size: median sqrt(predicted area / GT area).",
            "",
            matrix_markdown(matrix, levels) if len(matrix) else "(no localization rows)",
            "",
            "## Summary (vs the GT box)",
            "",
            summary,
            "",
        ]
    )
    atomic_write(run_dir / MATRIX_FILE, lambda f: f.write(text.encode("utf-8")))
    if len(matrix):
        title = f"Object extension: model={cfg.model.name}, data={cfg.data.name}, n={int(matrix['n'].max())}"
        plot_matrix(matrix, levels, run_dir / MATRIX_FIG, title)
        loc = df[df["task"] == "localization"]
        examples = pick_examples(loc, samples, pads, n_examples)
        if examples:
            plot_examples(loc, examples, sorted(pads), run_dir / EXAMPLES_FIG, f"Object extension examples: {cfg.model.name}")
    print(f"\n{text}")
    return text
