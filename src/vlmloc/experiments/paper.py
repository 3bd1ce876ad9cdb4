"""Every experiment the paper reports for one model, in dependency order, then the paper report.

    python -m vlmloc experiment=paper model=llava7b data=coco data.root=/data/coco experiment.probe_root=/data/imagenet

Each entry of `experiment.runs` runs as `experiment=<name>` would with this command's other
overrides (`vlmloc.experiments.suite.run_config`), into `<run_dir>/<name>/`, sharing one loaded
model: baseline, token ablation, shuffle, extension, view ablation (InternVL), knockout, the
object-removal pairs, CMA on those pairs (`experiment.data.cma`), head ablation ranked by that CMA
run (`{dir}` in a value is this run directory), position probes (on `experiment.probe_root` with
data=imagenet, or on the command's own data when null). A finished sub-run does no work again, so
the whole is resumable: rerun the command. An `experiment.optional` run whose own check refuses
the model (view ablation on LLaVA) is skipped and said so. The report (`experiment=report`'s
settings, `experiment.report` laid over them) is written at the end: report.md, report.html.
`experiment.paraphrases` (null, all or [k, ...]) reruns every run that has a results table under
those prompt wordings (`vlmloc.paraphrases`); the report then shows each table's spread.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf

from vlmloc.experiments import report as report_experiment
from vlmloc.experiments.suite import _compose, experiment_file, run_config, run_each
from vlmloc.paraphrases import Paraphrased
from vlmloc.reports.paper_report import write_report
from vlmloc.reports.runs import load_runs
from vlmloc.runner import RunContext
from vlmloc.settings import check_experiment, check_settings, load, register

log = logging.getLogger("vlmloc.experiments.paper")


@register("paper")
@dataclass(frozen=True)
class Settings:
    """experiment.* of configs/experiment/paper.yaml, typed and checked."""

    name: str = MISSING
    runs: tuple[str, ...] = MISSING  # experiments, in dependency order
    optional: tuple[str, ...] = MISSING  # runs skipped when their own check refuses the model
    overrides: dict[str, Any] = MISSING  # run -> settings laid over its own experiment file's
    data: dict[str, Any] = MISSING  # run -> data values ({config: <data group>, key: value}) laid over its data
    probe_root: str | None = MISSING  # image folder of the position probes (data=imagenet); null = the command's data
    report: dict[str, Any] = MISSING  # experiment=report settings laid over configs/experiment/report.yaml's
    paraphrases: Any = MISSING  # null, all or [k, ...]: every run with a results table also runs under those prompt wordings

    def __post_init__(self) -> None:
        runs = list(self.runs)
        if not runs or "paper" in runs or "suite" in runs or "report" in runs:
            raise ValueError(f"experiment.runs must list the paper's experiments (not paper, suite or report), got {runs}")
        for field, names in (("runs", runs), ("optional", self.optional), ("overrides", self.overrides),
                             ("data", self.data)):
            unknown = [n for n in names if not experiment_file(n).exists()]
            if unknown:
                raise ValueError(f"experiment.{field} names {unknown}: no such experiment under configs/experiment/")


def settings(cfg: DictConfig) -> Settings:
    return load(Settings, cfg)


def data_of(st: Settings, name: str) -> dict[str, Any] | None:
    """The values laid over run `name`'s data: its `experiment.data` entry; the probes' image folder."""
    entry = dict(st.data.get(name) or {})
    if name == "position_probe" and st.probe_root is not None:
        entry = {"config": "imagenet", "root": str(st.probe_root), **entry}
    return entry or None


def planned(cfg: DictConfig, dir_: str) -> tuple[list[tuple[str, DictConfig]], dict[str, str]]:
    """(name, config) of every run to do, and the optional runs skipped with the reason.

    Every run's settings are checked here, before the first run starts; its further checks, which
    may read an earlier run's output (head ablation reads CMA's mf.parquet), when it starts."""
    st = settings(cfg)
    runs, skipped = [], {}
    for name in st.runs:
        sub = run_config(cfg, name, data_of(st, name), {"dir": dir_})
        module = importlib.import_module(f"vlmloc.experiments.{name}")
        if st.paraphrases is not None and issubclass(getattr(module, "Settings", object), Paraphrased):
            sub = OmegaConf.merge(sub, {"experiment": {"paraphrases": st.paraphrases}})
        try:
            check_experiment(module, sub) if name in st.optional else check_settings(module, sub)
        except ValueError as err:  # ConfigError is one
            if name not in st.optional:
                raise
            skipped[name] = str(err)
            continue
        runs.append((name, sub))
    return runs, skipped


def report_options(cfg: DictConfig) -> Any:
    """experiment=report's settings, this run's `experiment.report` laid over them."""
    node = OmegaConf.merge(_compose(["experiment=report", "runs=[]"]).experiment, settings(cfg).report)
    return report_experiment.settings(OmegaConf.create({"experiment": node})).options()


def check_config(cfg: DictConfig) -> None:
    """Every run's config composes and passes its experiment's own checks (optional ones may refuse)."""
    planned(cfg, str(cfg.get("run_dir", ".")))
    report_options(cfg)


def run(ctx: RunContext) -> None:
    runs, skipped = planned(ctx.cfg, str(ctx.run_dir))
    for name, why in skipped.items():
        log.warning("paper: experiment=%s skipped for model=%s: %s", name, ctx.cfg.model.name, why)
    parts = run_each(ctx, runs)
    parts += [f"## {name}\n\nnot run for model={ctx.cfg.model.name}: {why}\n" for name, why in skipped.items()]
    (ctx.run_dir / "summary.md").write_text("\n".join(parts))
    text = write_report(load_runs([ctx.run_dir / name for name, _ in runs]), ctx.run_dir, report_options(ctx.cfg))
    print(f"\npaper | model={ctx.cfg.model.name} | {ctx.run_dir}: " + ", ".join(f"{n}/" for n, _ in runs)
          + f"\nreport: {ctx.run_dir / 'report.md'}, {ctx.run_dir / 'report.html'}\n\n{text}")
