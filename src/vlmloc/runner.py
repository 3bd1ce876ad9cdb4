"""The runner: what an experiment gets (`RunContext`) and the one loop from conditions to stored rows.

An experiment states its conditions (`vlmloc.conditions`) and calls `ctx.run_conditions(conditions,
tasks)`: the rows the run directory lacks are evaluated in length-sorted batches that mix
conditions (`vlmloc.evaluation.evaluate`), stored as they are computed, with run.json rewritten
after; a finished run loads neither data nor model. The named inputs conditions read (mean
embedding, head means, scores) are resolved once per run (`RunContext.resources`).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf

from vlmloc.conditions import BASELINE, Condition, Resources, pending
from vlmloc.data import Sample, load_samples
from vlmloc.errors import ConfigError
from vlmloc.evaluation import evaluate
from vlmloc.models import VLMAdapter, load_adapter
from vlmloc.models.loading import check_weights
from vlmloc.provenance import provenance, write_run_json
from vlmloc.results import ResultStore
from vlmloc.shards import Shard, merge, mark_done, missing

log = logging.getLogger("vlmloc")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class RunContext:
    """What an experiment gets: the config, its run directory and store, and lazy data and model."""

    cfg: DictConfig
    run_dir: Path
    started: float = field(default_factory=time.time)
    # A finished run whose baseline rows equal this run's (experiment=suite: the same model, data,
    # tasks and prompts): `evaluate` copies them instead of recomputing.
    baseline_from: Path | None = None
    shard: Shard = field(default_factory=Shard)
    # Where the model comes from when this run shares another's (experiment=suite / paper): called
    # on first use, so a finished run that needs no model loads none.
    adapter_from: Callable[[], VLMAdapter] | None = None

    @cached_property
    def work_samples(self) -> list[Sample]:
        """The samples whose rows this process computes: its shard's (every sample unsharded);
        kept, since every run_conditions call and per-sample resource reads it."""
        return self.shard.samples(self.samples)

    def rows_to_report(self) -> pd.DataFrame | None:
        """The rows the tables are written from: this run's; sharded, every shard's merged once the
        last one has finished (None before: the last shard writes the tables)."""
        if not self.shard.sharded:
            return self.store.load()
        if not self.shard.merge_only:
            mark_done(self.run_dir, self.shard)
        waiting = missing(self.run_dir, self.shard.count)
        if waiting:
            if self.shard.merge_only:
                raise ConfigError(f"{self.run_dir}: shard(s) {waiting} of {self.shard.count} have not finished; "
                                  f"rerun them (shard.index=...) before merging")
            log.info("shard %d of %d done; waiting for shard(s) %s to merge", self.shard.index, self.shard.count, waiting)
            return None
        merged = merge(self.run_dir, self.shard.count)
        log.info("merged %d shards: %d rows in %s", self.shard.count, len(merged), self.run_dir / "results.parquet")
        return merged

    @cached_property
    def store(self) -> ResultStore:
        """This process's rows: results.parquet, or its shard's own file."""
        return ResultStore(self.run_dir, self.shard.results_file)

    @cached_property
    def _data(self) -> tuple[list[Sample], list[dict[str, Any]]]:
        return load_samples(self.cfg.data)

    @property
    def samples(self) -> list[Sample]:
        return self._data[0]

    @property
    def filter_report(self) -> list[dict[str, Any]]:
        return self._data[1]

    @cached_property
    def adapter(self) -> VLMAdapter:
        """The model; sharded on a host with several GPUs (model.device=auto), shard i takes GPU i mod n."""
        if self.adapter_from is not None:
            return self.adapter_from()
        model_cfg = self.cfg.model
        n_gpus = torch.cuda.device_count()
        if self.shard.sharded and str(model_cfg.device) == "auto" and model_cfg.get("device_map") is None and n_gpus > 1:
            model_cfg = OmegaConf.merge(model_cfg, {"device": f"cuda:{self.shard.index % n_gpus}"})
            log.info("shard %d of %d on %s", self.shard.index, self.shard.count, model_cfg.device)
        return load_adapter(model_cfg)

    @cached_property
    def resources(self) -> Resources:
        """The named inputs conditions read (`vlmloc.resources`), computed on first use."""
        from vlmloc.resources import run_resources

        return run_resources(self)

    def run_conditions(
        self,
        conditions: Sequence[Condition],
        tasks: Sequence[str],
        *,
        samples: Sequence[Sample] | None = None,
        columns: Callable[[pd.DataFrame], pd.DataFrame] | None = None,
        provenance: Callable[[], dict[str, Any]] | None = None,
    ) -> pd.DataFrame:
        """Every row of conditions x samples (default: this shard's) x tasks that the store lacks,
        evaluated and stored; run.json rewritten when a row was new (with `provenance()` merged in).
        Returns every stored row. A finished run loads nothing and computes nothing."""
        samples = self.work_samples if samples is None else samples
        done = self.store.done_keys()
        todo = pending(conditions, samples, tasks, done)
        if not todo:
            log.info("all %d rows of %d condition(s) already in %s: nothing to do",
                     len(pending(conditions, samples, tasks, ())), len(conditions), self.run_dir)
            return self.store.load()
        ids = {key[0] for key in todo}
        log.info("%d condition(s) x %d task(s): %d rows of %d samples to compute", len(conditions), len(tasks),
                 len(todo), len(ids))
        self.evaluate([s for s in samples if s.sample_id in ids], tasks, conditions=conditions, skip=done, columns=columns)
        self.write_provenance(**(provenance() if provenance is not None else {}))
        return self.store.load()

    def evaluate(
        self,
        samples: Sequence[Sample],
        tasks: Sequence[str],
        *,
        conditions: Sequence[Condition] = (BASELINE,),
        skip: Collection[tuple[str, str, str]] = frozenset(),
        columns: Callable[[pd.DataFrame], pd.DataFrame] | None = None,
    ) -> pd.DataFrame:
        """`evaluation.evaluate` on this run's model, its rows stored as they are computed (at least
        every `results.flush_seconds`), after `columns` adds any experiment-specific columns."""
        extra = columns or (lambda df: df)
        reused = self._reuse_baseline(samples, tasks, conditions, skip, extra)
        if len(reused):
            skip = set(skip) | set(zip(reused["sample_id"], reused["task"], reused["condition"]))

        def sink(rows: pd.DataFrame) -> None:
            self.store.add(extra(rows))

        tokens = self.cfg.get("batch_tokens")
        df = evaluate(self.adapter, samples, tasks, batch_size=int(self.cfg.batch_size), conditions=conditions,
                      skip=skip, sink=sink, flush_seconds=float(self.cfg.results.flush_seconds), resources=self.resources,
                      batch_tokens=None if tokens is None else int(tokens),
                      share_prefix=bool(self.cfg.share_image_prefix), prefetch=bool(self.cfg.prefetch))
        df = extra(df) if len(df) else df
        return pd.concat([reused, df], ignore_index=True) if len(reused) else df

    def _reuse_baseline(self, samples: Sequence[Sample], tasks: Sequence[str], conditions: Sequence[Condition],
                        skip: Collection[tuple[str, str, str]], extra: Callable[[pd.DataFrame], pd.DataFrame]) -> pd.DataFrame:
        """The baseline rows of `baseline_from` this call would compute, stored here as this run's."""
        if self.baseline_from is None or BASELINE not in conditions:
            return pd.DataFrame()
        wanted = {(s.sample_id, t, BASELINE.name) for s in samples for t in tasks} - set(skip)
        rows = ResultStore(self.baseline_from).load()
        rows = rows[[k in wanted for k in zip(rows["sample_id"], rows["task"], rows["condition"])]]
        if not len(rows):
            return pd.DataFrame()
        rows = extra(rows.reset_index(drop=True))
        self.store.add(rows)
        log.info("baseline: %d of %d rows reused from %s", len(rows), len(wanted), self.baseline_from)
        return rows

    def check_inputs(self) -> None:
        """Fail fast, before any heavy work: data present and well formed, weights findable."""
        log.info("%d samples from data=%s", len(self.samples), self.cfg.data.name)
        if not self.samples:
            steps = ", ".join(f"{r['filter']} kept {r['kept']}" for r in self.filter_report)
            raise ConfigError(f"data={self.cfg.data.name} gives no sample to run on ({steps}): check data.n, "
                              f"data.filters and the data files")
        if self.cfg.model.path is not None:
            check_weights(self.cfg.model)

    def write_provenance(self, **extra: Any) -> None:
        """run.json: config, code, library versions, model facts, device, seed, wall time."""
        ad = self.adapter
        model_info = {
            "name": str(self.cfg.model.name),
            "family": ad.family,
            "model_id": str(self.cfg.model.path) if self.cfg.model.path is not None else f"tiny:{self.cfg.model.name}",
            "revision": getattr(ad.model.config, "_commit_hash", None) or self.cfg.model.revision,
            "n_layers": ad.n_layers,
            "n_heads": ad.n_heads,
            "head_dim": ad.head_dim,
        }
        info = provenance(
            self.cfg,
            model_info=model_info,
            seed=int(self.cfg.seed),
            device=str(ad.device),
            dtype=str(ad.model.dtype),
            attn_implementation=str(ad.model.config._attn_implementation),
            started=self.started,
        )
        info["data"] = {"n_samples": len(self.samples), "filters": self.filter_report}
        info.update(extra)
        if self.shard.sharded:
            info["shard"] = {"index": self.shard.index, "count": self.shard.count, "n_samples": len(self.work_samples)}
        write_run_json(self.run_dir, info, self.shard.run_json_file)
