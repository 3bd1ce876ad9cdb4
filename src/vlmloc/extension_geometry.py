"""Geometry of the object-extension matrix (Fig. 8): the token cell that grows a ground-truth box, the
grown box, and the paper's accuracy of a predicted box against it.

Pure functions on boxes (``[x1, y1, x2, y2]`` in original-image pixels) and token grids, shared by
the experiment (which records each row's grid as result columns) and its report (which rebuilds
the matrix from those columns alone). Nothing here knows a model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from vlmloc import geometry
from vlmloc.results import HIT_COLUMNS

# The thresholds of the stored hit columns (hit_50 -> 0.5), so the matrix scores a grown box the
# way the summary scores the GT box.
IOU_THRESHOLDS = tuple(int(h[4:]) / 100 for h in HIT_COLUMNS)
GRID_COLUMNS = ("grid_view", "grid_x0", "grid_y0", "grid_x1", "grid_y1", "grid_rows", "grid_cols", "cell_w", "cell_h")


def finest_grid(grids: Mapping[str, geometry.TokenGrid]) -> tuple[str, geometry.TokenGrid]:
    """(view name, grid) of the grid with the smallest cell area (InternVL: the local canvas)."""

    def cell_area(item: tuple[str, geometry.TokenGrid]) -> tuple[float, str]:
        g = item[1]
        return ((g.x1 - g.x0) / g.cols * (g.y1 - g.y0) / g.rows, item[0])

    return min(grids.items(), key=cell_area)


def grid_record(view: str, grid: geometry.TokenGrid) -> dict[str, Any]:
    """A grid and its cell size in original pixels as the result columns `GRID_COLUMNS`."""
    return {
        "grid_view": view,
        "grid_x0": float(grid.x0),
        "grid_y0": float(grid.y0),
        "grid_x1": float(grid.x1),
        "grid_y1": float(grid.y1),
        "grid_rows": int(grid.rows),
        "grid_cols": int(grid.cols),
        "cell_w": (grid.x1 - grid.x0) / grid.cols,
        "cell_h": (grid.y1 - grid.y0) / grid.rows,
    }


def grow_box(xyxy: Sequence[float], q: float, cell_w: float, cell_h: float, width: int, height: int) -> geometry.Box:
    """The box grown by q token cells on every side, clipped to the image.

    The same as scaling about the centre by (w + 2 q cell_w) / w in x and (h + 2 q cell_h) / h in y.
    """
    x1, y1, x2, y2 = (float(v) for v in xyxy)
    dx, dy = q * float(cell_w), q * float(cell_h)
    return geometry.clip_box((x1 - dx, y1 - dy, x2 + dx, y2 + dy), width, height)


def box_area(b: Sequence[float]) -> float:
    """Area of an xyxy box in pixels^2 (0 for an empty or inverted box)."""
    return max(float(b[2]) - float(b[0]), 0.0) * max(float(b[3]) - float(b[1]), 0.0)


def missing_box(box: Any) -> bool:
    """True for an unparsed prediction (None, or NaN / NA as it comes back from parquet)."""
    return box is None or (np.ndim(box) == 0 and pd.isna(box))


def paper_accuracy(pred: Sequence[float] | None, gt: Sequence[float]) -> float:
    """Mean over the IoU thresholds of the hits, in % (one row's share of the paper's accuracy)."""
    iou = geometry.box_iou(None if missing_box(pred) else pred, gt)
    return 100.0 * float(np.mean([iou >= t for t in IOU_THRESHOLDS]))
