"""Shuffle (Table 2): permute visual tokens at the LLM input, globally or only inside the object mask.

A permutation moves embeddings, never changes them: positions dst take the clean embeddings of
positions src = dst[perm], seeded per sample so every batch draws the same permutation.
- global: every visual token, across tiles;
- object: the object's tokens (p = 0), each permuted within its own tile (`experiment.within=tile`:
  an InternVL token never moves between the thumbnail and the local crops) or across all of the
  image's tiles (`within=image`). LLaVA has one tile.
"""

from __future__ import annotations

from typing import Any

from vlmloc.runner import RunContext
from vlmloc.conditions import BASELINE, AllTokens, Condition, ObjectTokens, Permute
from vlmloc.reports.tables import paper_table, write_summary

SCOPES = ("global", "object")


def shuffle_condition(scope: str, seed: int, within: str = "tile") -> Condition:
    if scope not in SCOPES:
        raise ValueError(f"unknown shuffle scope {scope!r}; expected global or object")
    if within not in ("tile", "image"):
        raise ValueError(f"unknown shuffle experiment.within={within!r}; expected tile or image")
    tokens, within = (AllTokens(), "image") if scope == "global" else (ObjectTokens(), within)
    return Condition(f"shuffle:{scope}", (Permute(tokens, seed, ("shuffle", scope), within),),
                     {"strategy": "shuffle", "scope": scope})


def conditions(exp: Any, seed: int) -> list[Condition]:
    return [BASELINE] + [shuffle_condition(str(s), seed, str(exp.within)) for s in exp.scopes]


def check_config(cfg) -> None:
    conditions(cfg.experiment, int(cfg.seed))


def run(ctx: RunContext) -> None:
    conds = conditions(ctx.cfg.experiment, int(ctx.cfg.seed))
    results = ctx.run_conditions(conds, list(ctx.cfg.tasks))
    write_summary(ctx.run_dir, ctx.cfg, paper_table(results, [c.name for c in conds]), "table2_shuffle.md")
