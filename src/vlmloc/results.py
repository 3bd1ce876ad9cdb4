"""Results layer: tidy per-row results in parquet, run provenance, summary tables.

One row per sample x task x condition (`RESULT_KEY`). Columns (`RESULT_COLUMNS`):

    sample_id  str         the data stage's sample id
    image_id   int         COCO image id
    category   str         queried object category
    task       str         "classification" | "localization"
    condition  str         intervention, e.g. "baseline", "object_tokens:p=1"
    answer     str         raw generated text ("" when none)
    pred_box   list|None   predicted box, 4 floats xyxy pixels; None = unparsed answer
    gt_box     list|None   ground-truth box, 4 floats xyxy pixels
    iou        float       IoU(pred_box, gt_box); 0 for unparsed answers; NaN for classification
    hit_50/70/90 boolean   iou at threshold 0.5/0.7/0.9; NA for classification
    p_yes      float       P("yes") for classification; NaN for localization
    correct    bool        classification: "yes" won; localization: hit_50

Experiments may add any further columns; they are kept as they are.

Typical use by an experiment::

    store = ResultStore(run_dir)
    todo = store.pending(all_keys)          # a rerun of a finished run does no work
    for batch in batches(todo):
        store.add(run_batch(batch))         # merged by key, written atomically
    write_run_json(run_dir, provenance(cfg, model_info=..., seed=..., device=...,
                                       dtype=..., attn_implementation=..., started=t0))
    print(to_markdown(add_baseline_delta(summarize(store.load()))))

One writer per run directory: `add` is atomic against crashes, not against concurrent writers.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import IO, Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

TASKS = ("classification", "localization")
RESULT_KEY = ("sample_id", "task", "condition")
HIT_COLUMNS = ("hit_50", "hit_70", "hit_90")
BOX_COLUMNS = ("pred_box", "gt_box")

# Arrow types of the required columns; extra columns are inferred by pyarrow.
ARROW_SCHEMA = pa.schema(
    [
        ("sample_id", pa.string()),
        ("image_id", pa.int64()),
        ("category", pa.string()),
        ("task", pa.string()),
        ("condition", pa.string()),
        ("answer", pa.string()),
        ("pred_box", pa.list_(pa.float64())),
        ("gt_box", pa.list_(pa.float64())),
        ("iou", pa.float64()),
        ("hit_50", pa.bool_()),
        ("hit_70", pa.bool_()),
        ("hit_90", pa.bool_()),
        ("p_yes", pa.float64()),
        ("correct", pa.bool_()),
    ]
)
RESULT_COLUMNS = tuple(ARROW_SCHEMA.names)

# pandas dtypes of the required columns (boxes stay Python lists in an object column).
_PANDAS_DTYPES: dict[str, Any] = {
    "sample_id": "str",
    "image_id": "int64",
    "category": "str",
    "task": "str",
    "condition": "str",
    "answer": "str",
    "pred_box": object,
    "gt_box": object,
    "iou": "float64",
    "hit_50": "boolean",
    "hit_70": "boolean",
    "hit_90": "boolean",
    "p_yes": "float64",
    "correct": "bool",
}

log = logging.getLogger("vlmloc.results")

RESULTS_FILE = "results.parquet"
RUN_JSON_FILE = "run.json"

Key = tuple[str, str, str]


# --------------------------------------------------------------------------- schema


def validate_results(df: pd.DataFrame) -> None:
    """Raise ValueError if `df` lacks a required column or has an unknown task."""
    missing = [c for c in RESULT_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(
            f"results frame is missing required column(s) {missing}; "
            f"required: {list(RESULT_COLUMNS)} (see vlmloc.results docstring)"
        )
    bad_tasks = sorted(set(df["task"].dropna().unique()) - set(TASKS))
    if bad_tasks or df["task"].isna().any():
        raise ValueError(f"unknown task value(s) {bad_tasks or [None]}; expected one of {TASKS}")


def empty_results() -> pd.DataFrame:
    """A zero-row frame with the required columns and their dtypes."""
    return pd.DataFrame({c: pd.Series([], dtype=t) for c, t in _PANDAS_DTYPES.items()})


def _box_array(boxes: pd.Series) -> pa.Array:
    """Boxes (lists, tuples, arrays of 4 numbers; None/NaN/NA for missing) as list<double>."""
    try:
        arr = pa.array(list(boxes), type=ARROW_SCHEMA.field("pred_box").type, from_pandas=True)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as err:
        msg = f"column {boxes.name!r} must hold boxes of 4 numbers or None: {err}"
        raise ValueError(msg) from err
    lengths = pc.list_value_length(arr)
    if pc.any(pc.not_equal(lengths, 4)).as_py():
        bad = arr.filter(pc.not_equal(lengths, 4))[0].as_py()
        raise ValueError(f"column {boxes.name!r}: a box must have 4 coordinates (xyxy), got {bad}")
    return arr


def _is_missing(value: Any) -> bool:
    return value is None or (np.ndim(value) == 0 and bool(pd.isna(value)))


def _as_boolean(s: pd.Series) -> pd.Series:
    """Nullable boolean from bools, numpy bools, 0/1 or missing values; strings are refused
    because bool("False") is True."""
    if pd.api.types.is_bool_dtype(s):
        return s.astype("boolean")
    values = []
    for v in s:
        if isinstance(v, str):
            raise ValueError(f"column {s.name!r} must be boolean, got the string {v!r}")
        values.append(pd.NA if _is_missing(v) else bool(v))
    return pd.Series(values, index=s.index, dtype="boolean", name=s.name)


def coerce_results(df: pd.DataFrame) -> pd.DataFrame:
    """Validated copy of `df` with the required columns in canonical dtypes.

    `correct` NA becomes False: failure is data, an unscored row did not succeed.
    """
    validate_results(df)
    out = df.copy()
    for col in BOX_COLUMNS:
        out[col] = pd.Series(_box_array(out[col]).to_pylist(), index=out.index, dtype=object)
    out["answer"] = out["answer"].fillna("")
    for col in (*HIT_COLUMNS, "correct"):
        out[col] = _as_boolean(out[col])
    out["correct"] = out["correct"].fillna(False)
    for col, dtype in _PANDAS_DTYPES.items():
        if dtype is not object:
            out[col] = out[col].astype(dtype)
    # Required columns first, extras after, in their given order.
    extras = [c for c in out.columns if c not in RESULT_COLUMNS]
    return out[list(RESULT_COLUMNS) + extras]


def _to_arrow(df: pd.DataFrame) -> pa.Table:
    """Arrow table with the fixed types for required columns; extras inferred."""
    extras = [c for c in df.columns if c not in RESULT_COLUMNS]
    fields = list(ARROW_SCHEMA) + list(pa.Schema.from_pandas(df[extras], preserve_index=False))
    return pa.Table.from_pandas(df, schema=pa.schema(fields), preserve_index=False)


def _from_arrow(table: pa.Table) -> pd.DataFrame:
    """pandas frame from a results table, boxes back to lists of floats."""
    boxes = [c for c in BOX_COLUMNS if c in table.column_names]
    # Boxes straight to Python lists; to_pandas would make numpy arrays of them first.
    df = table.drop_columns(boxes).to_pandas()
    for col in boxes:
        df[col] = pd.Series(table.column(col).to_pylist(), index=df.index, dtype=object)
    return coerce_results(df)


def _keys(df: pd.DataFrame) -> list[Key]:
    # tolist() per column: iterating arrow-backed string rows one by one is ~50x slower.
    return list(zip(*(df[c].astype(str).tolist() for c in RESULT_KEY)))


# --------------------------------------------------------------------------- atomic files


def _fsync_dir(directory: Path) -> None:
    """Persist a rename; not every platform lets a directory be opened, hence the guard."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _file_mode() -> int:
    # mkstemp creates 0600 files; give the final file the mode a plain open() would.
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """Write `path` via `write(binary_file)` so readers see the old or the new file, never half.

    Writes a temp file in the same directory, fsyncs it, then `os.replace`s it over `path`.
    On any failure (including KeyboardInterrupt) the temp file is removed and `path` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _file_mode())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    return path


# --------------------------------------------------------------------------- store


class ResultStore:
    """The results parquet of one run directory, with resume by `RESULT_KEY`."""

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / RESULTS_FILE
        # Last frame read or written, with the file signature it matches: an experiment calls
        # add() once per batch, and re-reading the whole parquet each time would be quadratic.
        self._cache: tuple[tuple[int, int], pd.DataFrame] | None = None

    def _signature(self) -> tuple[int, int] | None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        return (st.st_mtime_ns, st.st_size)

    def __repr__(self) -> str:
        return f"ResultStore({str(self.run_dir)!r})"

    def load(self) -> pd.DataFrame:
        """All stored rows; an empty frame with the schema when nothing is stored yet."""
        sig = self._signature()
        if sig is None:
            return empty_results()
        if self._cache is None or self._cache[0] != sig:
            try:
                table = pq.read_table(self.path)
            except (pa.ArrowInvalid, OSError) as err:
                # e.g. truncated by a full disk: keep it for inspection, recompute its rows
                aside = self.path.with_name(f"{self.path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
                os.replace(self.path, aside)
                log.warning("%s is not a readable parquet file (%s): moved to %s; its rows will be recomputed",
                            self.path, " ".join(str(err).split())[:200], aside.name)
                self._cache = None
                return empty_results()
            self._cache = (sig, _from_arrow(table))
        return self._cache[1].copy()

    def done_keys(self) -> set[Key]:
        """Keys (sample_id, task, condition) already stored."""
        return set(_keys(self.load()))

    def pending(self, keys: Iterable[tuple[Any, ...]]) -> list[Key]:
        """The given keys not yet stored, in their given order."""
        done = self.done_keys()
        return [k for k in (tuple(map(str, key)) for key in keys) if k not in done]

    def add(self, df: pd.DataFrame) -> pd.DataFrame:
        """Merge `df` into the stored rows (new rows replace stored rows of the same key),
        write atomically and return the merged frame.

        Each call rewrites the whole file, so add once per batch of work, not once per row."""
        new = coerce_results(df)
        dup = new.duplicated(list(RESULT_KEY), keep=False)
        if dup.any():
            # Two rows for one key in a single batch is a bug upstream, not a replacement.
            dups = sorted(set(_keys(new[dup])))[:5]
            raise ValueError(f"duplicate result keys in new rows, e.g. {dups}")
        old = self.load()
        if len(old):
            old = old[~pd.Series(_keys(old), index=old.index).isin(set(_keys(new)))]
            merged = pd.concat([old, new], ignore_index=True) if len(old) else new
        else:
            merged = new
        merged = merged.reset_index(drop=True)
        table = _to_arrow(merged)
        atomic_write(self.path, lambda f: pq.write_table(table, f))
        self._cache = (self._signature(), merged.copy())
        return merged


# --------------------------------------------------------------------------- provenance

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


def write_run_json(run_dir: str | os.PathLike, info: Mapping[str, Any]) -> Path:
    """Atomically write `info` to run_dir/run.json.

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
            before = json.loads((Path(run_dir) / RUN_JSON_FILE).read_text()).get("sessions", [])
        except (OSError, ValueError, AttributeError):
            before = []
        sessions = [s for s in before if isinstance(s, dict) and s.get("started_unix") != started]
        sessions.append({"started_unix": started, "start_time": _iso(started), "end_time": info["end_time"],
                         "wall_time_s": info["wall_time_s"]})
        info["sessions"] = sessions
        info["wall_time_total_s"] = sum(float(s.get("wall_time_s", 0.0)) for s in sessions)
    text = json.dumps(info, indent=2, sort_keys=False, default=str) + "\n"
    return atomic_write(Path(run_dir) / RUN_JSON_FILE, lambda f: f.write(text.encode("utf-8")))


