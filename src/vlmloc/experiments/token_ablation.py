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
The clean run comes first: integrated gradients attribute its answers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from omegaconf import MISSING

import pandas as pd

from vlmloc.conditions import BASELINE, AboveMedian, Condition, ObjectTokens, RandomTokens, Replace, TopScored
from vlmloc.reports.tables import model_paper_values, paper_table, with_paper, write_summary
from vlmloc.runner import RunContext
from vlmloc.selection import RANDOM_FROM
from vlmloc.settings import at_least, load, one_of, register, subset_of
from vlmloc.paraphrases import Paraphrased

STRATEGIES = ("object", "register", "integrated_gradients", "random")
IG_BASELINES = ("mean", "zero")
IG_RANK_BY = ("value", "abs")



# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class Register:
    """experiment.register: the high-norm token threshold."""

    factor: float = MISSING


@dataclass(frozen=True)
class IntegratedGradients:
    """experiment.integrated_gradients (read by `vlmloc.resources.ig_scores`)."""

    baseline: str = MISSING
    steps: int = MISSING
    batch_size: int = MISSING
    rank_by: str = MISSING
    check_steps: tuple[int, ...] = MISSING
    check_samples: int = MISSING

    def __post_init__(self) -> None:
        for s in self.check_steps:
            at_least("experiment.integrated_gradients.check_steps[]", s, 1)
        at_least("experiment.integrated_gradients.check_samples", self.check_samples, 1)
        one_of("experiment.integrated_gradients.baseline", self.baseline, IG_BASELINES)
        at_least("experiment.integrated_gradients.steps", self.steps, 1)
        at_least("experiment.integrated_gradients.batch_size", self.batch_size, 1)
        one_of("experiment.integrated_gradients.rank_by", self.rank_by, IG_RANK_BY)


@register("token_ablation")
@dataclass(frozen=True)
class Settings(Paraphrased):
    """experiment.* of configs/experiment/token_ablation.yaml, typed and checked."""

    name: str = MISSING
    strategies: tuple[str, ...] = MISSING
    pads: tuple[int, ...] = MISSING
    random_from: str = MISSING
    register: Register = MISSING
    integrated_gradients: IntegratedGradients = MISSING

    def __post_init__(self) -> None:
        subset_of("experiment.strategies", self.strategies, STRATEGIES)
        one_of("experiment.random_from", self.random_from, RANDOM_FROM)


def settings(cfg: Any) -> Settings:
    """experiment.* of `cfg` as Settings; a bad value is a ConfigError naming its key."""
    return load(Settings, cfg)


# --------------------------------------------------------------------------- conditions


def object_condition(pad: int) -> Condition:
    return Condition(f"object_tokens:p={pad:+d}" if pad else "object_tokens", (Replace(ObjectTokens(pad)),),
                     {"strategy": "object", "pad": pad})


def random_condition(seed: int, among: str = "image") -> Condition:
    """As many random tokens as the object has, from the image area (or every token: among="all")."""
    return Condition("random_tokens", (Replace(RandomTokens(seed, ("random",), among=among)),), {"strategy": "random", "pad": 0})


def register_condition(factor: float) -> Condition:
    return Condition("register", (Replace(AboveMedian("register_scores", factor)),), {"strategy": "register", "pad": 0})


def ig_condition() -> Condition:
    return Condition("integrated_gradients", (Replace(TopScored("integrated_gradients")),),
                     {"strategy": "integrated_gradients", "pad": 0})


def conditions(st: Settings, seed: int) -> list[Condition]:
    """baseline, then each strategy's conditions in experiment.strategies order."""
    conds = [BASELINE]
    for strategy in st.strategies:
        if strategy == "object":
            conds += [object_condition(p) for p in st.pads]
        elif strategy == "random":
            conds.append(random_condition(seed, st.random_from))
        elif strategy == "register":
            conds.append(register_condition(st.register.factor))
        elif strategy == "integrated_gradients":
            conds.append(ig_condition())
    return conds


# --------------------------------------------------------------------------- run


def run(ctx: RunContext) -> None:
    tasks = list(ctx.cfg.tasks)
    conds = conditions(settings(ctx.cfg), int(ctx.cfg.seed))
    ctx.run_conditions([BASELINE], tasks)
    ctx.run_conditions(conds, tasks)


def report(ctx: RunContext, results: pd.DataFrame) -> None:
    names = [c.name for c in conditions(settings(ctx.cfg), int(ctx.cfg.seed))]
    table = with_paper(paper_table(results, names), model_paper_values(ctx.cfg, "table1"))
    write_summary(ctx.run_dir, ctx.cfg, table, "table1_token_ablation.md")
