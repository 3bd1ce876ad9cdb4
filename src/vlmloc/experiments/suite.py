"""Several experiments in one command: the embedded default (`python -m vlmloc`).

Each entry of `experiment.runs` runs exactly as `python -m vlmloc experiment=<name>` would with
this command's other overrides, into `<run_dir>/<name>/`; its settings are
`configs/experiment/<name>.yaml` merged with `experiment.overrides.<name>`. The runs share one
loaded model, and every run's config is checked before the first one starts.
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from vlmloc.runner import RunContext

log = logging.getLogger("vlmloc.experiments.suite")


def experiment_file(name: str) -> Path:
    """configs/experiment/<name>.yaml (it may not exist)."""
    from vlmloc.__main__ import config_dir

    return config_dir() / "experiment" / f"{name}.yaml"


def run_config(cfg: DictConfig, name: str) -> DictConfig:
    """The config `experiment=<name>` gets: this config with its experiment node swapped for <name>'s."""
    path = experiment_file(name)
    if not path.exists():
        raise ValueError(f"experiment.runs names {name!r}, but there is no {path}")
    base = OmegaConf.to_container(cfg, resolve=False)
    base.pop("experiment")
    own = OmegaConf.load(path)  # a `# @package _global_` file: its keys are top-level
    extra = (cfg.experiment.get("overrides") or {}).get(name) or {}
    return OmegaConf.merge(base, own, {"experiment": extra})


def check_config(cfg: DictConfig) -> None:
    """Every run's config composes and passes its experiment's own checks."""
    runs = list(cfg.experiment.runs)
    if not runs or "suite" in runs:
        raise ValueError(f"experiment.runs must list one or more experiments other than suite, got {runs}")
    # overrides of experiments left out of `runs` wait unused; a name with no experiment is a typo
    unknown = [n for n in (cfg.experiment.get("overrides") or {}) if not experiment_file(n).exists()]
    if unknown:
        raise ValueError(f"experiment.overrides names {unknown}: no such experiment under configs/experiment/")
    for name in runs:
        sub = run_config(cfg, name)
        module = importlib.import_module(f"vlmloc.experiments.{sub.experiment.name}")
        if hasattr(module, "check_config"):
            module.check_config(sub)


def _without_experiment(cfg: DictConfig) -> dict:
    from vlmloc.rundir import run_config as fingerprint

    return {k: v for k, v in fingerprint(cfg).items() if k != "experiment"}


def run(ctx: RunContext) -> None:
    from vlmloc.app import run as run_one

    parts, baseline = [], None
    shared_data = OmegaConf.to_container(ctx.cfg.data, resolve=True)
    for name in ctx.cfg.experiment.runs:
        sub = run_config(ctx.cfg, name)
        log.info("suite: experiment=%s into %s", name, ctx.run_dir / name)
        data = ctx._data if OmegaConf.to_container(sub.data, resolve=True) == shared_data else None
        reuse = baseline[0] if baseline is not None and _without_experiment(sub) == baseline[1] else None
        run_one(sub, ctx.run_dir / name, adapter=ctx.adapter, data=data, baseline_from=reuse)
        if name == "baseline":
            baseline = (ctx.run_dir / name, _without_experiment(sub))
        tables = sorted((ctx.run_dir / name).glob("*.md"))  # each experiment names its own (summary.md, table1_*.md, ...)
        parts.append(f"## {name}\n\n" + "\n".join(f"{t.name}:\n\n{t.read_text()}" for t in tables))
    (ctx.run_dir / "summary.md").write_text("\n".join(parts))
    print(f"\nsuite | model={ctx.cfg.model.name} | data={ctx.cfg.data.name} | {ctx.run_dir}: "
          + ", ".join(f"{n}/" for n in ctx.cfg.experiment.runs))
