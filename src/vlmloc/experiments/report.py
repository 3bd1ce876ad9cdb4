"""The paper report rebuilt from finished runs alone (`experiment=report runs=[dir1,dir2,...]`).

No model and no data are loaded: `check_inputs` replaces the runner's data and weight checks with
the run directories' own (each must exist and be finished, `vlmloc.reports.runs`), and `run` reads
only their run.json and parquet tables (`vlmloc.reports.paper_report`). Every run is read afresh
each time, so a rerun into the same directory rebuilds the report.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from omegaconf import MISSING, OmegaConf

from vlmloc.errors import ConfigError
from vlmloc.reports.bootstrap import Bootstrap
from vlmloc.reports.paper_report import write_report
from vlmloc.reports.runs import load_runs
from vlmloc.reports.sections import Options
from vlmloc.runner import RunContext
from vlmloc.settings import at_least, load, register

RECOMPUTES_CHANGED_CONFIG = True  # the report is rebuilt from its inputs on every run


@dataclass(frozen=True)
class BootstrapSettings:
    """experiment.bootstrap: resamples, seed and level of every interval."""

    resamples: int = MISSING
    seed: int = MISSING
    level: float = MISSING

    def __post_init__(self) -> None:
        at_least("experiment.bootstrap.resamples", self.resamples, 1)
        if not 0.0 < self.level < 1.0:
            raise ValueError(f"experiment.bootstrap.level must lie strictly between 0 and 1, got {self.level}")


@register("report")
@dataclass(frozen=True)
class Settings:
    """experiment.* of configs/experiment/report.yaml, typed and checked."""

    name: str = MISSING
    bootstrap: BootstrapSettings = MISSING
    critical_mf: tuple[float, ...] = MISSING
    top_k: int = MISSING
    max_shared: int = MISSING
    head_ks: tuple[int, ...] = MISSING
    probe_mid_band: tuple[float, ...] = MISSING

    def __post_init__(self) -> None:
        if not self.critical_mf:
            raise ValueError("experiment.critical_mf must list one or more MF thresholds")
        at_least("experiment.top_k", self.top_k, 1)
        at_least("experiment.max_shared", self.max_shared, 0)
        for k in self.head_ks:
            at_least("experiment.head_ks", k, 1)
        band = list(self.probe_mid_band)
        if len(band) != 2 or not 0.0 <= band[0] <= band[1] <= 1.0:
            raise ValueError(f"experiment.probe_mid_band must be [low, high] with 0 <= low <= high <= 1, got {band}")

    def options(self) -> Options:
        b = self.bootstrap
        return Options(Bootstrap(b.resamples, b.seed, b.level), tuple(self.critical_mf), self.top_k, self.max_shared,
                       tuple(self.head_ks), (self.probe_mid_band[0], self.probe_mid_band[1]))


def settings(cfg: Any) -> Settings:
    return load(Settings, cfg)


def run_dirs(cfg: Any) -> list[str]:
    """The top-level `runs`: one or more directories."""
    runs = cfg.get("runs")
    if runs is None or OmegaConf.is_missing(cfg, "runs"):
        raise ConfigError("experiment=report needs runs=[<run dir>,...]: the finished runs to report on")
    runs = [str(r) for r in (runs if OmegaConf.is_list(runs) else [runs])]
    if not runs:
        raise ConfigError("runs is empty: give one or more run directories, e.g. runs=[outputs/a,outputs/b]")
    return runs


def check_config(cfg: Any) -> None:
    run_dirs(cfg)


def check_inputs(ctx: RunContext) -> None:
    """Every run directory exists and is finished; no data or model is looked at."""
    load_runs(run_dirs(ctx.cfg))


def run(ctx: RunContext) -> None:
    runs = load_runs(run_dirs(ctx.cfg))
    text = write_report(runs, ctx.run_dir, settings(ctx.cfg).options())
    print(f"\nreport | {len(runs)} runs | {ctx.run_dir / 'report.md'}\n\n{text}")
