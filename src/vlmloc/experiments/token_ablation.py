"""Token ablation (Table 1): replace selected visual tokens with the mean visual embedding.

Strategies (experiment.strategies):
- object: the object's tokens (any-pixel overlap), padded by p in experiment.pads;
- register: high-norm tokens: vision-feature (projector input) norm >= factor x the image's
  median token norm (experiment.register.factor);
- integrated_gradients: the k tokens with the highest attribution (per task), k = the object's
  token count at p = 0, of f = classification: log P(yes) / (P(yes) + P(no)), the evidence that
  the object is there, whatever the clean answer; localization: the teacher-forced
  log-probability of the model's clean box answer;
- random: k random tokens (same k), seeded per sample, from the tokens covering the image
  (experiment.random_from).
Each condition runs on every sample x task; rows record the fraction of visual tokens ablated.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from vlmloc.app import RunContext
from vlmloc.data.sample import Sample
from vlmloc.engine.attribution import integrated_gradients
from vlmloc.engine.mean_embedding import mean_visual_embedding
from vlmloc.engine.token_edits import TokenEdit
from vlmloc.engine.visual_features import iter_unique_images, projector_io
from vlmloc.evaluation import BASELINE, Condition
from vlmloc.experiments.reporting import paper_table, write_summary
from vlmloc.models.layout import VisualLayout
from vlmloc.selection import RANDOM_FROM, object_positions, random_positions, row_rng, top_k_positions

log = logging.getLogger("vlmloc.experiments.token_ablation")


def ablate(select: Callable[[Sample, VisualLayout, str], np.ndarray], mean: torch.Tensor):
    """An edit function replacing the selected positions with the mean embedding."""

    def edits(sample: Sample, layout: VisualLayout, task: str) -> list[TokenEdit]:
        return [TokenEdit.replace(select(sample, layout, task), mean)]

    return edits


def object_condition(pad: int, mean: torch.Tensor) -> Condition:
    return Condition(
        f"object_tokens:p={pad:+d}" if pad else "object_tokens",
        ablate(lambda s, lay, task: object_positions(lay, s, pad), mean),
        {"strategy": "object", "pad": pad},
    )


def random_condition(seed: int, mean: torch.Tensor, among: str = "image") -> Condition:
    """As many random tokens as the object has, from the image area (or every token: among="all")."""

    def select(s: Sample, lay: VisualLayout, task: str) -> np.ndarray:
        k = len(object_positions(lay, s, 0))
        return random_positions(lay, k, row_rng(seed, s.sample_id, "random"), s, among)

    return Condition("random_tokens", ablate(select, mean), {"strategy": "random", "pad": 0})


def scored_condition(name: str, scores: dict, mean: torch.Tensor, *, per_task: bool, top_k: bool, factor: float = 0.0) -> Condition:
    """Tokens ranked by precomputed per-sample (or per sample x task) scores in layout order."""

    def select(s: Sample, lay: VisualLayout, task: str) -> np.ndarray:
        sc = scores[(s.sample_id, task) if per_task else s.sample_id]
        if top_k:
            return top_k_positions(lay, sc, len(object_positions(lay, s, 0)))
        return lay.positions[sc >= factor * np.median(sc)]

    return Condition(name, ablate(select, mean), {"strategy": name, "pad": 0})


def register_scores(ctx: RunContext, samples: list[Sample]) -> dict[str, np.ndarray]:
    """Per sample: [n_visual] L2 norm of each token's vision features (the projector input)."""
    ad, out, t0 = ctx.adapter, {}, time.monotonic()
    chunks = list(iter_unique_images(samples, int(ctx.cfg.batch_size)))
    for chunk in tqdm(chunks, desc="register scores", disable=not chunks):
        batch = ad.prepare([s.load_image() for s in chunk], [ad.prompt("classification", s.category) for s in chunk])
        ins, _ = projector_io(ad, batch)
        for s, feats in zip(chunk, ins):
            out[s.image_id] = feats.norm(dim=-1).numpy()
    log.info("register scores: %d images in %.1f s", len(out), time.monotonic() - t0)
    return {s.sample_id: out[s.image_id] for s in samples}


