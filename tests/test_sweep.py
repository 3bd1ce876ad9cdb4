"""A multirun prints every job's run directory, logs and tables or error, and exits by the worst job."""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest


def _sweep(tmp_path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vlmloc", "-m", "experiment=baseline", "model=tiny_llava", *args,
                           f"paths.output_dir={tmp_path}/out", f"paths.data_dir={tmp_path}/data"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)


def test_a_sweep_reports_each_job_and_a_failed_job_sets_the_exit_status(tmp_path):
    out = _sweep(tmp_path, "data.n=2,0")
    assert out.returncode == 2, out.stderr[-2000:]
    report = out.stdout[out.stdout.index("\nsweep "):]
    jobs = {json.loads(p.read_text())["num"]: json.loads(p.read_text()) for p in (tmp_path / "out").rglob("job-*.json")}
    assert sorted(jobs) == [0, 1] and jobs[0]["status"] == "done" and jobs[1]["status"] == "user error"
    good, bad = jobs[0], jobs[1]
    assert f"#0 experiment=baseline model=tiny_llava data.n=2 paths.output_dir={tmp_path}/out" in report
    assert f"run dir: {good['run_dir']}" in report and f"log:     {good['log']}" in report
    # the job's table, as its run directory holds it, and its rows: 2 objects x 2 tasks
    rows = pd.read_parquet(f"{good['run_dir']}/results.parquet")
    assert len(rows) == 4
    for line in open(f"{good['run_dir']}/summary.md").read().strip().splitlines():
        assert "  " + line in report
    assert f"run dir: {bad['run_dir']}" in report
    assert "vlmloc: error: data.n must be an integer >= 1 or null (= every sample), got 0" in report
    assert report.rstrip().endswith("sweep: 1 of 2 job(s) done")


def test_the_submitit_launcher_names_each_jobs_output_folder_and_leaves_no_literal_placeholder(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    out = _sweep(tmp_path, "hydra/launcher=local", "data.n=1")
    assert out.returncode == 0, out.stderr[-2000:]
    (job,) = [json.loads(p.read_text()) for p in (tmp_path / "out").rglob("job-*.json")]
    submitit = next((tmp_path / "out").rglob(".submitit"))
    assert [p.name for p in submitit.iterdir()] == [job["launcher_output"].rsplit("/", 1)[-1]]
    assert f"stdout and stderr: {job['launcher_output']}/" in out.stdout
    assert any(p.name.endswith("_log.out") for p in submitit.glob("*/*"))


def test_a_reused_sweep_folder_reports_only_this_sweeps_jobs(tmp_path):
    # the README's whole-paper run: every step a sweep into one folder, run dirs named by run_name
    fixed = (f"hydra.sweep.dir={tmp_path}/paper", "hydra.sweep.subdir=${run_name}", "data.n=1")
    first = _sweep(tmp_path, *fixed)
    assert first.returncode == 0, first.stderr[-2000:]
    second = _sweep(tmp_path, *fixed, "run_name=second")
    assert second.returncode == 0, second.stderr[-2000:]
    report = second.stdout[second.stdout.index("\nsweep "):]
    assert f"sweep {tmp_path}/paper: 1 job(s)" in report and f"run dir: {tmp_path}/paper/second" in report
    assert "baseline-tiny_llava-synthetic" not in report and report.rstrip().endswith("sweep: 1 of 1 job(s) done")
    assert sorted(p.parent.name for p in (tmp_path / "paper").rglob("job-*.json")) == [
        "baseline-tiny_llava-synthetic", "second"]


def test_a_job_of_this_host_from_before_the_sweep_is_left_out_even_within_the_clock_slack(tmp_path):
    import socket

    from vlmloc.sweep import sweep_report

    since = 1000.0
    for name, written, host in (("old-here", since - 0.5, socket.gethostname()), ("new-here", since + 2, socket.gethostname()),
                                ("old-there", since - 0.5, "another-host"), ("older-there", since - 5, "another-host")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "job-0.json").write_text(json.dumps({
            "num": 0, "overrides": [name], "status": "user error", "error": "x", "run_dir": str(tmp_path / name),
            "log": "l", "launcher_output": None, "written": written, "host": host}))
    text, _ = sweep_report(tmp_path, since=since)
    assert "2 job(s)" in text and "#0 new-here" in text and "#0 old-there" in text
