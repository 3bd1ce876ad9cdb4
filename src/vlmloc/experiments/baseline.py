"""Baseline: classification and localization of every sample, no intervention."""

from __future__ import annotations

import logging

from vlmloc.app import RunContext
from vlmloc.evaluation import BASELINE
from vlmloc.results import add_baseline_delta, summarize, to_markdown

log = logging.getLogger("vlmloc.experiments.baseline")
CONDITION = BASELINE.name


def run(ctx: RunContext) -> None:
    cfg = ctx.cfg
    tasks = list(cfg.tasks)
    done = ctx.store.done_keys()
    todo = [s for s in ctx.samples if any((s.sample_id, t, CONDITION) not in done for t in tasks)]
    if todo:
        log.info("evaluating %d of %d samples (%d already done)", len(todo), len(ctx.samples), len(ctx.samples) - len(todo))
        ctx.evaluate(todo, tasks, skip=done)
        ctx.write_provenance()
    else:
        log.info("all %d samples already evaluated in %s: nothing to do", len(ctx.samples), ctx.run_dir)
    summary = add_baseline_delta(summarize(ctx.store.load()))
    table = to_markdown(summary)
    (ctx.run_dir / "summary.md").write_text(table + "\n")
    print(f"\n{cfg.experiment.name} | model={cfg.model.name} | data={cfg.data.name} | {ctx.run_dir}\n{table}")
