"""Where one generate call's time goes, on a random-weight checkpoint of a real config (GPU).

For one batch of localization prompts (synthetic scenes), in one run and side by side:
- the time per decode step ((t(new tokens) - t(1 token)) / (new tokens - 1), best of `--repeats`)
  and of the prefill, for: transformers' own `generate`; the project's `generate` inside the
  runner's `intervene` with no edits (every experiment's baseline rows); the same with a knockout
  condition of the paper (object keys, layers 0-5) on every row;
- the host-device synchronisations of each, counted by `torch.cuda.set_sync_debug_mode` and
  grouped by the line that asked for them;
- a cProfile of each (`--out DIR/profile-<variant>.txt`, the 30 costliest functions by own time);
- with `--kernels`, torch.profiler's table of the GPU kernels of a 1-token call and of a full one
  (`kernels-<variant>.txt`, 25 rows each by GPU time): their difference is the decode steps'.

    PYTHONPATH=src python scripts/profile_generate.py --config-dir ../shared/real_configs/llava-1.5-7b-hf \\
        --out /tmp/profile [--batch 32] [--new-tokens 32]

Weights are random: timings depend on shapes, not values.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import json
import pstats
import sys
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_shards import build_checkpoint, checkpoint_args, checkpoint_path  # noqa: E402


def compose(model: str, checkpoint: Path, work: Path, n: int, overrides: list[str]):
    from hydra import compose as hydra_compose, initialize_config_dir

    import vlmloc.assets  # noqa: F401  (the ${vlmloc.asset:...} resolver)
    from vlmloc.__main__ import config_dir

    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return hydra_compose("config", overrides=[f"model={model}", f"model.path={checkpoint}", "data=synthetic",
                                                   f"data.n={n}", f"paths.data_dir={work / 'data'}",
                                                   f"paths.cache_dir={work / 'cache'}", *overrides])


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def seconds(fn: Callable[[], object], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


@contextlib.contextmanager
def sync_sites() -> Iterator[Counter]:
    """Count host-device synchronisations inside the block, by the first project or transformers line."""
    sites: Counter = Counter()

    def show(message, category, filename, lineno, file=None, line=None):
        for frame in reversed(traceback.extract_stack()[:-1]):
            if ("vlmloc" in frame.filename or "transformers" in frame.filename) and "warnings" not in frame.filename:
                sites[f"{Path(frame.filename).name}:{frame.lineno} {frame.line}"] += 1
                return
        sites[f"{Path(filename).name}:{lineno}"] += 1

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        old = warnings.showwarning
        warnings.showwarning = show
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            yield sites
        finally:
            if cuda:
                torch.cuda.set_sync_debug_mode(0)
            warnings.showwarning = old


def kernel_table(fn: Callable[[], object], title: str) -> str:
    """torch.profiler's 25 costliest GPU kernels of one call of fn, by GPU time."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        sync()
    return f"## {title}\n" + prof.key_averages().table(sort_by="cuda_time_total", row_limit=25)


def main() -> None:
    ap = argparse.ArgumentParser()
    checkpoint_args(ap)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--variants", default="hf,intervene,knockout")
    ap.add_argument("--kernels", action="store_true", help="also write torch.profiler's GPU kernel tables")
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()
    a.checkpoint = checkpoint_path(a)
    a.out.mkdir(parents=True, exist_ok=True)
    build_checkpoint(a.config_dir, a.checkpoint, a.model)

    from vlmloc.conditions import BlockAttention, Condition, ObjectTokens, Resources, realize
    from vlmloc.data import load_samples
    from vlmloc.engine.knockout import Knockout
    from vlmloc.engine.readout import generate
    from vlmloc.evaluation import intervene, max_new_tokens
    from vlmloc.models import load_adapter

    cfg = compose(a.model, a.checkpoint, a.out, a.batch, a.overrides)
    adapter = load_adapter(cfg.model)
    samples = load_samples(cfg.data)[0][: a.batch]
    task = "localization"
    batch = adapter.prepare([s.load_image() for s in samples], [adapter.prompt(task, s.category) for s in samples])
    tok = adapter.tokenizer
    named = Resources(adapter=adapter, new_tokens={t: max_new_tokens(adapter, t) for t in ("classification", "localization")})
    # the paper's knockout of the object's tokens in layers 0-5 (experiments/knockout.py)
    ko_cond = Condition("knockout:object:layers=0-5", (BlockAttention(ObjectTokens(), tuple(range(min(6, adapter.n_layers))), "post_image"),))
    kos = [realize(ko_cond, s, lay, task, batch.seq_len, named).knockout for s, lay in zip(samples, batch.layouts)]
    rows = len(samples)

    def hf(n: int) -> object:
        return adapter.model.generate(**batch.inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                      num_beams=1, pad_token_id=tok.pad_token_id)

    def hf_static(compiled: bool) -> Callable[[int], object]:
        # transformers' static KV cache, alone or with its compiled decode step (CUDA graphs)
        def call(n: int) -> object:
            return adapter.model.generate(**batch.inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                          num_beams=1, pad_token_id=tok.pad_token_id, cache_implementation="static",
                                          disable_compile=not compiled)
        return call

    def ours(specs: list) -> Callable[[int], object]:
        def call(n: int) -> object:
            with intervene(adapter, [[]] * rows, specs, [[]] * rows):
                return generate(adapter, batch, n)
        return call

    variants = {"hf": hf, "hf_static": hf_static(False), "hf_compiled": hf_static(True), "intervene": ours([Knockout.none()] * rows), "knockout": ours(kos)}
    report = {"batch": rows, "seq_len": batch.seq_len, "new_tokens": a.new_tokens, "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
    print(json.dumps(report), flush=True)
    for name in a.variants.split(","):
        fn = variants[name]
        t0 = time.perf_counter()
        fn(2)  # warm-up (and the compile, if any)
        warm = time.perf_counter() - t0
        one = seconds(lambda: fn(1), a.repeats)
        full = seconds(lambda: fn(a.new_tokens), a.repeats)
        step = (full - one) / (a.new_tokens - 1)
        with sync_sites() as sites:
            fn(4)
        prof = cProfile.Profile()
        prof.enable()
        fn(a.new_tokens)
        sync()
        prof.disable()
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(30)
        (a.out / f"profile-{name}.txt").write_text(text.getvalue())
        if a.kernels and torch.cuda.is_available():
            (a.out / f"kernels-{name}.txt").write_text("\n\n".join(kernel_table(lambda n=n: fn(n), f"{n} new token(s)")
                                                                  for n in (1, a.new_tokens)))
        row = {"variant": name, "warmup_s": round(warm, 1), "prefill_plus_1_s": round(one, 4), "total_s": round(full, 4),
               "decode_step_ms": round(step * 1e3, 2), "syncs_in_4_tokens": sum(sites.values()),
               "sync_sites": dict(sites.most_common(12)),
               "peak_gb": round(torch.cuda.max_memory_allocated() / 2**30, 1) if torch.cuda.is_available() else None}
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
