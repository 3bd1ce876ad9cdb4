"""Sharded run against one process, through the CLI, on a random-weight checkpoint of a real config.

Builds (once) a checkpoint folder with random weights from a folder holding a real checkpoint's
config and tokenizer/processor files, then runs one experiment three times through
`python -m vlmloc`: one process into <out>/one, and two shards one after another into <out>/two
(shard.count=2, shard.index=0 then 1). Prints the wall time of each run, whether each compared
table of the merge equals the single process's (same keys; the largest difference of each float
column; whether the other columns agree) and whether the markdown tables are the same, as one
JSON line.

    PYTHONPATH=src python scripts/bench_shards.py --config-dir /path/llava-1.5-7b-hf --out /tmp/shards \
        experiment=knockout data=synthetic data.n=8
    PYTHONPATH=src python scripts/bench_shards.py --config-dir ... --out /tmp/cma --pairs 4 --tables mf.parquet \
        experiment=cma experiment.positions=text data=synthetic

Weights are random: timings depend on shapes, not values; random weights never emit EOS, so every
box answer runs its full length (the worst case).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd


def build_checkpoint(config_dir: Path, dest: Path) -> float:
    """A random-weight bf16 checkpoint of config_dir's config in dest (with its other files); seconds."""
    import torch
    import transformers

    if (dest / "config.json").exists():
        return 0.0
    t0 = time.perf_counter()
    config = transformers.AutoConfig.from_pretrained(config_dir)
    cls = getattr(transformers, config.architectures[0])
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = cls._from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(dest)
    for f in config_dir.iterdir():
        if f.is_file() and not (dest / f.name).exists():
            shutil.copy(f, dest / f.name)
    return time.perf_counter() - t0


def cli(args: list[str], env: dict[str, str], log: Path | None = None) -> float:
    """Seconds `python -m vlmloc <args>` took; its output into `log` when given, else the console."""
    t0 = time.perf_counter()
    if log is None:
        subprocess.run([sys.executable, "-m", "vlmloc", *args], check=True, env=env)
    else:
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("w") as f:
            subprocess.run([sys.executable, "-m", "vlmloc", *args], check=True, env=env, stdout=f,
                           stderr=subprocess.STDOUT)
    return time.perf_counter() - t0


def checkpoint_args(ap: argparse.ArgumentParser) -> None:
    """The options both benchmarks share: the real files, the random checkpoint, the output, the model config."""
    ap.add_argument("--config-dir", type=Path, required=True)
    ap.add_argument("--checkpoint", type=Path, default=Path("/tmp/vlmloc-random-checkpoint"))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--model", default="llava7b")


KEYS = ("sample_id", "task", "condition", "layer", "head", "positions", "stage", "view", "target")


def compare(one: Path, two: Path, name: str) -> dict[str, object]:
    """One parquet table of both runs: rows, same keys, the largest difference of each float column,
    and whether the other columns agree."""
    absent = [str(d) for d in (one, two) if not (d / name).exists()]
    if absent:  # e.g. no pair left out: no excluded_pairs.parquet
        return {"absent_in": absent}
    u, v = pd.read_parquet(one / name), pd.read_parquet(two / name)
    keys = [c for c in KEYS if c in u.columns]
    u, v = (df.sort_values(keys).reset_index(drop=True) for df in (u, v))
    out: dict[str, object] = {"rows": len(u), "rows_merged": len(v), "same_keys": bool(u[keys].equals(v[keys]))}
    if len(u) != len(v):
        return out
    for c in u.columns:
        if c in keys:
            continue
        if pd.api.types.is_float_dtype(u[c]):
            d = np.abs(u[c].to_numpy(float) - v[c].to_numpy(float))
            out[f"max_abs_diff_{c}"] = float(np.nanmax(d)) if np.isfinite(d).any() else 0.0
        else:
            out[f"same_{c}"] = u[c].astype(str).tolist() == v[c].astype(str).tolist()
    return out


def all_pairs(pairs_dir: Path) -> int:
    """Keep every pair of a make_pairs run (timing only: a random model's verdicts keep few)."""
    from vlmloc.data.pairs import read_manifest, write_manifest

    manifest = read_manifest(pairs_dir)
    manifest["kept"] = True
    write_manifest(pairs_dir, manifest)
    return len(manifest)


def main() -> None:
    ap = argparse.ArgumentParser()
    checkpoint_args(ap)
    ap.add_argument("--tables", default="results.parquet", help="comma-separated parquet tables to compare")
    ap.add_argument("--pairs", type=int, default=0,
                    help="CMA: first make this many pairs of the data with experiment=make_pairs, every pair kept "
                         "whatever the random model answers, and run on data=pairs")
    ap.add_argument("--also-one", default=None,
                    help="one more single-process run with this override (e.g. batch_size=16), compared to the first: "
                         "how much the numbers move with the batches alone")
    ap.add_argument("overrides", nargs="*", help="further overrides, e.g. experiment=knockout data.n=8")
    a = ap.parse_args()
    build_s = build_checkpoint(a.config_dir, a.checkpoint)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    common = [f"model={a.model}", f"model.path={a.checkpoint}", f"paths.output_dir={a.out}", f"paths.cache_dir={a.out}/cache",
              f"paths.data_dir={a.out}/data"]
    extra: dict[str, object] = {}
    overrides = list(a.overrides)
    if a.pairs:
        data = [o for o in overrides if o.startswith("data")]
        extra["make_pairs_s"] = round(cli([*common, "experiment=make_pairs", "inpaint=oracle", *data, f"data.n={a.pairs}",
                                           "experiment.figure_examples=0", f"hydra.run.dir={a.out}/pairs"], env), 1)
        extra["pairs"] = all_pairs(a.out / "pairs")
        overrides = [o for o in overrides if not o.startswith("data")] + ["data=pairs", f"data.pairs_dir={a.out}/pairs"]
    common += overrides
    one = cli([*common, f"hydra.run.dir={a.out}/one"], env)
    shards = [cli([*common, "shard.count=2", f"shard.index={i}", f"hydra.run.dir={a.out}/two"], env) for i in range(2)]
    names = a.tables.split(",")
    if a.also_one:
        extra["also_one_s"] = round(cli([*common, a.also_one, f"hydra.run.dir={a.out}/also"], env), 1)
        extra[a.also_one] = {n: compare(a.out / "one", a.out / "also", n) for n in names}
    tables = lambda d: {p.name: p.read_text().replace(str(d), "<run>") for p in d.glob("*.md")}  # noqa: E731
    print(json.dumps({
        "build_checkpoint_s": round(build_s, 1), "one_process_s": round(one, 1), "shard_s": [round(s, 1) for s in shards],
        **{n: compare(a.out / "one", a.out / "two", n) for n in names},
        "same_tables": tables(a.out / "one") == tables(a.out / "two"), **extra,
    }))


if __name__ == "__main__":
    main()
