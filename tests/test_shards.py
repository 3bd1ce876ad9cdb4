"""One experiment split into shards writing one run directory merges to what one process writes."""

from __future__ import annotations

import json
import subprocess
import sys
import threading

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import compose_cfg
from vlmloc import app, runner
from vlmloc.errors import ConfigError
from vlmloc.results import RESULT_KEY
from vlmloc.rundir import RunDirectoryError
from vlmloc.shards import Shard, shard_of

BASE = ("model=tiny_llava", "data=synthetic", "data.n=6", "data.synthetic.n_images=4", "model.localization.max_new_tokens=4")


def _sorted(df: pd.DataFrame) -> pd.DataFrame:
    return df.sort_values(list(RESULT_KEY)).reset_index(drop=True)


def _run_shards(root, run_dir, experiment: str, count: int, adapter, *extra: str) -> None:
    for index in range(count):  # one after another, in this process
        cfg = compose_cfg(f"experiment={experiment}", *BASE, f"shard.count={count}", f"shard.index={index}", *extra,
                          f"paths.cache_dir={root / 'cache'}", data_dir=root / "data")
        app.run(cfg, run_dir, adapter=adapter)


def test_membership_is_a_pure_function_of_the_id_and_the_count():
    ids = [f"{i}-{j}" for i in range(40) for j in range(3)]
    for count in (1, 2, 3, 8):
        parts = [[s for s in ids if Shard(count, i).owns(s)] for i in range(count)]
        assert sorted(sum(parts, [])) == sorted(ids)  # disjoint and complete
        assert all(shard_of(s, count) == i for i, part in enumerate(parts) for s in part)
    assert [shard_of("17-2", 3)] * 2 == [shard_of("17-2", 3), shard_of("17-2", 3)]
    assert len({len(p) for p in [[s for s in ids if shard_of(s, 2) == i] for i in range(2)]}) >= 1
    for bad in ({"count": 0}, {"count": 2, "index": 2}, {"count": 2, "index": -1}):
        with pytest.raises(ConfigError, match="shard"):
            Shard(**bad)


@pytest.mark.parametrize("experiment", ["knockout", "token_ablation"])
def test_one_two_and_three_shards_merge_to_the_single_process_result(experiment, tmp_path, tiny_llava):
    extra = ("experiment.integrated_gradients.steps=2", "mean_embedding.n_images=3") if experiment == "token_ablation" else ()
    _run_shards(tmp_path, tmp_path / "one", experiment, 1, tiny_llava, *extra)
    one = _sorted(pd.read_parquet(tmp_path / "one" / "results.parquet"))
    tables = {p.name: p.read_text().replace(str(tmp_path / "one"), "<run>") for p in (tmp_path / "one").glob("*.md")}
    assert tables
    for count in (2, 3):
        run_dir = tmp_path / f"shards{count}"
        _run_shards(tmp_path, run_dir, experiment, count, tiny_llava, *extra)
        merged = _sorted(pd.read_parquet(run_dir / "results.parquet"))
        assert len(merged) == len(one) and merged[list(RESULT_KEY)].equals(one[list(RESULT_KEY)])
        for col in ("p_yes", "iou", "frac_edited"):
            np.testing.assert_allclose(merged[col].astype(float), one[col].astype(float), atol=1e-5, equal_nan=True)
        assert merged["answer"].tolist() == one["answer"].tolist()
        # each shard computed only its own objects, and every object once
        own = [pd.read_parquet(run_dir / f"results.shard-{i}-of-{count}.parquet") for i in range(count)]
        assert [set(df["sample_id"]) for df in own] == [{s for s in one["sample_id"] if shard_of(s, count) == i}
                                                       for i in range(count)]
        got = {p.name: p.read_text().replace(str(run_dir), "<run>") for p in run_dir.glob("*.md")}
        assert got == tables
        info = json.loads((run_dir / "run.json").read_text())
        assert [s["shard"]["index"] for s in info["shards"]] == list(range(count))
        assert sum(s["shard"]["n_samples"] for s in info["shards"]) == one["sample_id"].nunique()


