"""Causal mediation analysis per head (Fig. 4, 13, 14): MF for every pair x task x layer x head.

Writes mf.parquet (one row per sample x task x layer x head: p_src, p_base, p_patched,
denominator, mf, valid, the source answer and its IoU), excluded_pairs.parquet (pairs left out of
a task before patching: localization pairs whose source box misses, IoU below
experiment.localization_source_min_iou, since the source run must answer correctly), and from
those two files alone (`vlmloc.reports.cma`) a summary with the top-k heads per task with their
layer and head indices, the overlap of the two tasks' top-k sets, the critical-head threshold and
count, the pairs excluded for a small denominator, and layer x head heatmaps of mean MF per task.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from omegaconf import MISSING
from tqdm.auto import tqdm

from vlmloc import geometry
from vlmloc.runner import RunContext
from vlmloc.data.pairs import inpainted_sample, read_manifest
from vlmloc.data.sample import Sample
from vlmloc.engine.mediation import Target, head_mediation, mediation_fraction
from vlmloc.engine.readout import generate
from vlmloc.reports import cma as cma_report
from vlmloc.results import KeyedTable
from vlmloc.settings import at_least, load, one_of, register

log = logging.getLogger("vlmloc.experiments.cma")
MF_FILE = "mf.parquet"
MF_COLUMNS = ["sample_id", "image_id", "category", "task", "layer", "head", "positions", "p_src", "p_base",
              "p_patched", "denominator", "mf", "valid", "answer", "source_iou"]
# pairs left out of a task before any patching (localization: the source box missed), one row each
EXCLUDED_FILE = "excluded_pairs.parquet"
EXCLUDED_COLUMNS = ["sample_id", "image_id", "category", "task", "answer", "source_iou", "reason"]
MF_KEY = ("sample_id", "task", "layer", "head", "positions")
EXCLUDED_KEY = ("sample_id", "task")
POSITIONS = ("all", "text")  # patch every position, or only those after the image
LOCALIZATION_P = ("geometric_mean", "product")  # `engine.mediation.Target.reduce`
OTHER_MODEL_PAIRS = ("refuse", "warn")


# --------------------------------------------------------------------------- config


@register("cma")
@dataclass(frozen=True)
class Settings:
    """experiment.* of configs/experiment/cma.yaml, typed and checked."""

    name: str = MISSING
    positions: str = MISSING
    localization_source_min_iou: float | None = MISSING  # None: every pair
    localization_p: str = MISSING
    min_denominator: float = MISSING
    critical_mf: float = MISSING
    top_k: int = MISSING
    layers: tuple[int, ...] | None = MISSING  # None: every layer
    heads_per_pass: int | None = MISSING  # None: every head of a layer in one pass
    other_model_pairs: str = MISSING

    def __post_init__(self) -> None:
        one_of("experiment.positions", self.positions, POSITIONS)
        one_of("experiment.localization_p", self.localization_p, LOCALIZATION_P)
        at_least("experiment.top_k", self.top_k, 1)
        one_of("experiment.other_model_pairs", self.other_model_pairs, OTHER_MODEL_PAIRS)


def settings(cfg: Any) -> Settings:
    """`cfg.experiment` as `Settings` (a `ConfigError` naming the key if it does not fit)."""
    return load(Settings, cfg)


def check_config(cfg: Any) -> None:
    """Fail fast, before data or model work: valid settings, pairs made by this model."""
    settings(cfg)
    if str(cfg.data.kind) != "pairs":
        raise ValueError(f"experiment=cma needs source/base pairs: run experiment=make_pairs, then data=pairs data.pairs_dir=<its run dir> (got data={cfg.data.name})")
    check_pairs_model(cfg)


def check_pairs_model(cfg: Any) -> None:
    """The pairs were kept by one model's answers (recognized in the original, not in the inpainted
    image): analysing them with another model is refused, or only warned about with
    `experiment.other_model_pairs=warn`."""
    policy = settings(cfg).other_model_pairs
    manifest = read_manifest(cfg.data.pairs_dir)
    names = sorted({str(m).split("@")[0] for m in manifest["model"].dropna()}) if "model" in manifest else []
    if not names or names == [str(cfg.model.name)]:
        return
    msg = (f"the pairs in {cfg.data.pairs_dir} were kept by the answers of model {', '.join(names)}, not model="
           f"{cfg.model.name}: they need not be pairs this model recognizes and then misses. Make pairs with this "
           f"model (experiment=make_pairs model={cfg.model.name}), or set experiment.other_model_pairs=warn")
    if policy == "refuse":
        raise ValueError(msg)
    log.warning(msg)


# --------------------------------------------------------------------------- run


def _pair_rows(ctx: RunContext, st: Settings, sample: Sample, task: str) -> pd.DataFrame | dict:
    """The pair's MF rows for `task`, or (a dict) the record of why the pair is left out of it."""
    ad = ctx.adapter
    source_image, base_image = sample.load_image(), inpainted_sample(sample).load_image()
    # classification: the yes/no question whatever the model's classification.mode (MF of P(yes))
    prompt = ad.prompt(task, sample.category, mode="yes_no")
    answer, target = "", Target(0)
    source_iou = np.nan
    if task == "localization":
        answer = generate(ad, ad.prepare([source_image], [prompt]), int(ad.cfg.localization.max_new_tokens))[0]
        box = ad.parse_box(answer, source_image.width, source_image.height)
        source_iou = geometry.box_iou(box, sample.box_xyxy)
        need = st.localization_source_min_iou
        if need is not None and source_iou < need:
            # the source run must give the correct answer: no localization MF for this pair
            return {"sample_id": sample.sample_id, "image_id": int(sample.image_id), "category": sample.category,
                    "task": task, "answer": answer, "source_iou": source_iou,
                    "reason": f"source box missed (IoU {source_iou:.2f} < {need})"}
        text = prompt + str(ad.cfg.classification.answer_prefix) + answer
        n_answer = ad.prepare([source_image], [text]).seq_len - ad.prepare([source_image], [prompt]).seq_len
        target, prompt = Target(n_answer, st.localization_p), text
        if n_answer == 0:
            raise ValueError(f"{sample.sample_id}: empty source answer")
    src, base = ad.prepare([source_image], [prompt]), ad.prepare([base_image], [prompt])
    p_src, p_base, patched = head_mediation(
        ad, src, base, target, layers=None if st.layers is None else list(st.layers),
        text_only=st.positions == "text", heads_per_pass=st.heads_per_pass,
    )
    mf = mediation_fraction(p_src, p_base, patched, st.min_denominator)
    layer, head = np.meshgrid(np.arange(ad.n_layers), np.arange(ad.n_heads), indexing="ij")
    keep = ~np.isnan(patched)
    return pd.DataFrame({
        "sample_id": sample.sample_id, "image_id": int(sample.image_id), "category": sample.category, "task": task,
        "layer": layer[keep], "head": head[keep], "positions": st.positions, "p_src": p_src, "p_base": p_base,
        "p_patched": patched[keep], "denominator": p_base - p_src, "mf": mf[keep], "valid": ~np.isnan(mf[keep]),
        "answer": answer, "source_iou": source_iou,
    })


