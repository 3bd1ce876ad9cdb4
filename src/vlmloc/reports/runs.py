"""Finished run directories as the report reads them: run.json, config and parquet tables.

    runs = load_runs([Path("outputs/paper-llava7b"), Path("outputs/cma-llava7b-pairs")])
    runs[0].experiment, runs[0].model, runs[0].table("results.parquet")

A directory without run.json whose subdirectories hold runs (experiment=suite, experiment=paper)
stands for those runs. Runs of one experiment and model on several image sets (data.name) are
reported side by side; a run's paraphrase runs (paraphrases/<k>/) come with it. A directory that is missing, unfinished (no run.json, a writer's lock,
shard files not merged) or lacks its experiment's tables is a `ConfigError` naming it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from vlmloc.errors import ConfigError

RUN_JSON = "run.json"
REPORT_FILES = ("report_tables.parquet", "findings.parquet")  # written by vlmloc.reports.paper_report
LOCK = "run.lock"
# experiment -> the tables its report needs (any further parquet files are read on demand)
TABLES: dict[str, tuple[str, ...]] = {
    "baseline": ("results.parquet",), "token_ablation": ("results.parquet",), "shuffle": ("results.parquet",),
    "extension": ("results.parquet",), "view_ablation": ("results.parquet",), "knockout": ("results.parquet",),
    "head_ablation": ("results.parquet",), "cma": ("mf.parquet",), "make_pairs": ("manifest.parquet",),
    "position_probe": ("probe_accuracy.parquet",),
}


@dataclass
class Run:
    """One finished run: where it is, its run.json, and its parquet tables (read once, on demand)."""

    path: Path
    info: dict[str, Any]
    _tables: dict[str, pd.DataFrame] = field(default_factory=dict, repr=False)
    _wordings: dict[str, Run] | None = field(default=None, repr=False)

    @property
    def config(self) -> dict[str, Any]:
        """The resolved config the run recorded."""
        return self.info.get("config") or {}

    @property
    def experiment(self) -> str:
        return str(self.config["experiment"]["name"])

    @property
    def model(self) -> str:
        return str(self.config["model"]["name"])

    @property
    def settings(self) -> dict[str, Any]:
        return dict(self.config.get("experiment") or {})

    @property
    def image_set(self) -> str:
        """The data the run measured: `data.name`; for object-removal pairs, the image set they were
        made from (the make_pairs run's data, read from its run directory), e.g. "pairs of voc"."""
        data = self.config.get("data") or {}
        name = str(data.get("name"))
        source = Path(str(data.get("pairs_dir", ""))) / RUN_JSON
        if name == "pairs" and source.is_file():
            try:
                name = f"pairs of {json.loads(source.read_text())['config']['data']['name']}"
            except (ValueError, KeyError, TypeError):
                pass
        return name

    @property
    def wordings(self) -> dict[str, Run]:
        """This run under other prompt wordings (`vlmloc.paraphrases`): label k -> the finished run
        in paraphrases/<k>/ (an unfinished one is a ConfigError naming it); {} when there are none."""
        if self._wordings is None:
            from vlmloc.paraphrases import wording_dirs

            self._wordings = {k: load_run(d) for k, d in wording_dirs(self.path).items()}
        return dict(self._wordings)

    def table(self, name: str) -> pd.DataFrame:
        if name not in self._tables:
            self._tables[name] = pd.read_parquet(self.path / name)
        return self._tables[name].copy()

    def has(self, name: str) -> bool:
        return (self.path / name).is_file()


def _expand(path: Path) -> list[Path]:
    """`path` itself when it is a run, else its subdirectories that are (in name order)."""
    if not path.is_dir():
        raise ConfigError(f"runs: {path} is not a directory; give the run directories of finished runs")
    own = [p for p in path.glob("*.parquet") if p.name not in REPORT_FILES]  # a paper run's report is not a run
    if (path / RUN_JSON).is_file() or own or any(path.glob("run.shard-*.json")):
        return [path]
    children = sorted(p for p in path.iterdir() if p.is_dir() and (p / RUN_JSON).is_file())
    if not children:
        raise ConfigError(f"runs: {path} holds no finished run (no {RUN_JSON} in it or in its subdirectories); "
                          "is it a run directory, and has the run finished?")
    return children


def load_run(path: Path) -> Run:
    """The finished run in `path`, checked."""
    if (path / LOCK).exists():
        raise ConfigError(f"runs: {path} is being written (or its run was killed: {path / LOCK} is there); "
                          "let it finish, or rerun it to completion, before reporting on it")
    if not (path / RUN_JSON).is_file():
        raise ConfigError(f"runs: {path} is not a finished run: it has no {RUN_JSON} (unfinished, or shards not merged; "
                          "rerun it, or merge its shards with shard.merge_only=true)")
    try:
        info = json.loads((path / RUN_JSON).read_text())
        name = info["config"]["experiment"]["name"]
        info["config"]["model"]["name"]
    except (ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"runs: {path / RUN_JSON} is not a run record of vlmloc (no config.experiment / config.model: {err})") from None
    if name not in TABLES:
        raise ConfigError(f"runs: {path} is a run of experiment={name}, which the report does not cover; "
                          f"give runs of {sorted(TABLES)}")
    missing = [t for t in TABLES[name] if not (path / t).is_file()]
    if missing:
        raise ConfigError(f"runs: {path} (experiment={name}) lacks {missing}: the run has not finished; rerun it")
    return Run(path, info)


def load_runs(paths: Sequence[str | Path]) -> list[Run]:
    """Every finished run the paths stand for, in order (suites expanded); at least one."""
    if not paths:
        raise ConfigError("runs is empty: give one or more run directories, e.g. runs=[outputs/a,outputs/b]")
    runs = [load_run(p) for path in paths for p in _expand(Path(path))]
    seen: dict[tuple[str, str, str], Path] = {}
    for run in runs:
        key = (run.model, run.experiment, run.image_set)
        if key in seen:
            raise ConfigError(f"runs: {seen[key]} and {run.path} are both experiment={run.experiment} of "
                              f"model={run.model} on data={run.image_set}; give one run per experiment, model and "
                              "image set (set data.name to tell two image sets of one loader apart)")
        seen[key] = run.path
    return runs
