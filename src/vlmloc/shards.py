"""One experiment's work split into disjoint shards that write into the same run directory.

A sample (an object; a pair for CMA) belongs to shard `int(sha256(sample_id)[:8], 16) % count`: a
pure function of the id and the count, so every rerun and every sibling agrees. Shard i of n
stores each table it writes under its own name (`Shard.file`: `results.shard-<i>-of-<n>.parquet`,
`mf.shard-<i>-of-<n>.parquet`, ...) and its provenance in `run.shard-<i>-of-<n>.json` (each
resumable on its own, under its own writer lock), and marks itself finished with
`shard-<i>-of-<n>.done`. Whichever shard finishes last merges every shard's tables into the
plain names (`results.parquet`, `mf.parquet`, ...; under `merge.lock`, idempotent) and writes
`run.json` listing each shard's provenance; the tables and figures are then written from the
merged rows, as one process would have. `shard.merge_only=true` does only the merge, e.g. after
a crash.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from vlmloc.errors import ConfigError
from vlmloc.results import RESULTS_FILE, RUN_JSON_FILE, ResultStore, atomic_write
from vlmloc.rundir import exclusive


@dataclass(frozen=True)
class Shard:
    """This process's share of a run: shard `index` of `count`."""

    count: int = 1
    index: int = 0
    merge_only: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.count, bool) or not isinstance(self.count, int) or self.count < 1:
            raise ConfigError(f"shard.count must be an integer >= 1, got {self.count!r}")
        if isinstance(self.index, bool) or not isinstance(self.index, int) or not 0 <= self.index < self.count:
            raise ConfigError(f"shard.index must be an integer in 0 .. {self.count - 1} (shard.count={self.count}), "
                              f"got {self.index!r}")

    @property
    def sharded(self) -> bool:
        return self.count > 1

    @property
    def tag(self) -> str:
        return f"shard-{self.index}-of-{self.count}"

    def owns(self, sample_id: str) -> bool:
        return shard_of(sample_id, self.count) == self.index

    def samples(self, samples: Sequence[Any]) -> list[Any]:
        """The samples of this shard, in their given order."""
        return [s for s in samples if self.owns(s.sample_id)] if self.sharded else list(samples)

    def file(self, name: str) -> str:
        """This shard's copy of a run-directory file: "mf.parquet" -> "mf.shard-0-of-2.parquet"
        (the name itself unsharded)."""
        stem, dot, ext = name.partition(".")
        return f"{stem}.{self.tag}{dot}{ext}" if self.sharded else name

    @property
    def results_file(self) -> str:
        return self.file(RESULTS_FILE)

    @property
    def run_json_file(self) -> str:
        return self.file(RUN_JSON_FILE)

    @property
    def lock_file(self) -> str:
        return self.file("run.lock")

    @property
    def done_file(self) -> str:
        return f"{self.tag}.done"


def shard_of(sample_id: str, count: int) -> int:
    """The shard (0 .. count-1) a sample belongs to."""
    return int(hashlib.sha256(str(sample_id).encode()).hexdigest()[:8], 16) % count


def from_config(cfg: Any) -> Shard:
    node = cfg.get("shard") or {}
    return Shard(int(node.get("count", 1)), int(node.get("index", 0)), bool(node.get("merge_only", False)))


def mark_done(run_dir: Path, shard: Shard) -> None:
    atomic_write(run_dir / shard.done_file, lambda f: f.write(f"{time.time()}\n".encode()))


def missing(run_dir: Path, count: int) -> list[int]:
    """Shards of `count` that have not marked themselves finished."""
    return [i for i in range(count) if not (run_dir / Shard(count, i).done_file).exists()]


def shard_tables(run_dir: Path, count: int) -> dict[str, list[Path]]:
    """The parquet tables the shards of `count` wrote, other than results.parquet: plain name ->
    the shards' files (in shard order; a shard with no rows for a table has no file)."""
    tables: dict[str, list[Path]] = {}
    for i in range(count):
        shard = Shard(count, i)
        for path in sorted(run_dir.glob(f"*.{shard.tag}.parquet")):
            if path.name != shard.results_file:
                tables.setdefault(path.name.replace(f".{shard.tag}.", "."), []).append(path)
    return tables


def merge(run_dir: Path, count: int) -> pd.DataFrame:
    """Every shard's tables under their plain names and every shard's provenance in run.json; the
    merged results.parquet rows (empty for experiments with tables of their own, e.g. CMA)."""
    with exclusive(run_dir / "merge.lock"):
        frames = [ResultStore(run_dir, Shard(count, i).results_file).load() for i in range(count)]
        rows = pd.concat([f for f in frames if len(f)], ignore_index=True) if any(len(f) for f in frames) else frames[0]
        merged = ResultStore(run_dir).add(rows) if len(rows) else ResultStore(run_dir).load()
        for name, paths in shard_tables(run_dir, count).items():
            # shards own disjoint samples: their rows concatenate; rewritten whole, so a rerun is idempotent
            table = pa.concat_tables([pq.read_table(p) for p in paths], promote_options="default")
            atomic_write(run_dir / name, lambda f, t=table: pq.write_table(t, f))
        shards = []
        for i in range(count):
            path = run_dir / Shard(count, i).run_json_file
            shards.append(json.loads(path.read_text()) if path.exists() else {"shard": i, "missing": True})
        info = {k: v for k, v in shards[0].items() if k not in ("wall_time_s", "sessions", "wall_time_total_s")}
        info["shards"] = shards
        info["wall_time_total_s"] = sum(float(s.get("wall_time_total_s", s.get("wall_time_s", 0.0)) or 0.0) for s in shards)
        text = json.dumps(info, indent=2, default=str) + "\n"
        atomic_write(run_dir / RUN_JSON_FILE, lambda f: f.write(text.encode("utf-8")))
    return merged
