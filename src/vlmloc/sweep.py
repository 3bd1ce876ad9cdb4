"""A multirun's console report: where each job wrote, what it printed, and how it ended.

In a multirun (`python -m vlmloc -m ...`, any launcher) each job records `job-<n>.json` in its run
directory: its overrides, status (`done`, `user error`, `bug`), the error, and where its logs are.
A job's error is recorded rather than raised, so that one failing job neither hides the others'
results nor stops the report. When the sweep ends, `SweepSummary` (a Hydra callback, registered in
config.yaml) prints, per job, its run directory, log file, launcher output folder, its tables or its
error; then exits with status 2 when a job had a user error, 1 when a job hit a bug.
"""

from __future__ import annotations

import json
import socket
import sys
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

JOB_FILE = "job-{num}.json"  # per job: the shards of one run share its directory


def record_job(run_dir: Path, hydra_cfg: Any, status: str, error: str | None = None) -> None:
    """Write `<run_dir>/job-<n>.json` for the sweep report (hydra_cfg: the job's `HydraConfig.get()`)."""
    launcher_dir = None
    folder = hydra_cfg.launcher.get("submitit_folder") if "launcher" in hydra_cfg else None
    job_id = hydra_cfg.job.get("id")
    if folder and job_id:
        launcher_dir = str(folder).replace("%j", str(job_id))
    record = {
        "num": int(hydra_cfg.job.num),
        "overrides": list(hydra_cfg.overrides.task),
        "status": status,
        "error": error,
        "run_dir": str(run_dir),
        "log": str(run_dir / f"{hydra_cfg.job.name}.log"),
        "launcher_output": launcher_dir,
        "written": time.time(),  # the report keeps its own sweep's jobs when a sweep dir is reused
        "host": socket.gethostname(),  # whose clock wrote `written`
    }
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / JOB_FILE.format(num=record["num"])).write_text(json.dumps(record, indent=2))


def _tables(run_dir: Path) -> str:
    """The tables a finished run printed (summary.md, table1_*.md, ...), as one text."""
    return "\n".join(f"{t.name}:\n{t.read_text().rstrip()}" for t in sorted(run_dir.glob("*.md")))


def sweep_report(sweep_dir: Path, since: float | None = None) -> tuple[str, int]:
    """The report text for a finished sweep and the exit status it calls for (0, 1 or 2).

    since: the sweep's start (time.time()); job records written before it belong to an earlier
    sweep into the same folder (a fixed hydra.sweep.dir, as the README's whole-paper run uses)."""
    records = [json.loads(p.read_text()) for p in sweep_dir.rglob(JOB_FILE.format(num="*"))]
    if since is not None:
        # one second of slack for the clocks of other hosts only: a sweep started on this host less
        # than a second after the last one's job ended must not report that job
        here = socket.gethostname()
        records = [r for r in records
                   if float(r.get("written", since)) >= since - (0.0 if r.get("host") == here else 1.0)]
    records.sort(key=lambda r: r["num"])
    lines = [f"\nsweep {sweep_dir}: {len(records)} job(s)"]
    for r in records:
        lines.append(f"\n#{r['num']} {' '.join(r['overrides'])}: {r['status']}")
        lines.append(f"  run dir: {r['run_dir']}")
        lines.append(f"  log:     {r['log']}")
        if r["launcher_output"]:
            lines.append(f"  stdout and stderr: {r['launcher_output']}/")
        if r["status"] == "done":
            tables = _tables(Path(r["run_dir"]))
            lines += ["  " + line for line in tables.splitlines()] if tables else []
        else:
            lines += ["  " + line for line in str(r["error"]).rstrip().splitlines()]
    statuses = {r["status"] for r in records}
    done = sum(r["status"] == "done" for r in records)
    lines.append(f"\nsweep: {done} of {len(records)} job(s) done")
    status = 1 if "bug" in statuses else 2 if "user error" in statuses else 0
    return "\n".join(lines), status


class SweepSummary(Callback):
    """Prints `sweep_report` when a multirun ends and removes the empty folder submitit names `%j`."""

    def __init__(self) -> None:
        self.started: float | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.started = time.time()

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        folder = config.hydra.launcher.get("submitit_folder") if "launcher" in config.hydra else None
        if folder and "%j" in str(folder):
            literal = Path(str(folder))  # submitit creates the unexpanded path once, and leaves it empty
            if literal.is_dir() and not any(literal.iterdir()):
                literal.rmdir()
        text, status = sweep_report(sweep_dir, since=self.started)
        print(text, flush=True)
        if status:
            sys.exit(status)