# --------------------------------------------------------------------------- tables

SUMMARY_COLUMNS = (
    "condition",
    "task",
    "n",
    "accuracy",
    "acc_50",
    "acc_70",
    "acc_90",
    "mean_iou",
    "n_unparsed",
    "mean_p_yes",
)


def _summarize_localization(loc: pd.DataFrame) -> pd.DataFrame:
    # An NA hit or NaN IoU on a localization row is a failed localization (failure is data),
    # never a row to skip: skipping would inflate accuracy.
    cols = {f"acc_{h[4:]}": loc[h].fillna(False).astype(float) * 100 for h in HIT_COLUMNS}
    parts = pd.DataFrame(
        {
            "condition": loc["condition"],
            "task": loc["task"],
            **cols,
            "iou": loc["iou"].fillna(0.0),
            "unparsed": loc["pred_box"].isna(),
        }
    )
    out = parts.groupby(["condition", "task"], sort=False).agg(
        n=("iou", "size"),
        acc_50=("acc_50", "mean"),
        acc_70=("acc_70", "mean"),
        acc_90=("acc_90", "mean"),
        mean_iou=("iou", "mean"),
        n_unparsed=("unparsed", "sum"),
    )
    out["accuracy"] = out[["acc_50", "acc_70", "acc_90"]].mean(axis=1)
    return out


