"""The named inputs that conditions read, computed once per run when a condition first needs one.

| name | value | settings |
|---|---|---|
| `mean_embedding` | [hidden] mean projector output (cached across runs, `engine.mean_embedding`) | `mean_embedding.n_images` |
| `register_scores` | sample_id -> [n_visual] vision-feature norm of each token (the projector input) | |
| `integrated_gradients` | (sample_id, task) -> [n_visual] attribution of the clean answer | `experiment.integrated_gradients` |
| `head_means` | task -> `HeadMeans` of clean runs of the first samples (stored in the run directory) | `experiment.mean_samples`, `experiment.answer_mean`, `experiment.tasks` |

Integrated gradients attribute the clean run's answers: its provider reads the run's stored
baseline rows, so an experiment using it evaluates the baseline first. Per-sample resources cover
this process's samples (`RunContext.work_samples`: its shard's); the mean embedding and head means
come from the first samples of the whole run, the same for every shard, computed by one process
under a lock (`vlmloc.rundir.computed_once`) and read from its file by the others.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
import torch
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from vlmloc.conditions import BASELINE, Resources
from vlmloc.data.sample import Sample
from vlmloc.engine.attribution import Target, integrated_gradients_batch
from vlmloc.engine.head_means import HeadMeans, head_means
from vlmloc.engine.mean_embedding import mean_visual_embedding
from vlmloc.engine.visual_features import prepared_batches, projector_io
from vlmloc.models.adapter import VLMAdapter
from vlmloc.reports.tables import to_markdown
from vlmloc.rundir import computed_once
from vlmloc.selection import object_positions, top_k_positions

log = logging.getLogger("vlmloc.resources")


def register_scores(adapter: VLMAdapter, samples: list[Sample], batch_size: int) -> dict[str, np.ndarray]:
    """Per sample: [n_visual] L2 norm of each token's vision features (the projector input)."""
    out, t0 = {}, time.monotonic()
    n_images = len({s.image_id for s in samples})
    bar = tqdm(total=n_images, desc="register scores", disable=not samples)
    for chunk, batch in prepared_batches(adapter, samples, "classification", batch_size, unique_images=True):
        ins, _ = projector_io(adapter, batch)
        bar.update(len(chunk))
        for s, feats in zip(chunk, ins):
            out[s.image_id] = feats.norm(dim=-1).numpy()
    bar.close()
    log.info("register scores: %d images in %.1f s", len(out), time.monotonic() - t0)
    return {s.sample_id: out[s.image_id] for s in samples}


def ig_scores(adapter: VLMAdapter, samples: list[Sample], tasks: list[str], clean: pd.DataFrame, ig: Any,
              mean: Any, completeness: list[dict[str, Any]] | None = None) -> dict[tuple[str, str], np.ndarray]:
    """Per (sample, task): IG attribution of the clean run's answer: for yes/no classification
    log P(yes)/(P(yes)+P(no)) (the clean answer is yes or no: its margin), for list or open
    classification and for localization the teacher-forced log-probability of the clean generated
    text (the list, the box). ig: experiment.integrated_gradients.

    Every (sample, task) is one target of one `integrated_gradients_batch` call, task by task (the
    prompts of one task have similar lengths, so passes that mix targets pad little).

    completeness: when given, one row per target is appended (`completeness_rows`): f at the
    image and at the baseline, the attributions' sum, and how far the sum is from f(x) - f(b) (the
    midpoint rule's error; one more forward pass per target, no backward)."""
    baseline = mean if str(ig.baseline) == "mean" else None
    answers = clean.set_index(["sample_id", "task"])["answer"]
    out, t0 = {}, time.monotonic()
    keys, targets = [], []
    for task in tasks:
        for s in samples:
            answer = None
            if task == "localization" or adapter.classification_mode != "yes_no":
                text = str(answers.get((s.sample_id, task), "") or "")
                answer = (str(adapter.cfg.classification.answer_prefix) + text) if text else None
                if answer is None:  # no clean answer to attribute: rank nothing above random
                    out[(s.sample_id, task)] = np.zeros(adapter.n_visual_tokens(s.width, s.height))
                    continue
            keys.append((s.sample_id, task))
            targets.append(Target(s.load_image, adapter.prompt(task, s.category), answer))
    attrs = integrated_gradients_batch(adapter, targets, baseline=baseline, steps=int(ig.steps),
                                       batch_size=int(ig.batch_size), progress=bool(targets),
                                       endpoints=completeness is not None)
    for key, (attr, _, _) in zip(keys, attrs):
        out[key] = np.abs(attr) if str(ig.rank_by) == "abs" else attr
    if completeness is not None:
        completeness.extend(completeness_rows(keys, attrs, int(ig.steps)))
    log.info("integrated gradients: %d samples x %d tasks in %.1f s", len(samples), len(tasks), time.monotonic() - t0)
    return out


