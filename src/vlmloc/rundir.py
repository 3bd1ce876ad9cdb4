"""A run directory belongs to one configuration and one writer at a time.

- `config.json`, written when a run starts, holds the configuration its numbers depend on: the
  composed config, unresolved (so `${...}` paths and the packaged demo models' location stay
  symbolic), without the keys in `NOT_IN_FINGERPRINT` (where files go, batch size, loader
  workers, how often rows are written, Hydra's own settings: batched rows equal single rows, so
  resuming with another batch size is safe). A rerun into a directory that holds results of
  another configuration is refused before any data or model is loaded, naming each changed key.
- `run.lock` holds the writer's pid and host while a run writes. A second writer is refused
  with both named; a lock left by a process that is gone (same host) is taken over.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any, TypeVar

from omegaconf import DictConfig, OmegaConf

from vlmloc.errors import VlmlocError
from vlmloc.results import atomic_write

T = TypeVar("T")

log = logging.getLogger("vlmloc")

CONFIG_FILE = "config.json"
LOCK_FILE = "run.lock"
# Top-level keys, or dotted paths, that never change a run's numbers.
NOT_IN_FINGERPRINT = ("hydra", "paths", "run_name", "batch_size", "batch_tokens", "share_image_prefix", "prefetch", "results", "shard.index", "shard.merge_only",
                      "experiment.num_workers",
                      # which attention kernels a GPU may use: the same attention to rounding
                      "model.sdpa_off",
                      # the robustness check's catalogue and choice: each wording runs in its own directory,
                      # whose config records the wording it asked (vlmloc.paraphrases)
                      "experiment.paraphrases", "model.prompts.paraphrases")


class RunDirectoryError(VlmlocError, RuntimeError):
    """The run directory holds another configuration's results, or another process is writing it."""


def run_config(cfg: DictConfig) -> dict[str, Any]:
    """The configuration a run's numbers depend on (see the module docstring), as plain data."""
    data = OmegaConf.to_container(cfg, resolve=False)
    for dotted in NOT_IN_FINGERPRINT:
        *parents, last = dotted.split(".")
        node = data
        for part in parents:
            node = node.get(part, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(last, None)
    return json.loads(json.dumps(data, default=str))


def changed_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ, each as `key: old -> new` (missing = <unset>)."""
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        out = []
        for key in sorted(set(old) | set(new), key=str):
            name = f"{prefix}.{key}" if prefix else str(key)
            if key not in old or key not in new:
                out.append(f"{name}: {old.get(key, '<unset>')!r} -> {new.get(key, '<unset>')!r}")
            else:
                out += changed_keys(old[key], new[key], name)
        return out
    return [] if old == new else [f"{prefix}: {old!r} -> {new!r}"]


def _has_results(run_dir: Path) -> bool:
    return any(run_dir.glob("*.parquet")) or (run_dir / "run.json").exists()


def check_run_config(run_dir: Path, cfg: DictConfig, *, refuse_changes: bool = True) -> None:
    """Refuse a rerun of another configuration into `run_dir`; record this one when it is new there.

    refuse_changes=False: record it anyway (experiments that recompute what a change affects)."""
    current = run_config(cfg)
    path = run_dir / CONFIG_FILE
    if path.exists():
        recorded = json.loads(path.read_text())
        changes = changed_keys(recorded, current)
        if changes and refuse_changes and _has_results(run_dir):
            listed = "\n  ".join(changes[:20]) + ("\n  ..." if len(changes) > 20 else "")
            raise RunDirectoryError(
                f"{run_dir} holds results of another configuration; changed:\n  {listed}\n"
                f"Rerun into a new directory (run_name=<name> or hydra.run.dir=<dir>), or delete {run_dir} to "
                f"recompute there."
            )
        if not changes:
            return
    elif _has_results(run_dir):
        log.warning("%s has results but no %s (written by an older vlmloc): its configuration is not checked",
                    run_dir, CONFIG_FILE)
    else:
        # the first of several shards starting at once records it; the others compare against it
        text = json.dumps(current, indent=2, sort_keys=True) + "\n"
        tmp = run_dir / f".{CONFIG_FILE}.{os.getpid()}.tmp"
        tmp.write_text(text)
        try:
            os.link(tmp, path)  # atomic and exclusive: a sibling never reads half a file
            return
        except FileExistsError:
            return check_run_config(run_dir, cfg, refuse_changes=refuse_changes)
        finally:
            tmp.unlink(missing_ok=True)
    text = json.dumps(current, indent=2, sort_keys=True) + "\n"
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def remove_leftovers(run_dir: Path, names: tuple[str, ...] | None = None) -> list[str]:
    """Delete temp files of atomic writes a killed run left behind (`.<name>.<random>.tmp`): the
    file they were replacing is intact, so they hold nothing that is not recomputed.

    names: only those of these files (a shard's own; its siblings may be writing theirs)."""
    gone = []
    patterns = [f".{n}.*.tmp" for n in names] if names is not None else [".*.tmp"]
    for tmp in sorted({t for pattern in patterns for t in run_dir.glob(pattern)}):
        tmp.unlink(missing_ok=True)
        gone.append(tmp.name)
    if gone:
        log.warning("%s: removed %d unfinished write(s) of an interrupted run: %s", run_dir, len(gone), ", ".join(gone))
    return gone


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


@contextlib.contextmanager
def writer_lock(run_dir: Path, name: str = LOCK_FILE) -> Iterator[None]:
    """Hold `run_dir/<name>` (run.lock; a shard's own lock) for the block; refuse if a live process holds it."""
    path = run_dir / name
    me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                holder = json.loads(path.read_text())
            except (OSError, ValueError):
                holder = {}
            if holder.get("host") == me["host"] and isinstance(holder.get("pid"), int) and not _alive(holder["pid"]):
                log.warning("%s: taking over the lock of pid %s, which is gone", run_dir, holder["pid"])
                path.unlink(missing_ok=True)
                continue
            raise RunDirectoryError(
                f"{run_dir} is being written by pid {holder.get('pid', '?')} on host {holder.get('host', '?')} "
                f"(since {holder.get('since', '?')}); wait for it to finish, or, if that process is gone, delete {path}"
            ) from None
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        break
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def exclusive(path: Path, *, poll_s: float = 0.2, timeout_s: float = 3600.0) -> Iterator[None]:
    """Hold `path` as a lock file for the block, waiting while another live holder has it: work that
    several shards may reach at once (the merge, a shared prerequisite) is done by one of them."""
    me = json.dumps({"pid": os.getpid(), "host": socket.gethostname()})
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            if _stale(path) or time.monotonic() > deadline:
                path.unlink(missing_ok=True)
                continue
            time.sleep(poll_s)
    with os.fdopen(fd, "w") as f:
        f.write(me)
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


def computed_once(path: Path, compute: Callable[[], T], save: Callable[[T, IO[bytes]], None],
                  load: Callable[[Path], T]) -> T:
    """The value stored at `path`: loaded when there, else computed and stored (atomically) by one
    of the processes that reach it at once, the others waiting on `<path>.lock` and loading it."""
    if path.exists():
        return load(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with exclusive(path.with_name(path.name + ".lock")):
        if path.exists():
            return load(path)
        value = compute()
        atomic_write(path, lambda f: save(value, f))
        return value


def _stale(path: Path) -> bool:
    """A lock left by a process of this host that is gone."""
    try:
        holder = json.loads(path.read_text())
    except (OSError, ValueError):
        return False  # being written right now
    pid = holder.get("pid")
    return holder.get("host") == socket.gethostname() and isinstance(pid, int) and not _alive(pid)