def test_tables_wait_for_the_last_shard_and_merge_only_rebuilds_them(tmp_path, tiny_llava, monkeypatch):
    run_dir = tmp_path / "run"
    cfg = lambda *o: compose_cfg("experiment=baseline", *BASE, "shard.count=2", *o, data_dir=tmp_path / "data")  # noqa: E731
    app.run(cfg("shard.index=1"), run_dir, adapter=tiny_llava)
    assert not (run_dir / "results.parquet").exists() and not (run_dir / "summary.md").exists()
    with pytest.raises(ConfigError, match=r"shard\(s\) \[0\] of 2 have not finished"):
        app.run(cfg("shard.merge_only=true"), run_dir, adapter=tiny_llava)
    app.run(cfg("shard.index=0"), run_dir, adapter=tiny_llava)
    merged = pd.read_parquet(run_dir / "results.parquet")
    table = (run_dir / "summary.md").read_text()
    (run_dir / "results.parquet").unlink()
    (run_dir / "summary.md").unlink()
    monkeypatch.setattr(runner, "load_adapter", lambda c: pytest.fail("a merge needs no model"))
    app.run(cfg("shard.merge_only=true"), run_dir)
    pd.testing.assert_frame_equal(_sorted(pd.read_parquet(run_dir / "results.parquet")), _sorted(merged))
    assert (run_dir / "summary.md").read_text() == table


def test_a_shard_with_another_config_than_its_siblings_is_refused(tmp_path, tiny_llava):
    run_dir = tmp_path / "run"
    app.run(compose_cfg("experiment=baseline", *BASE, "shard.count=2", "shard.index=0", data_dir=tmp_path / "data"),
            run_dir, adapter=tiny_llava)
    with pytest.raises(RunDirectoryError, match="seed: 0 -> 1"):
        app.run(compose_cfg("experiment=baseline", *BASE, "shard.count=2", "shard.index=1", "seed=1",
                            data_dir=tmp_path / "data"), run_dir, adapter=tiny_llava)
    with pytest.raises(RunDirectoryError, match="shard.count: 2 -> 3"):
        app.run(compose_cfg("experiment=baseline", *BASE, "shard.count=3", "shard.index=1", data_dir=tmp_path / "data"),
                run_dir, adapter=tiny_llava)


def test_an_experiment_outside_the_runner_is_not_sharded():
    with pytest.raises(ConfigError, match="experiment=make_pairs cannot be sharded"):
        app.run(compose_cfg("experiment=make_pairs", "model=tiny_llava", "inpaint=oracle", "shard.count=2"), "/nonexistent")


