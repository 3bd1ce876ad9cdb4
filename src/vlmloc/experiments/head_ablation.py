"""Head ablation (Fig. 5, 15): ablate the heads with the highest mean mediation fraction (MF)
cumulatively and measure both tasks, next to random heads matched per layer.

Input: a causal-mediation run (``experiment=cma``): ``<experiment.cma_dir>/mf.parquet``, one row
per sample x task x layer x head x positions with columns ``task``, ``layer``, ``head``,
``positions`` ("all" | "text"), ``mf`` and ``valid``. Heads are ranked per task by the mean of
``mf`` over the valid rows of ``positions == experiment.mf_positions`` (``vlmloc.head_ranking``); heads
without a valid row come last.

Conditions (besides the clean ``baseline``), for k on ``experiment.ks`` ("all" = every ranked
head; larger k are clipped):

- ``heads:top:k=K``: the K highest-ranked heads of the measured task's own ranking;
- ``heads:random:k=K``: random heads matched per layer to that top-K set (as many heads in each
  layer, drawn uniformly from the layer's heads, seeded by seed, task and layer, nested: the
  K-set contains every smaller set): the control a referee asked for;
- ``heads:cls_critical:k=K``: the classification ranking's top K, measured on localization only
  ("recognition, then localization").

Ablation (``experiment.ablation``): ``mean`` replaces a head's output by its mean over clean runs
of the first ``experiment.mean_samples`` samples with the measured task's prompt, per position
with the same role (chat prefix aligned on the image start, each visual token by view and place
in its tile, the text after the image aligned on the sequence end), generated tokens taking the
mean over the text positions after the image (``experiment.answer_mean=text``; ``prompt`` = over
every prompt position) (``vlmloc.engine.head_means``); ``zero`` sets it to 0. Every position is ablated, prompt and
generated answer.

Outputs: ``results.parquet`` (extra columns ``head_set``, ``k``, ``ranking``, ``heads_edited``),
``fig5_head_ablation.md`` (accuracy and change per condition, and the top heads of each ranking
with their layer and head indices), ``fig5_head_ablation.png`` (accuracy vs k, top vs random,
a panel per task, the classification-critical curve on the localization panel).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import MISSING

from vlmloc.conditions import ABLATIONS, BASELINE, AblateHeads, Condition
from vlmloc.engine.head_means import ANSWER_MEANS
from vlmloc.errors import ConfigError
from vlmloc.experiments.cma import POSITIONS
from vlmloc.head_ranking import (MF_FILE, MF_STATISTICS, N_TOP_LISTED, Head, check_heads_fit, check_same_model,
                                 k_values, load_mf, random_heads, rankings, top_heads)
from vlmloc.models.loading import lm_shape
from vlmloc.reports import head_ablation as head_report
from vlmloc.results import TASKS
from vlmloc.runner import RunContext
from vlmloc.settings import at_least, load, one_of, register, subset_of
from vlmloc.paraphrases import Paraphrased

HEAD_SETS = ("top", "random", "cls_critical")


# --------------------------------------------------------------------------- config


@register("head_ablation")
@dataclass(frozen=True)
class Settings(Paraphrased):
    """experiment.* of configs/experiment/head_ablation.yaml, typed and checked."""

    name: str = MISSING
    cma_dir: Path = MISSING
    rank_by: str = MISSING
    mf_positions: str = MISSING
    ks: tuple[Any, ...] = MISSING  # integers >= 1 and "all": no single element type
    head_sets: tuple[str, ...] = MISSING
    ablation: str = MISSING
    answer_mean: str = MISSING
    mean_samples: int = MISSING
    tasks: tuple[str, ...] = MISSING

    def __post_init__(self) -> None:
        for k in self.ks:
            if str(k) != "all" and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
                raise ValueError(f"experiment.ks holds integers >= 1 or 'all', got {list(self.ks)}")
        if not self.ks:
            raise ValueError("experiment.ks is empty")
        head_sets = subset_of("experiment.head_sets", self.head_sets, HEAD_SETS, distinct=True)
        one_of("experiment.ablation", self.ablation, ABLATIONS)
        at_least("experiment.mean_samples", self.mean_samples, 1)
        tasks = subset_of("experiment.tasks", self.tasks, TASKS)
        if head_sets == ("cls_critical",) and "localization" not in tasks:
            raise ValueError("head_sets=[cls_critical] is measured on localization: add localization to experiment.tasks")
        one_of("experiment.rank_by", self.rank_by, MF_STATISTICS)
        one_of("experiment.answer_mean", self.answer_mean, ANSWER_MEANS)
        one_of("experiment.mf_positions", self.mf_positions, POSITIONS)

    @property
    def ranking_tasks(self) -> list[str]:
        """Tasks whose ranking the conditions use."""
        need = set(self.tasks) if {"top", "random"} & set(self.head_sets) else set()
        if "cls_critical" in self.head_sets:
            need.add("classification")
        return [t for t in TASKS if t in need]


def settings(cfg: Any) -> Settings:
    """`cfg.experiment` as `Settings`; a missing cma_dir is named with what to point it at."""
    exp = cfg.experiment
    # `???` or null: the schema would only say "missing value", not which run to give
    if "cma_dir" not in exp or exp.cma_dir is None:
        raise ConfigError(
            "experiment=head_ablation needs experiment.cma_dir=<run directory of experiment=cma>, "
            "the causal-mediation run whose mf.parquet ranks the heads"
        )
    return load(Settings, cfg)


def cma_rankings(st: Settings) -> dict[str, pd.DataFrame]:
    """task -> its heads ranked by `rank_by` MF over the cma run's rows (`head_ranking.rank_heads`)."""
    return rankings(load_mf(st.cma_dir), st.ranking_tasks, st.mf_positions, st.rank_by, st.cma_dir / MF_FILE)


