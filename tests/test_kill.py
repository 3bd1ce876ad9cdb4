"""A run killed with SIGKILL keeps every row it wrote (one batch at a time), and resuming it gives
the result of a run that was never interrupted. Real processes, real signals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pandas as pd

from conftest import compose_cfg
from vlmloc import app
from vlmloc.results import RESULT_KEY

ARGS = ("experiment=knockout", "model=tiny_llava", "data=synthetic", "data.n=5", "data.synthetic.n_images=4",
        "model.localization.max_new_tokens=24", "batch_size=1", "results.flush_seconds=0", "seed=0")


def _rows(path) -> int:
    try:
        return len(pd.read_parquet(path))
    except Exception:  # not there yet
        return 0


def _sorted(df: pd.DataFrame) -> pd.DataFrame:
    return df.sort_values(list(RESULT_KEY)).reset_index(drop=True)


def test_kill_9_loses_at_most_the_batch_in_flight_and_resumes_to_the_uninterrupted_result(tmp_path):
    run_dir, data = tmp_path / "killed", tmp_path / "data"
    cmd = [sys.executable, "-m", "vlmloc", *ARGS, f"hydra.run.dir={run_dir}", f"paths.data_dir={data}",
           f"paths.cache_dir={tmp_path / 'cache'}"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    at_kill = []
    for target in (3, 20, 45):  # kill once the file holds at least this many rows
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=tmp_path)
        deadline = time.time() + 240
        while proc.poll() is None and _rows(run_dir / "results.parquet") < target and time.time() < deadline:
            time.sleep(0.02)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait()
        at_kill.append(_rows(run_dir / "results.parquet"))  # readable after the kill: writes are atomic
    assert at_kill[0] >= 3 and at_kill == sorted(at_kill), at_kill
    # a write cut short leaves a temp file beside the intact one: the next start removes it
    (run_dir / ".results.parquet.interrupted.tmp").write_bytes(b"half a parquet")
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not list(run_dir.glob(".*.tmp")) and "removed 1 unfinished write" in done.stdout + done.stderr
    resumed = _sorted(pd.read_parquet(run_dir / "results.parquet"))

    cfg = compose_cfg(*ARGS, f"paths.cache_dir={tmp_path / 'cache'}", data_dir=data)
    app.run(cfg, tmp_path / "whole")
    whole = _sorted(pd.read_parquet(tmp_path / "whole" / "results.parquet"))
    assert len(resumed) == len(whole) == 5 * 2 * 7
    pd.testing.assert_frame_equal(resumed, whole, check_exact=False, atol=1e-5)
    print(f"rows stored at each kill: {at_kill} of {len(whole)}")
