"""Sharded run against one process, through the CLI, on a random-weight checkpoint of a real config.

Builds (once) a checkpoint folder with random weights from a folder holding a real checkpoint's
config and tokenizer/processor files, then runs one experiment three times through
`python -m vlmloc`: one process into <out>/one, and two shards one after another into <out>/two
(shard.count=2, shard.index=0 then 1). Prints the wall time of each run, whether the merged rows
equal the single process's (same keys; the largest difference of P(yes) and IoU; the same answers)
and whether the tables are the same, as one JSON line.

    PYTHONPATH=src python scripts/bench_shards.py --config-dir /path/llava-1.5-7b-hf --out /tmp/shards

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


def cli(args: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "vlmloc", *args], check=True, env=env)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config-dir", type=Path, required=True)
    ap.add_argument("--checkpoint", type=Path, default=Path("/tmp/vlmloc-random-checkpoint"))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--model", default="llava7b")
    ap.add_argument("--also-one", default=None,
                    help="one more single-process run with this override (e.g. batch_size=16), compared to the first: "
                         "how much the numbers move with the batches alone")
    ap.add_argument("overrides", nargs="*", help="further overrides, e.g. experiment=knockout data.n=8")
    a = ap.parse_args()
    build_s = build_checkpoint(a.config_dir, a.checkpoint)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    common = [f"model={a.model}", f"model.path={a.checkpoint}", f"paths.output_dir={a.out}", f"paths.cache_dir={a.out}/cache",
              f"paths.data_dir={a.out}/data", *a.overrides]
    one = cli([*common, f"hydra.run.dir={a.out}/one"], env)
    shards = [cli([*common, "shard.count=2", f"shard.index={i}", f"hydra.run.dir={a.out}/two"], env) for i in range(2)]
    key = ["sample_id", "task", "condition"]
    rows = lambda d: pd.read_parquet(d / "results.parquet").sort_values(key).reset_index(drop=True)  # noqa: E731
    x, y = rows(a.out / "one"), rows(a.out / "two")

    def max_diff(col: str, u: pd.DataFrame = x, v: pd.DataFrame = y) -> float:
        d = np.abs(u[col].astype(float).to_numpy() - v[col].astype(float).to_numpy())
        return float(np.nanmax(d)) if np.isfinite(d).any() else 0.0

    also = {}
    if a.also_one:
        also["also_one_s"] = round(cli([*common, a.also_one, f"hydra.run.dir={a.out}/also"], env), 1)
        z = rows(a.out / "also")
        also.update({f"{a.also_one}: max_abs_diff_p_yes": max_diff("p_yes", x, z),
                     f"{a.also_one}: same_answers": x["answer"].tolist() == z["answer"].tolist()})

    tables = lambda d: {p.name: p.read_text().replace(str(d), "<run>") for p in d.glob("*.md")}  # noqa: E731
    print(json.dumps({
        "build_checkpoint_s": round(build_s, 1), "one_process_s": round(one, 1), "shard_s": [round(s, 1) for s in shards],
        "rows": len(x), "same_keys": bool(x[key].equals(y[key])), "max_abs_diff_p_yes": max_diff("p_yes"),
        "max_abs_diff_iou": max_diff("iou"), "same_answers": x["answer"].tolist() == y["answer"].tolist(),
        "same_tables": tables(a.out / "one") == tables(a.out / "two"),
        "shard_rows": [len(pd.read_parquet(a.out / "two" / f"results.shard-{i}-of-2.parquet")) for i in range(2)],
        **also,
    }))


if __name__ == "__main__":
    main()