class _Rows(KeyedTable):
    """A CMA parquet, empty with its columns when absent."""

    def __init__(self, path: Path, key: tuple[str, ...], columns: list[str]) -> None:
        super().__init__(path, key)
        self.columns = columns

    def _empty(self) -> pd.DataFrame:
        return pd.DataFrame(columns=self.columns)


def run(ctx: RunContext) -> None:
    """MF rows of this shard's pairs (every pair unsharded), stored after each pair."""
    st = settings(ctx.cfg)
    # one row per pair x task x layer x head, and one per pair x task left out before patching;
    # a shard writes its own copies (`Shard.file`), merged when the last one finishes
    mf = _Rows(ctx.run_dir / ctx.shard.file(MF_FILE), MF_KEY, MF_COLUMNS)
    left_out = _Rows(ctx.run_dir / ctx.shard.file(EXCLUDED_FILE), EXCLUDED_KEY, EXCLUDED_COLUMNS)
    done = {key[:2] for key in mf.done_keys()} | left_out.done_keys()
    pairs = ctx.work_samples
    todo = [(s, t) for s in pairs for t in ctx.cfg.tasks if (s.sample_id, t) not in done]
    for sample, task in tqdm(todo, desc="cma pairs", disable=not todo):
        rows = _pair_rows(ctx, st, sample, task)
        # stored after every pair: a kill loses at most the pair in flight
        left_out.add(pd.DataFrame([rows], columns=EXCLUDED_COLUMNS)) if isinstance(rows, dict) else mf.add(rows)
    if todo:
        ctx.write_provenance(cma={"pairs": len(pairs), "dropped": len(left_out.load())})
    else:
        log.info("all pairs already analysed in %s: nothing to do", ctx.run_dir)


def report(ctx: RunContext, rows: pd.DataFrame) -> None:
    """The summary and heatmaps from mf.parquet and excluded_pairs.parquet (every shard's, merged);
    `rows` (the runner's results.parquet) is empty here: CMA keeps rows of its own."""
    mf = _Rows(ctx.run_dir / MF_FILE, MF_KEY, MF_COLUMNS)
    left_out = _Rows(ctx.run_dir / EXCLUDED_FILE, EXCLUDED_KEY, EXCLUDED_COLUMNS)
    cma_report.write(mf.load(), left_out.load(), ctx.run_dir, ctx.cfg)
