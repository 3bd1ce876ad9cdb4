"""Baseline: classification and localization of every sample, no intervention."""

from __future__ import annotations

import pandas as pd

from vlmloc.runner import RunContext
from vlmloc.conditions import BASELINE
from vlmloc.reports.tables import add_baseline_delta, summarize, to_markdown


def run(ctx: RunContext) -> None:
    ctx.run_conditions([BASELINE], list(ctx.cfg.tasks))


def report(ctx: RunContext, results: pd.DataFrame) -> None:
    cfg = ctx.cfg
    table = to_markdown(add_baseline_delta(summarize(results)))
    (ctx.run_dir / "summary.md").write_text(table + "\n")
    print(f"\n{cfg.experiment.name} | model={cfg.model.name} | data={cfg.data.name} | {ctx.run_dir}\n{table}")
