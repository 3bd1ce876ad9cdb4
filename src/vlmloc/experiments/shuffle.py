"""Shuffle (Table 2): permute visual tokens at the LLM input, globally or only inside the object mask.

A permutation moves embeddings, never changes them: positions dst take the clean embeddings of
positions src = dst[perm], seeded per sample so every batch draws the same permutation.
- global: every visual token, across tiles;
- object: the object's tokens (p = 0), each permuted within its own tile (`experiment.within=tile`:
  an InternVL token never moves between the thumbnail and the local crops) or across all of the
  image's tiles (`within=image`). LLaVA has one tile.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from omegaconf import MISSING

import pandas as pd

from vlmloc.conditions import BASELINE, AllTokens, Condition, ObjectTokens, Permute
from vlmloc.reports.tables import model_paper_values, paper_table, with_paper, write_summary
from vlmloc.runner import RunContext
from vlmloc.settings import load, one_of, register, subset_of
from vlmloc.paraphrases import Paraphrased

SCOPES = ("global", "object")
WITHIN = ("tile", "image")


# --------------------------------------------------------------------------- config


@register("shuffle")
@dataclass(frozen=True)
class Settings(Paraphrased):
    """experiment.* of configs/experiment/shuffle.yaml, typed and checked."""

    name: str = MISSING
    scopes: tuple[str, ...] = MISSING
    within: str = MISSING

    def __post_init__(self) -> None:
        subset_of("experiment.scopes", self.scopes, SCOPES)
        one_of("experiment.within", self.within, WITHIN)


def settings(cfg: Any) -> Settings:
    """experiment.* of `cfg` as Settings; a bad value is a ConfigError naming its key."""
    return load(Settings, cfg)


# --------------------------------------------------------------------------- conditions


def shuffle_condition(scope: str, seed: int, within: str = "tile") -> Condition:
    if scope not in SCOPES:
        raise ValueError(f"unknown shuffle scope {scope!r}; expected global or object")
    if within not in WITHIN:
        raise ValueError(f"unknown shuffle experiment.within={within!r}; expected tile or image")
    tokens, within = (AllTokens(), "image") if scope == "global" else (ObjectTokens(), within)
    return Condition(f"shuffle:{scope}", (Permute(tokens, seed, ("shuffle", scope), within),),
                     {"strategy": "shuffle", "scope": scope})


def conditions(st: Settings, seed: int) -> list[Condition]:
    return [BASELINE] + [shuffle_condition(s, seed, st.within) for s in st.scopes]


# --------------------------------------------------------------------------- run


def run(ctx: RunContext) -> None:
    conds = conditions(settings(ctx.cfg), int(ctx.cfg.seed))
    ctx.run_conditions(conds, list(ctx.cfg.tasks))


def report(ctx: RunContext, results: pd.DataFrame) -> None:
    names = [c.name for c in conditions(settings(ctx.cfg), int(ctx.cfg.seed))]
    table = with_paper(paper_table(results, names), model_paper_values(ctx.cfg, "table2"))
    write_summary(ctx.run_dir, ctx.cfg, table, "table2_shuffle.md")
