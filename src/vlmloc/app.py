"""The Hydra application: check the config, lock the run directory, run one experiment.

Each experiment is a module `vlmloc.experiments.<name>` with `run(ctx: RunContext) -> None`
(`vlmloc.runner.RunContext`: its shard's work), and, to be shardable, `report(ctx, rows)` (the
tables, once every shard's rows are merged) and optionally `finish(ctx)` (work that needs every
shard's output, run once before `report`).
"""

from __future__ import annotations

import importlib
import inspect
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from vlmloc.data import Sample
from vlmloc.errors import ConfigError, VlmlocError
from vlmloc.models import VLMAdapter
from vlmloc import paraphrases, shards
from vlmloc.runner import RunContext, seed_everything
from vlmloc.settings import check_experiment
from vlmloc.rundir import check_run_config, remove_leftovers, writer_lock

log = logging.getLogger("vlmloc")


def check_root_config(cfg: DictConfig) -> None:
    """The root config's own values, before any data or model work."""
    bs = cfg.get("batch_size")
    if isinstance(bs, bool) or not isinstance(bs, int) or bs < 1:
        raise ConfigError(f"batch_size must be an integer >= 1, got {bs!r}")
    bt = cfg.get("batch_tokens")
    if bt is not None and (isinstance(bt, bool) or not isinstance(bt, int) or bt < 1):
        raise ConfigError(f"batch_tokens must be an integer >= 1 or null (= batch_size alone), got {bt!r}")
    for key in ("share_image_prefix", "prefetch"):
        if not isinstance(cfg.get(key, False), bool):
            raise ConfigError(f"{key} must be true or false, got {cfg.get(key)!r}")
    n = cfg.get("data", {}).get("n")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ConfigError(f"data.n must be an integer >= 1 or null (= every sample), got {n!r}")


def run(cfg: DictConfig, run_dir: Path, adapter: VLMAdapter | Callable[[], VLMAdapter] | None = None,
        data: tuple[list[Sample], list[dict[str, Any]]] | None = None, baseline_from: Path | None = None) -> None:
    """Run `cfg.experiment.name` into `run_dir`, holding its writer lock (`vlmloc.rundir`).

    A rerun of a finished run does no new work; a rerun with a changed configuration is refused
    before data or model load (`vlmloc.rundir.check_run_config`), except for experiments with
    `RECOMPUTES_CHANGED_CONFIG = True`, which key their own rows by the settings that made them.

    adapter: an already loaded model of `cfg.model`, or a function returning it on first use
    (experiment=suite shares one across its runs);
    data: the already loaded samples and filter report of `cfg.data` (likewise);
    baseline_from: a finished run with this run's baseline rows (`RunContext.baseline_from`).
    """
    seed_everything(int(cfg.seed))
    name = str(cfg.experiment.name)
    try:
        module = importlib.import_module(f"vlmloc.experiments.{name}")
    except ModuleNotFoundError as err:
        if err.name != f"vlmloc.experiments.{name}":
            raise
        raise ConfigError(f"unknown experiment {name!r}: no module vlmloc.experiments.{name}") from None
    check_root_config(cfg)
    try:  # its settings and checks, needing neither data nor model
        check_experiment(module, cfg)
    except VlmlocError:
        raise
    except ValueError as err:  # experiments state bad settings as ValueError: a user error
        raise ConfigError(str(err)) from err
    paraphrases.chosen(cfg)  # the wordings experiment.paraphrases asks for exist
    shard = shards.from_config(cfg)
    # shardable experiments write their tables in report(ctx, rows), after the run (and the merge)
    reports = inspect.isfunction(getattr(module, "report", None))
    if shard.sharded and not reports:
        raise ConfigError(f"experiment={name} cannot be sharded (shard.count={shard.count}): only experiments that "
                          f"split their work by sample and report after the merge can; run it with shard.count=1")
    ctx = RunContext(cfg=cfg, run_dir=Path(run_dir), baseline_from=baseline_from, shard=shard)
    if isinstance(adapter, VLMAdapter):
        ctx.__dict__["adapter"] = adapter  # seeds the cached_property
    elif adapter is not None:
        ctx.adapter_from = adapter
    if data is not None:
        ctx.__dict__["_data"] = data
    ctx.run_dir.mkdir(parents=True, exist_ok=True)
    with writer_lock(ctx.run_dir, shard.lock_file):
        # a shard removes only its own files' leftovers: its siblings may be writing theirs
        remove_leftovers(ctx.run_dir, (f"*{shard.tag}*",) if shard.sharded else None)
        # a changed config is refused, except by experiments that key their own rows by it; a shard
        # always refuses one, since its siblings' rows were made with the recorded config
        recomputes = getattr(module, "RECOMPUTES_CHANGED_CONFIG", False) and not shard.sharded
        check_run_config(ctx.run_dir, cfg, refuse_changes=not recomputes)
        # experiments with their own data (image folders) check their inputs themselves
        check = getattr(module, "check_inputs", None)
        check(ctx) if check is not None else ctx.check_inputs()
        if not shard.merge_only:
            module.run(ctx)
        if reports:
            results = ctx.rows_to_report()
            if results is not None:
                # work that needs every shard's output (the probes' merge and test pass), done once
                finish = getattr(module, "finish", None)
                if finish is not None:
                    finish(ctx)
                module.report(ctx, results)
        # the robustness check: the same run under each chosen prompt wording, into paraphrases/<k>/
        paraphrases.run_paraphrases(cfg, ctx.run_dir, run, adapter=lambda: ctx.adapter, data=ctx.__dict__.get("_data"))
