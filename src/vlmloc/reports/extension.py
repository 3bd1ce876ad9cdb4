"""Report of the object-extension experiment (Fig. 1, 8, 9), rebuilt from its result rows alone.

The matrix: padding level p x ground-truth scale level q -> localization accuracy (the paper's
metric: mean over IoU 0.5 / 0.7 / 0.9 of the hit rates) of the predicted box against the GT box
grown by q cells of the row's recorded grid (``cell_w``, ``cell_h``) and clipped to the image. The
example figure draws the object's token mask on the recorded grid (``grid_x0`` .. ``grid_cols``),
so it needs the sample images but never the model.

Files written into the run directory: ``extension_matrix.md`` (the matrix plus the summary table),
``fig8_extension_matrix.png`` (annotated heatmap) and ``fig9_extension_examples.png`` (images with
the extended token mask, the grown GT box and the predicted box).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from vlmloc import geometry
from vlmloc.data.sample import Sample
from vlmloc.extension_geometry import box_area, grow_box, missing_box, paper_accuracy
from vlmloc.reports.tables import add_baseline_delta, summarize, to_markdown
from vlmloc.results import atomic_write

MATRIX_FILE = "extension_matrix.md"
MATRIX_FIG = "fig8_extension_matrix.png"
EXAMPLES_FIG = "fig9_extension_examples.png"


def extension_matrix(df: pd.DataFrame, levels: Sequence[int], names: Mapping[int, str]) -> pd.DataFrame:
    """Localization rows -> one row per pad: n, accuracy vs the GT grown by q cells for each level
    (columns ``q=<q>``), the mean linear scale factor of each level (``scale_q=<q>``: sqrt of the
    clipped grown-box area over the GT area), ``best_q`` and ``pred_gt_size`` (median
    sqrt(pred area / GT area) over parsed predictions).

    names: the condition name of each padding level (column ``condition``).
    """
    loc = df[df["task"] == "localization"]
    out = []
    for pad, rows in loc.groupby("pad", sort=True):
        rec: dict[str, Any] = {"pad": int(pad), "condition": names[int(pad)], "n": len(rows)}
        accs = {}
        for q in levels:
            per_row, scales = [], []
            for r in rows.itertuples(index=False):
                grown = grow_box(r.gt_box, q, r.cell_w, r.cell_h, r.width, r.height)
                per_row.append(paper_accuracy(r.pred_box, grown))
                scales.append(math.sqrt(box_area(grown) / box_area(r.gt_box)) if box_area(r.gt_box) > 0 else math.nan)
            accs[q] = float(np.mean(per_row))
            rec[f"q={q}"] = accs[q]
            rec[f"scale_q={q}"] = float(np.nanmean(scales)) if len(scales) else math.nan
        top = max(accs.values())
        winners = [q for q in levels if accs[q] == top]
        rec["best_q"] = winners[0] if len(winners) == 1 else pd.NA  # a tie (e.g. all 0) names no level
        ratios = [
            math.sqrt(box_area(r.pred_box) / box_area(r.gt_box))
            for r in rows.itertuples(index=False)
            if not missing_box(r.pred_box) and box_area(r.gt_box) > 0
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
        if sid in by_id and {int(p) for p in pads} <= set(rows["pad"].astype(int)):
            cand.append((-int(rows["pred_box"].notna().sum()), order[sid], sid))
    return [by_id[sid] for *_, sid in sorted(cand)[: max(int(n), 0)]]


def plot_examples(loc: pd.DataFrame, examples: Sequence[Sample], pads: Sequence[int], path: Path, title: str) -> None:
    """One row per example, one panel per p: object tokens (blue) and the added ring (orange) on the
    recorded grid, GT grown by q = p cells (green; dashed: the original GT) and the prediction (red)."""
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
            if not missing_box(pred):
                ax.add_patch(Rectangle(pred[:2], pred[2] - pred[0], pred[3] - pred[1], fill=False, ec="red", lw=2))
            iou = geometry.box_iou(None if missing_box(pred) else pred, grown)
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


# --------------------------------------------------------------------------- entry point


# experiment.cell -> what a GT growth cell is, for the caption
CELL_TEXT = {"global": "the global view's token grid (experiment.cell=global)",
             "local": "the finest token grid, InternVL's local canvas (experiment.cell=local)"}


def write(
    results: pd.DataFrame,
    run_dir: Path,
    cfg: Any,
    *,
    names: Mapping[int, str],
    levels: Sequence[int],
    samples: Sequence[Sample] = (),
    n_examples: int = 0,
) -> str:
    """Matrix markdown and both figures from the stored rows; returns (and prints) the markdown.

    names: padding level p -> its condition name, for the pads to report; levels: the GT scale
    levels q (matrix columns); samples, n_examples: the images the example figure may draw from and
    how many rows it gets (no figure without samples).
    """
    run_dir = Path(run_dir)
    pads = [int(p) for p in names]
    df = results[results["pad"].isin(pads)] if "pad" in results.columns else results.iloc[0:0]
    matrix = extension_matrix(df, levels, names)
    head = f"model={cfg.model.name} | data={cfg.data.name} | {run_dir}"
    summary = to_markdown(add_baseline_delta(summarize(df)))
    text = "\n".join(
        [
            "# Object extension (Fig. 8)",
            "",
            head,
            "",
            (
                "Rows: the object's token region grown by p rings filled with the object's own tokens "
                "(p = 0: clean model). Columns: localization accuracy (%, mean over IoU 0.5/0.7/0.9) of the "
                f"predicted box against the ground-truth box grown by q cells of {CELL_TEXT[str(cfg.experiment.cell)]} "
                "on every side and clipped to the image (mean linear scale factor in brackets). best q: the "
                "column with the highest accuracy (blank on a tie); pred/GT size: median sqrt(predicted area / GT area)."
            ),
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