def _head_means(ctx: Any) -> dict[str, HeadMeans]:
    """Per task, head means of the run's first `experiment.mean_samples` samples, stored in the run
    directory once (head_means-<task>.pt): a resumed run and every shard read the same file. The
    run directory's config fingerprint (`vlmloc.rundir`) already pins the model, data and settings
    they depend on."""
    exp, cfg = ctx.cfg.experiment, ctx.cfg
    n = int(exp.mean_samples)
    ref = ctx.samples[:n]
    t0 = time.monotonic()

    def compute(task: str) -> HeadMeans:
        return head_means(ctx.adapter, ref, task, n, batch_size=int(cfg.batch_size), answer_mean=str(exp.answer_mean))

    means = {str(t): computed_once(
        ctx.run_dir / f"head_means-{t}.pt", lambda t=str(t): compute(t),
        lambda v, f: torch.save(dataclasses.asdict(v), f),
        lambda p: HeadMeans(**torch.load(p, map_location=ctx.adapter.device, weights_only=True)))
        for t in exp.tasks}
    log.info("head means over %d reference samples per task: %.1f s", len(ref), time.monotonic() - t0)
    return means


def completeness_rows(keys: list[tuple[str, str]], attrs: list[tuple[np.ndarray, float, float]],
                      steps: int) -> list[dict[str, Any]]:
    """Per target (sample_id, task): f(x), f(b), the attributions' sum, gap = sum - (f(x) - f(b)) and
    relative_gap = |gap| / |f(x) - f(b)| (NaN when f(x) = f(b))."""
    rows = []
    for (sample_id, task), (attr, f_x, f_b) in zip(keys, attrs):
        total, change = float(np.sum(attr)), f_x - f_b
        rows.append({"sample_id": sample_id, "task": task, "steps": steps, "f_x": f_x, "f_b": f_b,
                     "attribution_sum": total, "gap": total - change,
                     "relative_gap": abs(total - change) / abs(change) if change != 0 else float("nan")})
    return rows


IG_COMPLETENESS_FILE = "ig_completeness.parquet"
COMPLETENESS_COLUMNS = ["sample_id", "task", "steps", "f_x", "f_b", "attribution_sum", "gap", "relative_gap"]
IG_STEPS_CHECK_FILE = "ig_steps_check.parquet"


