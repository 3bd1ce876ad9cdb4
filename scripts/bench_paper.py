"""Every experiment through the CLI on a random-weight checkpoint of a real config, extrapolated to the paper's scale.

Builds (once) a random-weight checkpoint from a folder holding a real checkpoint's config and
tokenizer/processor files (`bench_shards.build_checkpoint`), then runs each experiment with
`python -m vlmloc` on a small n, and prints one JSON line per experiment and a markdown table:
the run's wall time (run.json `wall_time_s`, model load included), the same for a one-object
run of the same command (`startup_s`: load and fixed costs; knockout: a third of the objects, as
its 77 rows per object fill much of a call), the time per unit ((wall - startup) / the units
between the two runs), the paper-scale extrapolation (2,248 objects; 50 CMA pairs; 50k x 10
epochs + 10k probe images) and the peak GPU memory (run.json `gpu_peak_memory_gb`).
`--once` is the memory check: one run per experiment at its n, its wall time and peak GPU memory,
or the error that ended it (the next experiment runs either way).

    PYTHONPATH=src python scripts/bench_paper.py --config-dir ../shared/real_configs/llava-1.5-7b-hf \\
        --out /tmp/bench [--experiments baseline,knockout] [--scale 0.5] [override ...]

The Qwen shapes have no tokenizer files on these machines: scripts/shapes/ holds the published
config.json of each, and the checkpoint then gets the family's tiny tokenizer and image processor
with the real pixel budget (`bench_shards.build_checkpoint`); the model config must be the family's:

    PYTHONPATH=src python scripts/bench_paper.py --config-dir scripts/shapes/qwen2_5vl7b --model qwen2_5vl7b \\
        --out /tmp/bench-qwen2_5vl7b
    PYTHONPATH=src python scripts/bench_paper.py --config-dir scripts/shapes/qwen3vl8b --model qwen3vl8b \\
        --out /tmp/bench-qwen3vl8b

The random checkpoint goes to /tmp/vlmloc-random-<config-dir name> unless --checkpoint says otherwise.

Weights are random: timings depend on shapes, not values; random weights never emit EOS, so every
generated answer runs its full length (the worst case). The tiny tokenizer is trained on the
configured prompts, which then take about as many text tokens as with the real one (39 for
Qwen2.5-VL's localization prompt); the visual tokens and the generated lengths, which decide the
cost, are the real ones.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_shards import all_pairs, build_checkpoint, checkpoint_args, checkpoint_path, cli  # noqa: E402

PAPER_OBJECTS = 2248  # the paper's COCO objects (PAPER.md)
PAPER_PAIRS = 50
PAPER_PROBE_IMAGES = 50_000 * 10 + 10_000  # train x epochs + test

# experiment -> (overrides, unit, paper-scale units, n: objects / pairs / probe images of the
# timed run; enough that batching is amortised, few enough for one GPU call)
PLAN: dict[str, tuple[list[str], str, int, int]] = {
    "baseline": ([], "object", PAPER_OBJECTS, 64),
    "token_ablation": ([], "object", PAPER_OBJECTS, 8),
    "shuffle": ([], "object", PAPER_OBJECTS, 32),
    "extension": ([], "object", PAPER_OBJECTS, 32),
    "knockout": ([], "object", PAPER_OBJECTS, 6),
    "cma_text": (["experiment=cma", "experiment.positions=text", "experiment.localization_source_min_iou=null"],
                 "pair", PAPER_PAIRS, 4),
    "cma_all": (["experiment=cma", "experiment.positions=all", "experiment.localization_source_min_iou=null"],
                "pair", PAPER_PAIRS, 4),
    "position_probe": (["experiment.probe.trainer=torch", "experiment.probe.epoch_mode=rerun",
                        "experiment.probe.epochs=2"], "image-epoch", PAPER_PROBE_IMAGES, 40),
}

# the small run's n, where not one: knockout's 77 rows per object per task nearly fill a call, so
# its small run holds a third of the objects and the two runs differ by whole calls
SMALL_N = {"knockout": 2}


def run_info(run_dir: Path) -> dict:
    return json.loads((run_dir / "run.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser()
    checkpoint_args(ap)
    ap.add_argument("--experiments", default=",".join(PLAN))
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every experiment's n (e.g. 0.25 for a quick check)")
    ap.add_argument("--once", action="store_true",
                    help="the memory check: one run per experiment at its n (no startup run, no per-unit time); "
                         "a run that fails (e.g. out of GPU memory) is reported and the next one goes on")
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()
    a.checkpoint = checkpoint_path(a)
    build_s = build_checkpoint(a.config_dir, a.checkpoint, a.model)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    common = [f"model={a.model}", f"model.path={a.checkpoint}", "data=synthetic", *a.overrides]
    # the scene generator's settings (e.g. 640x480 scenes) make the pairs' images; data=pairs has no such node
    scenes = [o for o in common if o.startswith("data.synthetic.")]
    on_pairs = [o for o in common if o not in scenes and o != "data=synthetic"]
    pairs_dir, pairs_data = a.out / "pairs", a.out / "data" / "pairs"
    rows = []
    for name in a.experiments.split(","):
        extra, unit, paper, n = PLAN[name]
        n = max(2, round(n * a.scale))
        n_small = max(1, min(n - 1, round(SMALL_N.get(name, 1) * a.scale)))
        exp = [] if any(o.startswith("experiment=") for o in extra) else [f"experiment={name}"]
        if unit == "pair":
            if not (pairs_dir / "manifest.parquet").exists():
                cli([*common, *dirs(a.out, "make_pairs", pairs_data), "experiment=make_pairs", "inpaint=oracle",
                     f"data.n={n}", "experiment.figure_examples=0", f"hydra.run.dir={pairs_dir}"], env,
                    a.out / "make_pairs.log")
                all_pairs(pairs_dir)
            data = ["data=pairs", f"data.pairs_dir={pairs_dir}"]
            sizes = (1, n)
        elif unit == "image-epoch":
            data = [f"data.synthetic.n_images={n}", "data.n=null"]
            sizes = None
        else:
            data = []
            sizes = (n_small, n)
        args = [*(on_pairs if unit == "pair" else common), *exp, *extra, *data]
        # the pairs' images are made once, untimed; other runs make their own scenes (equal cost)
        shared = pairs_data if unit == "pair" else None
        if a.once:
            rows.append(once(name, args + ([] if sizes is None else [f"data.n={sizes[1]}"]), a.out / name, env, shared))
            print(json.dumps(rows[-1]), flush=True)
            continue
        if sizes is None:  # probes: a run with 2 epochs and one with 1; the difference is one epoch
            one = run_info_of(args + ["experiment.probe.epochs=1"], a.out / f"{name}-1", env, shared)
            full = run_info_of(args, a.out / name, env, shared)
            n_train = int(full["data"]["n_train"])
            units = n_train  # one more epoch over the training images
            startup = float(one["wall_time_s"])
        else:
            small = run_info_of(args + [f"data.n={sizes[0]}"], a.out / f"{name}-1", env, shared)
            full = run_info_of(args + [f"data.n={sizes[1]}"], a.out / name, env, shared)
            units = sizes[1] - sizes[0]
            startup = float(small["wall_time_s"])
        wall = float(full["wall_time_s"])
        per_unit = (wall - startup) / units
        row = {"experiment": name, "unit": unit, "wall_s": round(wall, 1), "startup_s": round(startup, 1),
               "per_unit_s": round(per_unit, 3), "paper_units": paper,
               "paper_scale_min": round(per_unit * paper / 60, 1), "gpu_peak_gb": full.get("gpu_peak_memory_gb")}
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(json.dumps({"build_checkpoint_s": round(build_s, 1)}))
    if a.once:
        print("\n| experiment | wall time | peak GPU memory |\n|---|---:|---:|")
        for r in rows:
            wall = "failed" if r["wall_s"] is None else f"{r['wall_s']} s"
            memory = r.get("failed") or f"{r['gpu_peak_gb']} GB"
            print(f"| {r['experiment']} | {wall} | {memory} |")
        return
    print("\n| experiment | unit | per unit | paper scale | peak GPU memory |\n|---|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['experiment']} | {r['unit']} | {r['per_unit_s']:.3f} s | {r['paper_scale_min']:.1f} min "
              f"({r['paper_units']:,} {r['unit']}s) | {r['gpu_peak_gb']} GB |")


def dirs(out: Path, name: str, data_dir: Path | None = None) -> list[str]:
    """Run `name`'s own cache and data folders (data_dir: a shared one that is already made).

    The small and the full run of an experiment must pay the same fixed costs (the synthetic scenes,
    made on first use; the cached statistics): with shared folders the first run would pay them alone
    and the per-unit time would come out too low (even negative at small n).
    """
    return [f"paths.cache_dir={out}/cache/{name}", f"paths.data_dir={data_dir or out / 'data' / name}"]


def once(name: str, args: list[str], run_dir: Path, env: dict[str, str], data_dir: Path | None) -> dict:
    """One run's wall time and peak GPU memory, or how it failed (its log's last error line)."""
    try:
        info = run_info_of(args, run_dir, env, data_dir)
    except subprocess.CalledProcessError:
        lines = run_dir.with_suffix(".log").read_text().strip().splitlines()
        errors = [line for line in lines if "Error" in line and "HYDRA_FULL_ERROR" not in line]
        return {"experiment": name, "wall_s": None, "failed": (errors or lines or ["no output"])[-1][-200:]}
    return {"experiment": name, "wall_s": round(float(info["wall_time_s"]), 1),
            "gpu_peak_gb": info.get("gpu_peak_memory_gb")}


def run_info_of(args: list[str], run_dir: Path, env: dict[str, str], data_dir: Path | None = None) -> dict:
    cli([*dirs(run_dir.parent, run_dir.name, data_dir), *args, f"hydra.run.dir={run_dir}"], env,
        run_dir.with_suffix(".log"))
    return run_info(run_dir)


if __name__ == "__main__":
    main()