def check_config(cfg: Any) -> None:
    """Fail fast, before data or model work: settings, the cma run's mf.parquet, the same model."""
    st = settings(cfg)
    cma_rankings(st)
    check_same_model(st.cma_dir, str(cfg.model.name))


# --------------------------------------------------------------------------- conditions


def condition_name(head_set: str, k: int) -> str:
    return f"heads:{head_set}:k={k}"


@dataclass(frozen=True)
class Plan:
    """The rankings and k grid that decide which heads each condition ablates (no model needed)."""

    ranks: Mapping[str, pd.DataFrame]
    st: Settings

    @property
    def ks(self) -> list[int]:
        return k_values(self.st.ks, max(len(r) for r in self.ranks.values()))

    def heads(self, head_set: str, k: int, task: str, n_heads: int, seed: int) -> list[Head]:
        if head_set == "top":
            return top_heads(self.ranks[task], k)
        if head_set == "random":
            return random_heads(top_heads(self.ranks[task], k), n_heads, seed, "heads_random", task)
        if head_set == "cls_critical":
            return top_heads(self.ranks["classification"], k)
        raise ValueError(f"unknown head set {head_set!r}; expected one of {HEAD_SETS}")


def conditions(plan: Plan, n_heads: int, *, seed: int) -> list[Condition]:
    """baseline, then per head set and k: the heads of each measured task, ablated by `ablation`."""
    conds = [Condition(BASELINE.name, columns={"head_set": "none", "k": 0, "ranking": ""})]
    for head_set in plan.st.head_sets:
        every = tuple(plan.st.tasks)
        tasks = tuple(t for t in every if t == "localization") if head_set == "cls_critical" else every
        for k in plan.ks:
            heads = tuple((t, tuple(plan.heads(head_set, k, t, n_heads, seed))) for t in tasks)
            columns = {"head_set": head_set, "k": k, "ranking": "classification" if head_set == "cls_critical" else "task"}
            conds.append(Condition(condition_name(head_set, k), (AblateHeads(heads, plan.st.ablation),), columns, tasks))
    return conds


# --------------------------------------------------------------------------- run


def run(ctx: RunContext) -> None:
    cfg = ctx.cfg
    st = settings(cfg)
    plan = Plan(cma_rankings(st), st)
    n_layers, n_heads = lm_shape(cfg.model)
    check_heads_fit(plan.ranks, n_layers, n_heads, st.cma_dir / MF_FILE)
    conds = conditions(plan, n_heads, seed=int(cfg.seed))

    def provenance() -> dict:
        return {"head_ablation": {
            "cma_dir": str(st.cma_dir),
            "mean_samples": min(st.mean_samples, len(ctx.samples)) if st.ablation == "mean" else 0,
            "top_heads": {t: [list(h) for h in top_heads(r, N_TOP_LISTED)] for t, r in plan.ranks.items()},
        }}

    ctx.run_conditions(conds, list(st.tasks), provenance=provenance)


def report(ctx: RunContext, results: pd.DataFrame) -> None:
    st = settings(ctx.cfg)
    plan = Plan(cma_rankings(st), st)
    names = [c.name for c in conditions(plan, lm_shape(ctx.cfg.model)[1], seed=int(ctx.cfg.seed))]
    head_report.write(results, ctx.run_dir, ctx.cfg, names=names, ranks=plan.ranks)