def _ig(ctx: Any) -> dict[tuple[str, str], np.ndarray]:
    """The IG scores of this run's samples; their completeness written to ig_completeness.parquet
    (this shard's copy when sharded) and its median relative gap per task logged."""
    rows = ctx.store.load()
    clean = rows[rows["condition"] == BASELINE.name]
    completeness: list[dict[str, Any]] = []
    scores = ig_scores(ctx.adapter, ctx.work_samples, list(ctx.cfg.tasks), clean, ctx.cfg.experiment.integrated_gradients,
                       ctx.resources["mean_embedding"], completeness)
    table = pd.DataFrame(completeness, columns=COMPLETENESS_COLUMNS)
    table.to_parquet(ctx.run_dir / ctx.shard.file(IG_COMPLETENESS_FILE), index=False)
    ig = ctx.cfg.experiment.integrated_gradients
    for task, part in table.groupby("task"):
        log.info("integrated gradients, %s: completeness |sum - (f(x) - f(b))| / |f(x) - f(b)| median %.3f, "
                 "90th percentile %.3f over %d targets at %d steps (%s)", task, part["relative_gap"].median(),
                 part["relative_gap"].quantile(0.9), len(part), int(ig.steps), IG_COMPLETENESS_FILE)
    if len(ig.check_steps):
        check = ig_steps_check(ctx.adapter, ctx.work_samples[: int(ig.check_samples)], list(ctx.cfg.tasks), clean, ig,
                               ctx.resources["mean_embedding"], scores, table)
        check.to_parquet(ctx.run_dir / ctx.shard.file(IG_STEPS_CHECK_FILE), index=False)
        summary = steps_check_summary(check)
        (ctx.run_dir / ctx.shard.file(IG_STEPS_CHECK_FILE.replace(".parquet", ".md"))).write_text(
            f"# Integrated gradients: how many steps the ranking needs\n\n{to_markdown(summary, digits=3)}\n")
        log.info("integrated gradients, steps check (%s):\n%s", IG_STEPS_CHECK_FILE, summary.to_string(index=False))
    return scores


def ig_steps_check(adapter: VLMAdapter, samples: list[Sample], tasks: list[str], clean: pd.DataFrame, ig: Any,
                   mean: Any, full: dict[tuple[str, str], np.ndarray], full_completeness: pd.DataFrame) -> pd.DataFrame:
    """Per sample x task x step count (ig.check_steps, and ig.steps itself): the completeness gap and
    top_k_overlap, the share of the k tokens ranked highest at ig.steps (k = the object's token
    count, as the IG condition selects) that the ranking at this step count also ranks in its top k."""
    layouts = {s.sample_id: adapter.prepare([s.load_image()], [adapter.prompt("localization", s.category)]).layouts[0]
               for s in samples}
    ks = {s.sample_id: len(object_positions(layouts[s.sample_id], s)) for s in samples}
    own = full_completeness.set_index(["sample_id", "task"])["relative_gap"]
    rows = []
    for steps in [*sorted({int(x) for x in ig.check_steps}), int(ig.steps)]:
        completeness: list[dict[str, Any]] = []
        if steps == int(ig.steps):
            scores = full
        else:
            scores = ig_scores(adapter, samples, tasks, clean, OmegaConf.merge(ig, {"steps": steps}), mean,
                               completeness)
        gaps = {(r["sample_id"], r["task"]): r["relative_gap"] for r in completeness}
        for s in samples:
            lay, k = layouts[s.sample_id], ks[s.sample_id]
            for task in tasks:
                key = (s.sample_id, task)
                want = set(top_k_positions(lay, full[key], k).tolist())
                got = set(top_k_positions(lay, scores[key], k).tolist())
                gap = own.get(key, np.nan) if steps == int(ig.steps) else gaps.get(key, np.nan)
                rows.append({"sample_id": s.sample_id, "task": task, "steps": steps, "k": k,
                             "top_k_overlap": len(want & got) / k if k else np.nan, "relative_gap": float(gap)})
    return pd.DataFrame(rows)


def steps_check_summary(check: pd.DataFrame) -> pd.DataFrame:
    """Per task and step count: median completeness gap, mean top-k overlap, targets."""
    return (check.groupby(["task", "steps"])
            .agg(median_relative_gap=("relative_gap", "median"), mean_top_k_overlap=("top_k_overlap", "mean"),
                 targets=("sample_id", "size"))
            .reset_index().round(3))



def run_resources(ctx: Any) -> Resources:
    """The resources of a run (`vlmloc.runner.RunContext`), each computed on first use."""
    providers: dict[str, Callable[[], Any]] = {
        "adapter": lambda: ctx.adapter,
        "mean_embedding": lambda: mean_visual_embedding(ctx),
        "register_scores": lambda: register_scores(ctx.adapter, ctx.work_samples, int(ctx.cfg.batch_size)),
        "integrated_gradients": lambda: _ig(ctx),
        "head_means": lambda: _head_means(ctx),
    }
    return Resources(providers)
