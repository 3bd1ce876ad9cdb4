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

from typing import Any

from vlmloc.runner import RunContext
from vlmloc.conditions import BASELINE, AboveMedian, Condition, ObjectTokens, RandomTokens, Replace, TopScored
from vlmloc.reports.tables import paper_table, write_summary
from vlmloc.selection import RANDOM_FROM

STRATEGIES = ("object", "register", "integrated_gradients", "random")


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


def conditions(exp: Any, seed: int) -> list[Condition]:
    """baseline, then each strategy's conditions in experiment.strategies order."""
    conds = [BASELINE]
    for strategy in exp.strategies:
        if strategy == "object":
            conds += [object_condition(int(p)) for p in exp.pads]
        elif strategy == "random":
            conds.append(random_condition(seed, str(exp.random_from)))
        elif strategy == "register":
            conds.append(register_condition(float(exp.register.factor)))
        elif strategy == "integrated_gradients":
            conds.append(ig_condition())
        else:
            raise ValueError(f"unknown token selection strategy {strategy!r}; expected one of {list(STRATEGIES)}")
    return conds


def check_config(cfg) -> None:
    if str(cfg.experiment.random_from) not in RANDOM_FROM:
        raise ValueError(f"experiment.random_from must be one of {list(RANDOM_FROM)}, got {cfg.experiment.random_from!r}")
    conditions(cfg.experiment, int(cfg.seed))


def run(ctx: RunContext) -> None:
    tasks = list(ctx.cfg.tasks)
    conds = conditions(ctx.cfg.experiment, int(ctx.cfg.seed))
    ctx.run_conditions([BASELINE], tasks)
    results = ctx.run_conditions(conds, tasks)
    write_summary(ctx.run_dir, ctx.cfg, paper_table(results, [c.name for c in conds]), "table1_token_ablation.md")