def ig_scores(ctx: RunContext, samples: list[Sample], tasks: list[str], clean: pd.DataFrame, mean: torch.Tensor) -> dict:
    """Per (sample, task): IG attribution of log P(yes)/(P(yes)+P(no)) (classification) or of the
    clean box answer's teacher-forced log-probability (localization)."""
    ig = ctx.cfg.experiment.integrated_gradients
    ad = ctx.adapter
    baseline = mean if str(ig.baseline) == "mean" else None
    answers = clean.set_index(["sample_id", "task"])["answer"]
    out, t0 = {}, time.monotonic()
    for s in tqdm(samples, desc=f"integrated gradients ({int(ig.steps)} steps)", disable=not samples):
        image = s.load_image()
        for task in tasks:
            answer = None
            if task == "localization":
                text = str(answers.get((s.sample_id, task), "") or "")
                answer = (str(ad.cfg.classification.answer_prefix) + text) if text else None
                if answer is None:  # no clean answer to attribute: rank nothing above random
                    out[(s.sample_id, task)] = np.zeros(ad.n_visual_tokens(s.width, s.height))
                    continue
            attr, _, _ = integrated_gradients(
                ad, image, ad.prompt(task, s.category), answer=answer, baseline=baseline,
                steps=int(ig.steps), batch_size=int(ig.batch_size),
            )
            out[(s.sample_id, task)] = np.abs(attr) if str(ig.rank_by) == "abs" else attr
    log.info("integrated gradients: %d samples x %d tasks in %.1f s", len(samples), len(tasks), time.monotonic() - t0)
    return out


def build_conditions(ctx: RunContext, mean: torch.Tensor, clean: pd.DataFrame) -> list[Condition]:
    exp = ctx.cfg.experiment
    samples, tasks = ctx.samples, list(ctx.cfg.tasks)
    conds = [BASELINE]
    for strategy in exp.strategies:
        if strategy == "object":
            conds += [object_condition(int(p), mean) for p in exp.pads]
        elif strategy == "random":
            conds.append(random_condition(int(ctx.cfg.seed), mean, str(exp.random_from)))
        elif strategy == "register":
            scores = register_scores(ctx, samples)
            conds.append(scored_condition("register", scores, mean, per_task=False, top_k=False, factor=float(exp.register.factor)))
        elif strategy == "integrated_gradients":
            scores = ig_scores(ctx, samples, tasks, clean, mean)
            conds.append(scored_condition("integrated_gradients", scores, mean, per_task=True, top_k=True))
        else:
            raise ValueError(f"unknown token selection strategy {strategy!r}")
    return conds


def check_config(cfg) -> None:
    if str(cfg.experiment.random_from) not in RANDOM_FROM:
        raise ValueError(f"experiment.random_from must be one of {list(RANDOM_FROM)}, got {cfg.experiment.random_from!r}")


def condition_names(exp) -> list[str]:
    """Names of every condition the config asks for (cheap: no model needed)."""
    names = [BASELINE.name]
    for strategy in exp.strategies:
        if strategy == "object":
            names += [f"object_tokens:p={int(p):+d}" if int(p) else "object_tokens" for p in exp.pads]
        else:
            names.append({"random": "random_tokens"}.get(str(strategy), str(strategy)))
    return names


def run(ctx: RunContext) -> None:
    cfg = ctx.cfg
    tasks = list(cfg.tasks)
    names = condition_names(cfg.experiment)
    done = ctx.store.done_keys()
    if all((s.sample_id, t, c) in done for s in ctx.samples for t in tasks for c in names):
        log.info("all conditions already evaluated in %s: nothing to do", ctx.run_dir)
        results = ctx.store.load()
        write_summary(ctx, results, paper_table(results, names), "table1_token_ablation.md")
        return
    # The clean run comes first: integrated gradients attribute its answers.
    clean_new = ctx.evaluate(ctx.samples, tasks, skip=done)
    clean = ctx.store.load()
    clean = clean[clean["condition"] == BASELINE.name]
    mean = mean_visual_embedding(ctx)
    conditions = build_conditions(ctx, mean, clean)
    assert [c.name for c in conditions] == names, "condition_names out of sync with build_conditions"
    done = ctx.store.done_keys()
    df = ctx.evaluate(ctx.samples, tasks, conditions=conditions[1:], skip=done)
    if len(df) or len(clean_new):
        ctx.write_provenance()
    results = ctx.store.load()
    table = paper_table(results, [c.name for c in conditions])
    write_summary(ctx, results, table, "table1_token_ablation.md")
