"""Object-removal pairs: the model-verified control set for causal mediation (PAPER.md, "Data").

For every object of the data: remove it by inpainting (`cfg.inpaint`, mask dilated by
`inpaint.dilate_px`), ask the model the classification question on the original and on the
inpainted image (batched, `evaluate`), and keep the pair when the model recognizes the object in
the original and not in the inpainted image; with `experiment.require_localization` the model
must also localize it in the original (IoU >= 0.5).

Writes into the run directory (load it with `data=pairs data.pairs_dir=<run_dir>`):
    pairs/<sample_id>.png   inpainted images          manifest.parquet  one row per object
    summary.md              counts at each step       pairs_examples.png  example pairs (Fig. 6)
    run.json                provenance + `pairs_counts` + `inpaint` (backend, checkpoint md5)

Resumable and idempotent: an image on disk whose manifest row has the same `inpaint_key` is not
inpainted again, stored answers of the same model are not asked again, and a finished run does
no new work (nothing is rewritten).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from omegaconf import OmegaConf

from vlmloc.runner import RunContext
from vlmloc.data.pairs import inpainted_name, read_manifest, sample_record, write_manifest
from vlmloc.data.sample import Sample
from vlmloc.conditions import Condition
from vlmloc.evaluation import evaluate
from vlmloc.inpaint import Inpainter, build_inpainter
from vlmloc.provenance import write_run_json
from vlmloc.reports.tables import to_markdown
from vlmloc.results import RUN_JSON_FILE, atomic_write

log = logging.getLogger("vlmloc.experiments.make_pairs")

# Manifest rows are keyed by the inpainting settings and the model config that made them: a change
# redoes exactly the rows it affects.
RECOMPUTES_CHANGED_CONFIG = True

FIGURE_FILE = "pairs_examples.png"


def run(ctx: RunContext) -> None:
    cfg = ctx.cfg
    exp = cfg.experiment
    require_loc = bool(exp.get("require_localization", False))
    inpainter = build_inpainter(cfg.get("inpaint"))  # a missing or broken checkpoint fails here, before any work
    samples = ctx.samples
    inpainter.check_samples(samples)
    pairs_dir = ctx.run_dir
    manifest = read_manifest(pairs_dir)
    rows = _current_rows(manifest, samples)
    dropped_rows = len(manifest) - len(rows)

    n_inpainted = inpaint_missing(inpainter, samples, rows, pairs_dir)
    model = model_key(cfg)
    n_classified = classify_missing(ctx, samples, rows, pairs_dir, model)
    n_localized = localize_missing(ctx, samples, rows, pairs_dir) if require_loc else 0
    n_changed = 0  # pairs whose verdict changed without new answers (e.g. require_localization toggled)
    for row in rows.values():
        kept = admitted(row, require_loc)
        n_changed += bool(row.get("kept")) != kept
        row["kept"] = kept

    counts = step_counts(rows, require_loc)
    table = to_markdown(pd.DataFrame(counts))
    did_work = bool(n_inpainted or n_classified or n_localized)
    if did_work or n_changed or dropped_rows:
        write_manifest(pairs_dir, pd.DataFrame(list(rows.values())))
        extra = {"pairs_counts": counts, "inpaint": inpainter.info(), "require_localization": require_loc}
        _record_provenance(ctx, did_work, extra)
        text = table + "\n"
        atomic_write(pairs_dir / "summary.md", lambda f: f.write(text.encode()))
    else:
        log.info("all %d objects already inpainted and answered in %s: nothing to do", len(samples), pairs_dir)
    n_fig = int(exp.get("figure_examples", 6))
    if n_fig > 0 and rows and (did_work or n_changed or not (pairs_dir / FIGURE_FILE).is_file()):
        plot_pairs(list(rows.values()), pairs_dir, n_fig, pairs_dir / FIGURE_FILE)
    for c in counts:
        log.info("pairs step %-26s kept %6d  dropped %6d", c["step"], c["kept"], c["dropped"])
    print(
        f"\n{exp.name} | model={cfg.model.name} | data={cfg.data.name} | inpaint={inpainter.backend} "
        f"(dilate {inpainter.dilate_px} px) | {pairs_dir}\n{table}\n"
        f"load with: data=pairs data.pairs_dir={pairs_dir}"
    )


def _record_provenance(ctx: RunContext, did_work: bool, extra: dict[str, Any]) -> None:
    """run.json with the counts. When only verdicts changed (no model call), patch the stored
    run.json instead of loading the model just to describe it again."""
    path = ctx.run_dir / RUN_JSON_FILE
    if did_work or not path.is_file():
        ctx.write_provenance(**extra)
        return
    info = json.loads(path.read_text())
    info.update(json.loads(json.dumps(extra, default=str)))
    write_run_json(ctx.run_dir, info)


# --------------------------------------------------------------------------- steps


def _current_rows(manifest: pd.DataFrame, samples: Sequence[Sample]) -> dict[str, dict[str, Any]]:
    """Manifest rows of this run's samples by sample_id; rows of other samples are dropped
    (the manifest describes the current data config, so data=pairs loads only its pairs)."""
    ids = {s.sample_id for s in samples}
    rows = {r["sample_id"]: r for r in manifest.to_dict("records") if r["sample_id"] in ids}
    if len(rows) < len(manifest):
        log.info("dropping %d manifest rows of samples not in this run's data", len(manifest) - len(rows))
    return rows


def _batches(items: Sequence[Sample], size: int) -> Iterator[list[Sample]]:
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


def inpaint_missing(inpainter: Inpainter, samples: Sequence[Sample], rows: dict[str, dict[str, Any]], pairs_dir: Path) -> int:
    """Inpaint every sample whose image is missing or was made with other settings; returns how many.

    The manifest is written after each batch, so an interrupted run resumes after the last one.
    """
    key = inpainter.key()
    info = inpainter.info()

    def done(s: Sample) -> bool:
        row = rows.get(s.sample_id)
        return row is not None and row["inpaint_key"] == key and (pairs_dir / row["inpainted_path"]).is_file()

    todo = [s for s in samples if not done(s)]
    stale = sum(1 for s in todo if s.sample_id in rows)
    if stale:
        log.warning("%d stored inpaintings were made with other settings than %s: redoing them", stale, info)
    log.info("inpainting %d of %d objects (%s)", len(todo), len(samples), inpainter.backend)
    for chunk in _batches(todo, inpainter.batch_size):
        masks = [s.mask() for s in chunk]
        out = inpainter.inpaint([s.load_image() for s in chunk], masks, chunk)
        for s, im, m in zip(chunk, out, masks):
            rel = inpainted_name(s.sample_id)
            atomic_write(pairs_dir / rel, lambda f, im=im: im.save(f, format="PNG", compress_level=3))
            rows[s.sample_id] = {
                **sample_record(s),
                "inpainted_path": rel,
                "mask_margin_px": inpainter.dilate_px,
                "hole_frac": float(inpainter.hole(m).mean()),
                "inpaint_backend": inpainter.backend,
                "inpaint_checkpoint": info.get("checkpoint"),
                "inpaint_checkpoint_md5": info.get("checkpoint_md5"),
                "inpaint_key": key,
                "kept": False,  # answers are asked next
            }
        write_manifest(pairs_dir, pd.DataFrame(list(rows.values())))
    return len(todo)


def model_key(cfg: Any) -> str:
    """`<model name>@<hash of the resolved model config>`: answers depend on weights, prompts, mode."""
    blob = json.dumps(OmegaConf.to_container(cfg.model, resolve=True), sort_keys=True, default=str)
    return f"{cfg.model.name}@{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


INPAINTED_SUFFIX = "/inpainted"


def inpainted_view(sample: Sample, pairs_dir: Path) -> Sample:
    """The sample pointing at its inpainted image (same object record, other image file).

    Its sample_id gets INPAINTED_SUFFIX so both images can share one evaluate call: evaluate
    caches images by sample_id within a batch.
    """
    return dataclasses.replace(
        sample, sample_id=sample.sample_id + INPAINTED_SUFFIX, image_path=pairs_dir / inpainted_name(sample.sample_id)
    )


def classify_missing(
    ctx: RunContext, samples: Sequence[Sample], rows: dict[str, dict[str, Any]], pairs_dir: Path, model: str
) -> int:
    """Ask the classification question on original and inpainted images where this model has not."""

    def done(s: Sample) -> bool:
        r = rows[s.sample_id]
        return r.get("model") == model and not _na(r.get("recognized_original")) and not _na(r.get("recognized_inpainted"))

    todo = [s for s in samples if not done(s)]
    if not todo:
        return 0
    log.info("classifying %d objects on original and inpainted images", len(todo))
    bs = int(ctx.cfg.batch_size)
    views = [v for s in todo for v in (s, inpainted_view(s, pairs_dir))]  # one call: batches mix both
    df = evaluate(ctx.adapter, views, ["classification"], batch_size=bs, conditions=[Condition("pair_filter")])
    by_id = {r["sample_id"]: r for r in df.to_dict("records")}
    for s in todo:
        o, i = by_id[s.sample_id], by_id[s.sample_id + INPAINTED_SUFFIX]
        rows[s.sample_id].update(
            model=model,
            p_yes_original=float(o["p_yes"]),
            p_yes_inpainted=float(i["p_yes"]),
            answer_original=str(o["answer"]),
            answer_inpainted=str(i["answer"]),
            recognized_original=bool(o["correct"]),
            recognized_inpainted=bool(i["correct"]),
            # new answers: a stored box answer belonged to the previous model or image
            loc_answer_original=None,
            iou_original=math.nan,
            localized_original=None,
        )
    write_manifest(pairs_dir, pd.DataFrame(list(rows.values())))
    return len(todo)


def localize_missing(ctx: RunContext, samples: Sequence[Sample], rows: dict[str, dict[str, Any]], pairs_dir: Path) -> int:
    """Ask for the box on the original, only for pairs the classification rule admits (generation is costly)."""
    todo = [s for s in samples if admitted(rows[s.sample_id], False) and _na(rows[s.sample_id].get("localized_original"))]
    if not todo:
        return 0
    log.info("localizing %d objects on the original images", len(todo))
    loc = evaluate(ctx.adapter, todo, ["localization"], batch_size=int(ctx.cfg.batch_size), conditions=[Condition("pair_filter")])
    by_id = {r["sample_id"]: r for r in loc.to_dict("records")}
    for s in todo:
        r = by_id[s.sample_id]
        rows[s.sample_id].update(
            loc_answer_original=str(r["answer"]), iou_original=float(r["iou"]), localized_original=bool(r["correct"])
        )
    write_manifest(pairs_dir, pd.DataFrame(list(rows.values())))
    return len(todo)


def _na(v: Any) -> bool:
    return v is None or (np.ndim(v) == 0 and bool(pd.isna(v)))


def _true(v: Any) -> bool:
    return not _na(v) and bool(v)


def admitted(row: dict[str, Any], require_localization: bool) -> bool:
    """The pair rule: recognized in the original, not in the inpainted image [, localized in the original]."""
    ok = _true(row.get("recognized_original")) and not _na(row.get("recognized_inpainted")) and not bool(row["recognized_inpainted"])
    return ok and (not require_localization or _true(row.get("localized_original")))


def step_counts(rows: dict[str, dict[str, Any]], require_localization: bool) -> list[dict[str, Any]]:
    """Objects left after each step of the filter, cumulative: [{step, kept, dropped}]."""
    r = list(rows.values())
    steps = [
        ("inpainted", lambda x: True),
        ("recognized_original", lambda x: _true(x.get("recognized_original"))),
        ("not_recognized_inpainted", lambda x: admitted(x, False)),
    ]
    if require_localization:
        steps.append(("localized_original", lambda x: admitted(x, True)))
    out = [{"step": "objects", "kept": len(r), "dropped": 0}]
    left = r
    for name, keep in steps:
        now = [x for x in left if keep(x)]
        out.append({"step": name, "kept": len(now), "dropped": len(left) - len(now)})
        left = now
    out.append({"step": "kept", "kept": sum(bool(x["kept"]) for x in r), "dropped": len(r) - sum(bool(x["kept"]) for x in r)})
    return out


# --------------------------------------------------------------------------- figure


def plot_pairs(rows: list[dict[str, Any]], pairs_dir: Path, n: int, path: Path, thumb: int = 320) -> Path:
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

    rows = sorted(rows, key=lambda r: (not r["kept"], r["image_id"], r["ann_id"]))[:n]
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
    return "-" if _na(v) else f"{float(v):.2f}"
