"""Object-removal pairs: the model-verified control set for causal mediation (PAPER.md, "Data").

For every object of the data: remove it by inpainting (`cfg.inpaint`, mask dilated by
`inpaint.dilate_px`), ask the model the classification question on the original and on the
inpainted image (batched, `evaluate`; `experiment.classification_mode`, yes/no by default, the
question CMA asks), and keep the pair when the model recognizes the object in
the original and not in the inpainted image; with `experiment.require_localization` the model
must also localize it in the original (IoU >= 0.5).

Inpainting, the manifest and the filter rule are data work (`vlmloc.data.pairs`); the summary and
the figure are rebuilt from the manifest (`vlmloc.reports.make_pairs`). Writes into the run
directory (load it with `data=pairs data.pairs_dir=<run_dir>`):
    pairs/<sample_id>.png   inpainted images          manifest.parquet  one row per object
    summary.md              counts at each step       pairs_examples.png  example pairs (Fig. 6)
    run.json                provenance + `pairs_counts` + `inpaint` (backend, checkpoint md5)

Resumable and idempotent: an image on disk whose manifest row has the same `inpaint_key` is not
inpainted again, stored answers of the same model are not asked again, and a finished run does
no new work (nothing is rewritten).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import MISSING, OmegaConf

from vlmloc.runner import RunContext
from vlmloc.data.pairs import (
    INPAINTED_SUFFIX, admitted, coerce_manifest, current_rows, inpaint_missing, inpainted_view, read_manifest,
    step_counts, write_manifest,
)
from vlmloc.data.sample import Sample
from vlmloc.conditions import Condition
from vlmloc.evaluation import evaluate
from vlmloc.inpaint import build_inpainter
from vlmloc.models.adapter import CLASSIFICATION_MODES
from vlmloc.provenance import write_run_json
from vlmloc.reports import make_pairs as make_pairs_report
from vlmloc.results import RUN_JSON_FILE, is_missing
from vlmloc.settings import at_least, load, one_of, register

log = logging.getLogger("vlmloc.experiments.make_pairs")

# Manifest rows are keyed by the inpainting settings and the model config that made them: a change
# redoes exactly the rows it affects.
RECOMPUTES_CHANGED_CONFIG = True


# --------------------------------------------------------------------------- config


@register("make_pairs")
@dataclass(frozen=True)
class Settings:
    """experiment.* of configs/experiment/make_pairs.yaml, typed and checked."""

    name: str = MISSING
    classification_mode: str = MISSING
    require_localization: bool = MISSING
    figure_examples: int = MISSING

    def __post_init__(self) -> None:
        one_of("experiment.classification_mode", self.classification_mode, CLASSIFICATION_MODES)
        at_least("experiment.figure_examples", self.figure_examples, 0)


def settings(cfg: Any) -> Settings:
    """`cfg.experiment` as `Settings` (a `ConfigError` naming the key if it does not fit)."""
    return load(Settings, cfg)


# --------------------------------------------------------------------------- run


def run(ctx: RunContext) -> None:
    """Inpaint, ask, filter; then the manifest, run.json, summary and figure where anything changed."""
    cfg = ctx.cfg
    require_loc = settings(cfg).require_localization
    inpainter = build_inpainter(cfg.get("inpaint"))  # a missing or broken checkpoint fails here, before any work
    samples = ctx.samples
    inpainter.check_samples(samples)
    pairs_dir = ctx.run_dir
    stored = read_manifest(pairs_dir)
    rows = current_rows(stored, samples)
    dropped_rows = len(stored) - len(rows)

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
    manifest = coerce_manifest(pd.DataFrame(list(rows.values())))
    did_work = bool(n_inpainted or n_classified or n_localized)
    changed = bool(did_work or n_changed or dropped_rows)
    if changed:
        write_manifest(pairs_dir, manifest)
        extra = {"pairs_counts": counts, "inpaint": inpainter.info(), "require_localization": require_loc}
        _record_provenance(ctx, did_work, extra)
    else:
        log.info("all %d objects already inpainted and answered in %s: nothing to do", len(samples), pairs_dir)
    make_pairs_report.write(manifest, counts, pairs_dir, cfg, inpaint_backend=inpainter.backend, dilate_px=inpainter.dilate_px,
                 rewrite_summary=changed, redraw_figure=bool(did_work or n_changed))


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


# --------------------------------------------------------------------------- asking the model


def model_key(cfg: Any) -> str:
    """`<model name>@<hash of the resolved model config and the filter's classification mode>`:
    answers depend on weights, prompts, mode."""
    asked = {"model": OmegaConf.to_container(cfg.model, resolve=True), "mode": settings(cfg).classification_mode}
    blob = json.dumps(asked, sort_keys=True, default=str)
    return f"{cfg.model.name}@{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


def classify_missing(
    ctx: RunContext, samples: Sequence[Sample], rows: dict[str, dict[str, Any]], pairs_dir: Path, model: str
) -> int:
    """Ask the classification question on original and inpainted images where this model has not."""

    def done(s: Sample) -> bool:
        r = rows[s.sample_id]
        return r.get("model") == model and not is_missing(r.get("recognized_original")) and not is_missing(r.get("recognized_inpainted"))

    todo = [s for s in samples if not done(s)]
    if not todo:
        return 0
    log.info("classifying %d objects on original and inpainted images", len(todo))
    bs = int(ctx.cfg.batch_size)
    views = [v for s in todo for v in (s, inpainted_view(s, pairs_dir))]  # one call: batches mix both
    df = evaluate(ctx.adapter, views, ["classification"], batch_size=bs, conditions=[Condition("pair_filter")],
                  classification_mode=settings(ctx.cfg).classification_mode, prefetch=bool(ctx.cfg.prefetch))
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
    todo = [s for s in samples if admitted(rows[s.sample_id], False) and is_missing(rows[s.sample_id].get("localized_original"))]
    if not todo:
        return 0
    log.info("localizing %d objects on the original images", len(todo))
    loc = evaluate(ctx.adapter, todo, ["localization"], batch_size=int(ctx.cfg.batch_size), conditions=[Condition("pair_filter")],
                   prefetch=bool(ctx.cfg.prefetch))
    by_id = {r["sample_id"]: r for r in loc.to_dict("records")}
    for s in todo:
        r = by_id[s.sample_id]
        rows[s.sample_id].update(
            loc_answer_original=str(r["answer"]), iou_original=float(r["iou"]), localized_original=bool(r["correct"])
        )
    write_manifest(pairs_dir, pd.DataFrame(list(rows.values())))
    return len(todo)

