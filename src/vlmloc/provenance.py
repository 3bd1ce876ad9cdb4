"""Run provenance: run.json with the config, code state, library versions, device, seed and the
wall time of every session of a run."""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from vlmloc.results import RUN_JSON_FILE, atomic_write
_VERSIONED_PACKAGES = (
    "torch",
    "transformers",
    "accelerate",
    "numpy",
    "pandas",
    "pyarrow",
    "hydra-core",
    "omegaconf",
    "pycocotools",
    "vlmloc",
)


def package_versions() -> dict[str, str | None]:
    """Installed versions of python and the packages results depend on (None if missing)."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in _VERSIONED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _git(args: list[str], cwd: Path) -> str | None:
    try:
        done = subprocess.run(
            ["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip()


def git_state(directory: str | os.PathLike | None = None) -> dict[str, Any]:
    """Commit and dirtiness of the git checkout holding `directory` (default: vlmloc's source).

    `git_commit` is None when it is not a git checkout; `git_dirty` then is None too.
    Untracked files count as dirty: a new, uncommitted module can change results.
    """
    if directory is None:
        directory = Path(__file__).resolve().parent
    cwd = Path(directory)
    commit = _git(["rev-parse", "HEAD"], cwd)
    if not commit:
        return {"git_commit": None, "git_dirty": None, "git_dirty_files": []}
    status = _git(["status", "--porcelain"], cwd) or ""
    files = [line[3:] for line in status.splitlines() if line.strip()]
    return {"git_commit": commit, "git_dirty": bool(files), "git_dirty_files": files[:50]}


def _cuda_device_name() -> str | None:
    # Only ask torch if the run imported it: a process without torch used no GPU,
    # and importing it here would cost seconds for nothing.
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    try:
        return torch.cuda.get_device_name() if torch.cuda.is_available() else None
    except Exception:  # a broken driver must not lose the run's results
        return None


def _jsonable(value: Any) -> Any:
    """Plain JSON types; anything else (Path, numpy scalars, dtypes) as str."""
    return json.loads(json.dumps(value, default=str))


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat(timespec="seconds")


def _gpu_peak_gb() -> float | None:
    """Peak GPU memory allocated by this process so far (GB), if it used a GPU."""
    torch = sys.modules.get("torch")  # as _cuda_device_name: no import for a run that never used torch
    if torch is None:
        return None
    try:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            return round(max(torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count())) / 1e9, 2)
    except Exception:  # noqa: BLE001 - provenance never fails a run
        return None
    return None


def provenance(
    cfg: Any,
    *,
    model_info: Mapping[str, Any],
    seed: int,
    device: str,
    dtype: str,
    attn_implementation: str,
    started: float,
) -> dict[str, Any]:
    """Everything needed to trace a run's numbers: config, code, model, libraries, machine.

    `cfg`: an OmegaConf config (resolved here) or a plain mapping. `model_info`: the adapter's
    facts; `model_id` (or `name_or_path` / `path`) and `revision` (or `commit_hash`) are lifted
    to the top level. `started`: `time.time()` at run start; `wall_time_s` is recomputed by
    `write_run_json` each time the dict is written.
    """
    from omegaconf import OmegaConf  # deferred: only provenance needs it

    config = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else cfg
    info = dict(model_info)
    model_id = next((info[k] for k in ("model_id", "name_or_path", "path") if info.get(k)), None)
    revision = next((info[k] for k in ("revision", "commit_hash") if info.get(k)), None)
    prov = {
        "config": config,
        **git_state(),
        "versions": package_versions(),
        "platform": platform.platform(),
        "hostname": socket.gethostname(),
        "cuda_device_name": _cuda_device_name(),
        "gpu_peak_memory_gb": _gpu_peak_gb(),
        "model_id": model_id,
        "model_revision": revision,
        "model_info": info,
        "dtype": str(dtype),
        "attn_implementation": attn_implementation,
        "device": str(device),
        "seed": int(seed),
        "start_time": _iso(started),
        "started_unix": float(started),
        "wall_time_s": time.time() - started,
    }
    return _jsonable(prov)


def write_run_json(run_dir: str | os.PathLike, info: Mapping[str, Any], filename: str = RUN_JSON_FILE) -> Path:
    """Atomically write `info` to run_dir/run.json (`filename`: a shard's own file).

    If `info` has `started_unix` (as `provenance` gives), `wall_time_s` and `end_time` are set
    to now, so writing the same dict again at the end of a run records its full duration. A run
    resumed over several sessions (killed, rerun) lists each in `sessions` (start, end, wall
    time, read back from the run.json already there) and sums them in `wall_time_total_s`.
    """
    info = dict(info)
    if info.get("started_unix") is not None:
        now = time.time()
        started = float(info["started_unix"])
        info["wall_time_s"] = now - started
        info["end_time"] = _iso(now)
        try:
            before = json.loads((Path(run_dir) / filename).read_text()).get("sessions", [])
        except (OSError, ValueError, AttributeError):
            before = []
        sessions = [s for s in before if isinstance(s, dict) and s.get("started_unix") != started]
        sessions.append({"started_unix": started, "start_time": _iso(started), "end_time": info["end_time"],
                         "wall_time_s": info["wall_time_s"]})
        info["sessions"] = sessions
        info["wall_time_total_s"] = sum(float(s.get("wall_time_s", 0.0)) for s in sessions)
    text = json.dumps(info, indent=2, sort_keys=False, default=str) + "\n"
    return atomic_write(Path(run_dir) / filename, lambda f: f.write(text.encode("utf-8")))
