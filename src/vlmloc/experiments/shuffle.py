"""Shuffle (Table 2): permute visual tokens at the LLM input, globally or only inside the object mask.

A permutation moves embeddings, never changes them: positions dst take the clean embeddings of
positions src = dst[perm], seeded per sample so every batch draws the same permutation.
"""

from __future__ import annotations

import logging

import numpy as np

from vlmloc.app import RunContext
from vlmloc.data.sample import Sample
from vlmloc.engine.token_edits import TokenEdit
from vlmloc.evaluation import BASELINE, Condition
from vlmloc.experiments.reporting import paper_table, write_summary
from vlmloc.models.layout import VisualLayout
from vlmloc.selection import row_rng

log = logging.getLogger("vlmloc.experiments.shuffle")


def shuffle_condition(scope: str, seed: int, within: str = "tile") -> Condition:
    """global: every visual token, across tiles. object: the object's tokens (p = 0), each permuted
    within its own tile (`within="tile"`: an InternVL token never moves between the thumbnail and
    the local crops) or across all of the image's tiles (`within="image"`). LLaVA has one tile."""

    def edits(sample: Sample, layout: VisualLayout, task: str) -> list[TokenEdit]:
        rng = row_rng(seed, sample.sample_id, "shuffle", scope)
        if scope == "global":
            return [TokenEdit.copy(dst=layout.positions, src=layout.positions[rng.permutation(layout.n_visual)])]
        selected = layout.object_tokens(sample.mask(), 0)
        dst = layout.positions[selected]
        groups = layout.tile[selected] if within == "tile" else np.zeros(len(dst), dtype=np.int64)
        src = np.empty_like(dst)
        for g in np.unique(groups):
            idx = np.flatnonzero(groups == g)
            src[idx] = dst[idx][rng.permutation(len(idx))]
        return [TokenEdit.copy(dst=dst, src=src)]

    if scope not in ("global", "object"):
        raise ValueError(f"unknown shuffle scope {scope!r}; expected global or object")
    if within not in ("tile", "image"):
        raise ValueError(f"unknown shuffle experiment.within={within!r}; expected tile or image")
    return Condition(f"shuffle:{scope}", edits, {"strategy": "shuffle", "scope": scope})


def run(ctx: RunContext) -> None:
    cfg = ctx.cfg
    within = str(cfg.experiment.within)
    conditions = [BASELINE] + [shuffle_condition(str(s), int(cfg.seed), within) for s in cfg.experiment.scopes]
    done = ctx.store.done_keys()
    df = ctx.evaluate(ctx.samples, list(cfg.tasks), conditions=conditions, skip=done) \
        if any((s.sample_id, t, c.name) not in done for s in ctx.samples for t in cfg.tasks for c in conditions) else None
    if df is not None and len(df):
        ctx.write_provenance()
    else:
        log.info("all conditions already evaluated in %s: nothing to do", ctx.run_dir)
    results = ctx.store.load()
    write_summary(ctx, results, paper_table(results, [c.name for c in conditions]), "table2_shuffle.md")
