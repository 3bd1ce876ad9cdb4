"""Baseline: classification and localization of every sample, no intervention."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
from omegaconf import MISSING

from vlmloc.conditions import BASELINE
from vlmloc.paraphrases import Paraphrased
from vlmloc.reports.tables import add_baseline_delta, summarize, to_markdown
from vlmloc.runner import RunContext
from vlmloc.settings import register


@register("baseline")
@dataclass(frozen=True)
class Settings(Paraphrased):
    """experiment.* of configs/experiment/baseline.yaml, typed and checked."""

    name: str = MISSING


def run(ctx: RunContext) -> None:
    ctx.run_conditions([BASELINE], list(ctx.cfg.tasks))


def report(ctx: RunContext, results: pd.DataFrame) -> None:
    cfg = ctx.cfg
    table = to_markdown(add_baseline_delta(summarize(results)))
    (ctx.run_dir / "summary.md").write_text(table + "\n")
    print(f"\n{cfg.experiment.name} | model={cfg.model.name} | data={cfg.data.name} | {ctx.run_dir}\n{table}")
