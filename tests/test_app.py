"""End to end: `python -m vlmloc experiment=baseline` on tiny models writes results and provenance; reruns do no work."""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest

from conftest import compose_cfg
from vlmloc import app, runner
from vlmloc.results import RESULT_COLUMNS

REQUIRED = set(RESULT_COLUMNS) | {"ann_id", "width", "height", "area_frac"}


def _check_results(run_dir, n_samples):
    df = pd.read_parquet(run_dir / "results.parquet")
    assert REQUIRED <= set(df.columns)
    assert len(df) == 2 * n_samples
    assert df.groupby("task").size().to_dict() == {"classification": n_samples, "localization": n_samples}
    loc = df[df.task == "localization"]
    cls = df[df.task == "classification"]
    assert cls["p_yes"].between(0, 1).all() and (cls["correct"] == (cls["p_yes"] > 0.5)).all()
    # an unparseable answer is a miss with IoU 0 and its raw text kept
    unparsed = loc[loc["pred_box"].isna()]
    assert (unparsed["iou"] == 0).all() and not unparsed["hit_50"].any()
    assert loc["gt_box"].map(len).eq(4).all()
    info = json.loads((run_dir / "run.json").read_text())
    for key in ("config", "git_commit", "versions", "model_id", "dtype", "attn_implementation", "device", "seed", "wall_time_s"):
        assert key in info, key
    assert info["dtype"] == "torch.float32" and info["attn_implementation"] == "sdpa" and info["device"] == "cpu"
    assert info["data"]["n_samples"] == n_samples
    return df


def test_cli_baseline_tiny_llava_synthetic_then_resume(tmp_path):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "vlmloc", "experiment=baseline", "model=tiny_llava", "data=synthetic",
           "data.n=6", f"paths.data_dir={tmp_path / 'data'}", f"hydra.run.dir={run_dir}"]
    first = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "| baseline  | localization" in first.stdout
    df = _check_results(run_dir, 6)
    mtime = (run_dir / "results.parquet").stat().st_mtime_ns
    second = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "nothing to do" in second.stdout + second.stderr
    assert (run_dir / "results.parquet").stat().st_mtime_ns == mtime
    pd.testing.assert_frame_equal(pd.read_parquet(run_dir / "results.parquet"), df)


def test_baseline_tiny_internvl_fixture(tmp_path):
    pytest.importorskip("skimage")
    cfg = compose_cfg("experiment=baseline", "model=tiny_internvl", "data=fixture", "batch_size=3", data_dir=tmp_path / "data")
    app.run(cfg, tmp_path / "run")
    df = _check_results(tmp_path / "run", 5)
    assert set(df["category"]) == {"person", "cat", "cup", "spoon", "rocket"}


def test_resume_only_runs_missing_samples(tmp_path, monkeypatch):
    """A run interrupted after some samples finishes only the rest."""
    cfg = compose_cfg("experiment=baseline", "model=tiny_llava", "data=synthetic", "data.n=4", data_dir=tmp_path / "data")
    run_dir = tmp_path / "run"
    app.run(cfg, run_dir)
    full = pd.read_parquet(run_dir / "results.parquet")
    # drop one sample's rows, as if the run had stopped before it
    dropped = full["sample_id"].iloc[0]
    from vlmloc.results import ResultStore, atomic_write

    partial = full[full["sample_id"] != dropped]
    atomic_write(run_dir / "results.parquet", lambda f: partial.to_parquet(f))
    seen = []
    real = runner.evaluate
    monkeypatch.setattr(runner, "evaluate", lambda ad, samples, *a, **k: seen.append([s.sample_id for s in samples]) or real(ad, samples, *a, **k))
    app.run(cfg, run_dir)
    assert seen == [[dropped]]
    again = ResultStore(run_dir).load().sort_values(["task", "sample_id"]).reset_index(drop=True)
    want = full.sort_values(["task", "sample_id"]).reset_index(drop=True)
    pd.testing.assert_series_equal(again["p_yes"], want["p_yes"], atol=1e-6)
    assert again["answer"].tolist() == want["answer"].tolist()