def _summarize_classification(cls: pd.DataFrame) -> pd.DataFrame:
    parts = pd.DataFrame(
        {
            "condition": cls["condition"],
            "task": cls["task"],
            "correct": cls["correct"].astype(float) * 100,
            "p_yes": cls["p_yes"],
        }
    )
    return parts.groupby(["condition", "task"], sort=False).agg(
        n=("correct", "size"), accuracy=("correct", "mean"), mean_p_yes=("p_yes", "mean")
    )


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (condition, task), conditions in order of first appearance.

    Localization: `acc_50/70/90` = hit rates in %, `accuracy` = their mean (the paper's
    accuracy), `mean_iou`, `n_unparsed` (pred_box None). Classification: `accuracy` = % correct,
    `mean_p_yes`. Columns that do not apply to a task are NaN / NA.
    """
    df = coerce_results(df)
    parts = [
        f(df[df["task"] == task])
        for task, f in (
            ("classification", _summarize_classification),
            ("localization", _summarize_localization),
        )
        if (df["task"] == task).any()
    ]
    if not parts:
        return pd.DataFrame({c: pd.Series([], dtype=float) for c in SUMMARY_COLUMNS}).astype(
            {"condition": "str", "task": "str", "n": "int64", "n_unparsed": "Int64"}
        )
    out = pd.concat(parts).reset_index().reindex(columns=list(SUMMARY_COLUMNS))
    cond_rank = {c: i for i, c in enumerate(pd.unique(df["condition"]))}
    out = out.sort_values(
        ["condition", "task"], key=lambda s: s.map(cond_rank) if s.name == "condition" else s
    )
    return out.astype({"n": "int64", "n_unparsed": "Int64"}).reset_index(drop=True)


def add_baseline_delta(summary: pd.DataFrame, baseline: str = "baseline") -> pd.DataFrame:
    """Copy of a `summarize` table with `delta` = accuracy - the baseline's accuracy of the
    same task (percentage points; negative = a drop). NaN where the task has no baseline row."""
    base = summary.loc[summary["condition"] == baseline].set_index("task")["accuracy"]
    out = summary.copy()
    out["delta"] = out["accuracy"] - out["task"].map(base).astype(float)
    return out


def _cell(value: Any, digits: int) -> str:
    if _is_missing(value):
        return ""
    if isinstance(value, (float, np.floating)):
        return f"{value:.{digits}f}"
    return str(value).replace("|", "\\|")


def to_markdown(table: pd.DataFrame, *, digits: int = 2) -> str:
    """GitHub-flavoured markdown table (no `tabulate` needed); floats with `digits` decimals,
    missing values blank, numeric columns right-aligned."""
    cols = [str(c) for c in table.columns]
    numeric = [
        pd.api.types.is_numeric_dtype(table[c]) and not pd.api.types.is_bool_dtype(table[c])
        for c in table.columns
    ]
    rows = [[_cell(v, digits) for v in row] for row in table.itertuples(index=False, name=None)]
    widths = [max([len(c), 3, *(len(r[i]) for r in rows)]) for i, c in enumerate(cols)]

    def line(cells: list[str]) -> str:
        padded = (c.rjust(w) if num else c.ljust(w) for c, w, num in zip(cells, widths, numeric))
        return "| " + " | ".join(padded) + " |"

    rule = "| " + " | ".join("-" * (w - 1) + ":" if n else "-" * w for w, n in zip(widths, numeric))
    return "\n".join([line(cols), rule + " |", *(line(r) for r in rows)])
