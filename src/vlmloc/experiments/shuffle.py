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
from vlmloc.evaluation import BASELINE, Condition, evaluate
from vlmloc.experiments.reporting import paper_table, write_summary
from vlmloc.models.layout import VisualLayout
from vlmloc.selection import object_positions, row_rng

log = logging.getLogger("vlmloc.experiments.shuffle")


def shuffle_condition(scope: str, seed: int) -> Condition:
    def edits(sample: Sample, layout: VisualLayout, task: str) -> list[TokenEdit]:
        dst = layout.positions if scope == "global" else object_positions(layout, sample, 0)
        perm = row_rng(seed, sample.sample_id, "shuffle", scope).permutation(len(dst))
        return [TokenEdit.copy(dst=dst, src=np.asarray(dst)[perm])]

    if scope not in ("global", "object"):
        raise ValueError(f"unknown shuffle scope {scope!r}; expected global or object")
    return Condition(f"shuffle:{scope}", edits, {"strategy": "shuffle", "scope": scope})


def run(ctx: RunContext) -> None:
    cfg = ctx.cfg
    conditions = [BASELINE] + [shuffle_condition(str(s), int(cfg.seed)) for s in cfg.experiment.scopes]
    done = ctx.store.done_keys()
    df = evaluate(ctx.adapter, ctx.samples, list(cfg.tasks), batch_size=int(cfg.batch_size), conditions=conditions, skip=done) \
        if any((s.sample_id, t, c.name) not in done for s in ctx.samples for t in cfg.tasks for c in conditions) else None
    if df is not None and len(df):
        ctx.store.add(df)
        ctx.write_provenance()
    else:
        log.info("all conditions already evaluated in %s: nothing to do", ctx.run_dir)
    results = ctx.store.load()
    write_summary(ctx, results, paper_table(results, [c.name for c in conditions]), "table2_shuffle.md")
