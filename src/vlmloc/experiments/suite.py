"""Several experiments in one command: the embedded default (`python -m vlmloc`).

Each entry of `experiment.runs` runs exactly as `python -m vlmloc experiment=<name>` would with
this command's other overrides, into `<run_dir>/<name>/`; its settings are
`configs/experiment/<name>.yaml` merged with `experiment.overrides.<name>`. The runs share one
loaded model, and every run's config is checked before the first one starts.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf

from vlmloc.runner import RunContext
from vlmloc.settings import check_experiment, load, register

log = logging.getLogger("vlmloc.experiments.suite")


# --------------------------------------------------------------------------- config


@register("suite")
@dataclass(frozen=True)
class Settings:
    """experiment.* of configs/experiment/suite.yaml, typed and checked."""

    name: str = MISSING
    runs: tuple[str, ...] = MISSING  # experiments to run, in order
    overrides: dict[str, Any] = MISSING  # experiment name -> settings merged onto its own file's

    def __post_init__(self) -> None:
        runs = list(self.runs)
        if not runs or "suite" in runs:
            raise ValueError(f"experiment.runs must list one or more experiments other than suite, got {runs}")
        # overrides of experiments left out of `runs` wait unused; a name with no experiment is a typo
        unknown = [n for n in self.overrides if not experiment_file(n).exists()]
        if unknown:
            raise ValueError(f"experiment.overrides names {unknown}: no such experiment under configs/experiment/")
        for name in runs:
            _check_exists(name)


def settings(cfg: DictConfig) -> Settings:
    return load(Settings, cfg)


# --------------------------------------------------------------------------- runs


def experiment_file(name: str) -> Path:
    """configs/experiment/<name>.yaml (it may not exist)."""
    from vlmloc.__main__ import config_dir

    return config_dir() / "experiment" / f"{name}.yaml"


def _compose(overrides: list[str]) -> DictConfig:
    """The root config composed by Hydra with `overrides` (inside a running app or not)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from vlmloc.__main__ import config_dir

    if GlobalHydra.instance().is_initialized():
        return compose("config", overrides=overrides)
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose("config", overrides=overrides)


def _check_exists(name: str) -> None:
    """A run's experiment must have its configs/experiment/<name>.yaml."""
    if not experiment_file(name).exists():
        raise ValueError(f"experiment.runs names {name!r}, but there is no {experiment_file(name)}")


def _changed(cfg: Any, default: Any) -> Any:
    """The leaves of `cfg` that differ from `default` (a nested dict), or _SAME."""
    if isinstance(cfg, dict) and isinstance(default, dict):
        out = {k: _changed(v, default.get(k, _SAME)) for k, v in cfg.items()}
        return {k: v for k, v in out.items() if v is not _SAME} or _SAME
    return _SAME if cfg == default else cfg


_SAME = object()


def run_config(cfg: DictConfig, name: str, data: Mapping[str, Any] | None = None,
               fill: Mapping[str, str] | None = None) -> DictConfig:
    """The config `experiment=<name>` gets with this command's other overrides: Hydra composes
    `experiment=<name>` (its own defaults list included, e.g. make_pairs' inpaint backend), then
    every value this command set differently from the plain suite is laid over it, then
    `experiment.overrides.<name>`.

    data: values laid over the run's data (experiment=paper: CMA on the pairs). With `config`, a
    data group replaces the command's data (whose values are then not used); without, the values
    go over the command's data. fill: `{key}` placeholders in those values and in the overrides, e.g. {dir}."""
    _check_exists(name)
    data = dict(data or {})
    group = [f"data={data.pop('config')}"] if "config" in data else []
    own = OmegaConf.to_container(_compose([f"experiment={name}", *group]), resolve=False)
    plain = OmegaConf.to_container(_compose([f"experiment={cfg.experiment.name}"]), resolve=False)
    mine = OmegaConf.to_container(cfg, resolve=False)
    for key in ("experiment", "hydra") + (("data",) if group else ()):
        mine.pop(key, None)
    changed = _changed(mine, plain)
    extra = (cfg.experiment.get("overrides") or {}).get(name) or {}
    extra = OmegaConf.to_container(extra, resolve=False) if isinstance(extra, DictConfig) else dict(extra)
    own.pop("hydra", None)
    return OmegaConf.merge(own, {} if changed is _SAME else changed,
                           {"experiment": _fill(extra, fill or {}), "data": _fill(data, fill or {})})


def _fill(node: Any, fill: Mapping[str, str]) -> Any:
    """`node` with `{key}` in its strings replaced by fill[key]."""
    if isinstance(node, dict):
        return {k: _fill(v, fill) for k, v in node.items()}
    if isinstance(node, list):
        return [_fill(v, fill) for v in node]
    if isinstance(node, str):
        for key, value in fill.items():
            node = node.replace("{" + key + "}", value)
    return node


def check_config(cfg: DictConfig) -> None:
    """Valid settings; every run's config composes and passes its experiment's own checks."""
    for name in settings(cfg).runs:
        sub = run_config(cfg, name)
        check_experiment(importlib.import_module(f"vlmloc.experiments.{sub.experiment.name}"), sub)


def _without_experiment(cfg: DictConfig) -> dict:
    from vlmloc.rundir import run_config as fingerprint

    return {k: v for k, v in fingerprint(cfg).items() if k != "experiment"}


def run_each(ctx: RunContext, runs: Sequence[tuple[str, DictConfig]]) -> list[str]:
    """Run each (name, config) into `<run_dir>/<name>/` with this run's model, loaded once when the
    first run needs it (a finished run needs none), and its data where a
    run's data is the same); a run whose config differs from baseline's only in its experiment node
    reuses baseline's rows. Returns a summary.md part per run (its tables)."""
    from vlmloc.app import run as run_one

    parts, baseline = [], None
    shared_data = OmegaConf.to_container(ctx.cfg.data, resolve=True)
    for name, sub in runs:
        log.info("%s: experiment=%s into %s", ctx.cfg.experiment.name, name, ctx.run_dir / name)
        data = ctx._data if OmegaConf.to_container(sub.data, resolve=True) == shared_data else None
        reuse = baseline[0] if baseline is not None and _without_experiment(sub) == baseline[1] else None
        run_one(sub, ctx.run_dir / name, adapter=lambda: ctx.adapter, data=data, baseline_from=reuse)
        if name == "baseline":
            baseline = (ctx.run_dir / name, _without_experiment(sub))
        tables = sorted((ctx.run_dir / name).glob("*.md"))  # each experiment names its own (summary.md, table1_*.md, ...)
        parts.append(f"## {name}\n\n" + "\n".join(f"{t.name}:\n\n{t.read_text()}" for t in tables))
    return parts


def run(ctx: RunContext) -> None:
    st = settings(ctx.cfg)
    parts = run_each(ctx, [(name, run_config(ctx.cfg, name)) for name in st.runs])
    (ctx.run_dir / "summary.md").write_text("\n".join(parts))
    print(f"\nsuite | model={ctx.cfg.model.name} | data={ctx.cfg.data.name} | {ctx.run_dir}: "
          + ", ".join(f"{n}/" for n in st.runs))
