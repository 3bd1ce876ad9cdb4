"""Tables and figures of the object-removal pairs (experiment=make_pairs), from its manifest alone.

    text = write(manifest, counts, run_dir, cfg, inpaint_backend="oracle", dilate_px=0,
                 rewrite_summary=True, redraw_figure=True)

`manifest` holds one row per object (`vlmloc.data.pairs.MANIFEST_COLUMNS`), `counts` the filter's
steps as `vlmloc.data.pairs.step_counts` gives them (also stored in run.json as `pairs_counts`).
Writes summary.md (objects kept and dropped at each step) and pairs_examples.png (example pairs
like the paper's Fig. 6); a finished run passes False for both flags and nothing is rewritten.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from vlmloc.reports.tables import to_markdown
from vlmloc.results import atomic_write, is_missing

log = logging.getLogger("vlmloc.reports.make_pairs")

SUMMARY_FILE = "summary.md"
FIGURE_FILE = "pairs_examples.png"


def plot_pairs(manifest: pd.DataFrame, pairs_dir: Path, n: int, path: Path, thumb: int = 320) -> Path:
    """Example pairs like the paper's Fig. 6: original with its box | inpainted. Kept pairs first.

    Images are shrunk to `thumb` px on their longer side first: drawing full-size photos
    dominates the cost and adds nothing at this figure size.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle
    from PIL import Image

    def load(p: Path) -> tuple[Image.Image, float]:
        with Image.open(p) as im:
            im = im.convert("RGB")
        scale = min(1.0, thumb / max(im.size))
        return im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale)))), scale

    rows = sorted(manifest.to_dict("records"), key=lambda r: (not r["kept"], r["image_id"], r["ann_id"]))[:n]
    per_row = min(len(rows), 3)
    n_lines = math.ceil(len(rows) / per_row)
    fig, axes = plt.subplots(n_lines, 2 * per_row, figsize=(2.6 * 2 * per_row, 2.8 * n_lines), squeeze=False)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.9, wspace=0.04, hspace=0.3)
    for ax in axes.ravel():
        ax.axis("off")
    for k, r in enumerate(rows):
        a_orig, a_inp = axes[k // per_row, 2 * (k % per_row)], axes[k // per_row, 2 * (k % per_row) + 1]
        orig, scale = load(Path(r["original_path"]))
        a_orig.imshow(orig)
        a_inp.imshow(load(pairs_dir / r["inpainted_path"])[0])
        x, y, w, h = (v * scale for v in r["box_xywh"])
        a_orig.add_patch(Rectangle((x, y), w, h, fill=False, edgecolor="lime", linewidth=2))
        tag = "" if r["kept"] else " (not kept)"
        a_orig.set_title(f"{r['category']}{tag}\nP(yes)={_fmt(r.get('p_yes_original'))}", fontsize=9)
        a_inp.set_title(f"inpainted\nP(yes)={_fmt(r.get('p_yes_inpainted'))}", fontsize=9)
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100, pil_kwargs={"compress_level": 1}))
    plt.close(fig)
    return path


def _fmt(v: Any) -> str:
    return "-" if is_missing(v) else f"{float(v):.2f}"


def write(
    manifest: pd.DataFrame,
    counts: Sequence[dict[str, Any]],
    run_dir: Path,
    cfg: Any,
    *,
    inpaint_backend: str,
    dilate_px: int,
    rewrite_summary: bool,
    redraw_figure: bool,
) -> str:
    """Write summary.md (when `rewrite_summary`) and the example figure (when `redraw_figure` or it
    is missing; `experiment.figure_examples` pairs, none for 0) into `run_dir`, print the counts
    table with the run's identity and return it as markdown."""
    run_dir = Path(run_dir)
    table = to_markdown(pd.DataFrame(list(counts)))
    if rewrite_summary:
        text = table + "\n"
        atomic_write(run_dir / SUMMARY_FILE, lambda f: f.write(text.encode()))
    n_fig = int(cfg.experiment.get("figure_examples", 6))
    if n_fig > 0 and len(manifest) and (redraw_figure or not (run_dir / FIGURE_FILE).is_file()):
        plot_pairs(manifest, run_dir, n_fig, run_dir / FIGURE_FILE)
    for c in counts:
        log.info("pairs step %-26s kept %6d  dropped %6d", c["step"], c["kept"], c["dropped"])
    print(
        f"\n{cfg.experiment.name} | model={cfg.model.name} | data={cfg.data.name} | inpaint={inpaint_backend} "
        f"(dilate {dilate_px} px) | {run_dir}\n{table}\n"
        f"load with: data=pairs data.pairs_dir={run_dir}"
    )
    return table