def test_shards_starting_together_compute_the_mean_embedding_once(tmp_path, tiny_llava, monkeypatch):
    from vlmloc.engine import mean_embedding as me

    cfg = compose_cfg("experiment=token_ablation", *BASE, "mean_embedding.n_images=3", f"paths.cache_dir={tmp_path}",
                      data_dir=tmp_path / "data")
    calls, real = [], me._compute

    def slow_compute(*args, **kwargs):
        calls.append(1)
        threading.Event().wait(0.5)  # the sibling arrives while this one computes
        return real(*args, **kwargs)

    monkeypatch.setattr(me, "_compute", slow_compute)
    out: list[torch.Tensor] = []
    ctxs = [runner.RunContext(cfg=cfg, run_dir=tmp_path / f"r{i}", shard=Shard(2, i)) for i in range(2)]
    for ctx in ctxs:
        ctx.__dict__["adapter"] = tiny_llava
    threads = [threading.Thread(target=lambda c=c: out.append(me.mean_visual_embedding(c))) for c in ctxs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(out) == 2 and torch.equal(out[0], out[1])
    assert len(list((tmp_path / "mean_embedding").glob("*.pt"))) == 1
    single = runner.RunContext(cfg=compose_cfg("experiment=token_ablation", *BASE, "mean_embedding.n_images=3",
                                               f"paths.cache_dir={tmp_path / 'alone'}", data_dir=tmp_path / "data"),
                               run_dir=tmp_path / "alone")
    single.__dict__["adapter"] = tiny_llava
    monkeypatch.setattr(me, "_compute", real)
    torch.testing.assert_close(me.mean_visual_embedding(single), out[0])


def test_the_local_launcher_runs_the_shards_as_processes_into_one_directory(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    args = [sys.executable, "-m", "vlmloc", "-m", "hydra/launcher=local", "experiment=baseline", *BASE, "shard.count=2",
            "shard.index=range(2)", f"paths.output_dir={tmp_path}/out", f"paths.data_dir={tmp_path}/data"]
    out = subprocess.run(args, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    (run_dir,) = {p.parent for p in (tmp_path / "out").rglob("results.parquet")}
    assert sorted(p.name for p in run_dir.glob("results*.parquet")) == [
        "results.parquet", "results.shard-0-of-2.parquet", "results.shard-1-of-2.parquet"]
    alone = compose_cfg("experiment=baseline", *BASE, data_dir=tmp_path / "data")
    app.run(alone, tmp_path / "alone")
    want = _sorted(pd.read_parquet(tmp_path / "alone" / "results.parquet"))
    got = _sorted(pd.read_parquet(run_dir / "results.parquet"))
    assert got[list(RESULT_KEY)].equals(want[list(RESULT_KEY)])
    # other processes (thread counts) and other batch neighbours (padding): float noise, the golden tolerance
    np.testing.assert_allclose(got["p_yes"].astype(float), want["p_yes"].astype(float), atol=1e-4, rtol=1e-3, equal_nan=True)
    assert (run_dir / "summary.md").exists() and out.stdout.count(f"run dir: {run_dir}") == 2


def test_a_shard_killed_with_sigkill_is_rerun_alone_and_the_merge_equals_one_process(tmp_path):
    import os
    import signal
    import time

    args = ("experiment=knockout", *BASE, "model.localization.max_new_tokens=16", "batch_size=1", "results.flush_seconds=0",
            "experiment.include_single_layers=false", "shard.count=2")
    run_dir = tmp_path / "run"
    cmd = lambda i: [sys.executable, "-m", "vlmloc", *args, f"shard.index={i}", f"hydra.run.dir={run_dir}",  # noqa: E731
                     f"paths.data_dir={tmp_path / 'data'}", f"paths.cache_dir={tmp_path / 'cache'}"]
    own = run_dir / "results.shard-0-of-2.parquet"
    proc = subprocess.Popen(cmd(0), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.time() + 240
    while proc.poll() is None and time.time() < deadline:
        try:
            if len(pd.read_parquet(own)) >= 3:
                break
        except Exception:  # not written yet
            pass
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    stored = len(pd.read_parquet(own))
    for i in (1, 0):  # the sibling, then the killed shard alone: it resumes and, last, merges
        done = subprocess.run(cmd(i), capture_output=True, text=True, cwd=tmp_path, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    merged = _sorted(pd.read_parquet(run_dir / "results.parquet"))
    alone = compose_cfg(*[a for a in args if not a.startswith("shard.")], f"paths.cache_dir={tmp_path / 'cache'}",
                        data_dir=tmp_path / "data")
    app.run(alone, tmp_path / "alone")
    want = _sorted(pd.read_parquet(tmp_path / "alone" / "results.parquet"))
    assert 3 <= stored < len(pd.read_parquet(own)) and merged[list(RESULT_KEY)].equals(want[list(RESULT_KEY)])
    np.testing.assert_allclose(merged["p_yes"].astype(float), want["p_yes"].astype(float), atol=1e-4, rtol=1e-3,
                               equal_nan=True)
    assert merged["answer"].tolist() == want["answer"].tolist()


def test_shards_starting_together_compute_the_head_means_once(tmp_path, tiny_llava, monkeypatch):
    from vlmloc import resources
    from vlmloc.engine.head_means import head_means

    cfg = compose_cfg("experiment=head_ablation", *BASE, "experiment.mean_samples=3", data_dir=tmp_path / "data")
    calls = []

    def slow_head_means(*args, **kwargs):
        calls.append(args[2])
        threading.Event().wait(0.5)  # the sibling arrives while this one computes
        return head_means(*args, **kwargs)

    monkeypatch.setattr(resources, "head_means", slow_head_means)
    out: list[dict] = []
    ctxs = [runner.RunContext(cfg=cfg, run_dir=tmp_path / "run", shard=Shard(2, i)) for i in range(2)]
    for ctx in ctxs:
        ctx.__dict__["adapter"] = tiny_llava
    threads = [threading.Thread(target=lambda c=c: out.append(c.resources["head_means"])) for c in ctxs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    tasks = list(cfg.experiment.tasks)
    assert sorted(calls) == sorted(tasks) and len(out) == 2  # each task's means computed by one shard only
    assert len(list((tmp_path / "run").glob("head_means-*.pt"))) == len(tasks)
    samples = ctxs[0].samples[:3]
    for task in tasks:  # both equal the means computed directly
        direct = head_means(tiny_llava, samples, task, 3, batch_size=int(cfg.batch_size),
                            answer_mean=str(cfg.experiment.answer_mean))
        for got in out:
            for name in ("prefix", "image", "text", "tail", "image_overall"):
                torch.testing.assert_close(getattr(got[task], name), getattr(direct, name))
            assert got[task].grid == direct.grid
