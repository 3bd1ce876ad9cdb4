"""Results layer: tidy per-row results in parquet, written atomically, resumable by key.

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

Provenance (run.json) is `vlmloc.provenance`; summary tables are `vlmloc.reports.tables`.

One writer per run directory: `add` is atomic against crashes, not against concurrent writers.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterable
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


def is_missing(value: Any) -> bool:
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
        values.append(pd.NA if is_missing(v) else bool(v))
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


class KeyedTable:
    """One parquet file of a run directory whose rows are keyed by `key` columns: the one resume
    mechanism. `add` merges rows by key (new replace stored) and rewrites the file atomically, so a
    kill loses at most the rows not yet added; `done_keys` is what a rerun skips; a file that cannot
    be read (e.g. truncated by a full disk) is moved aside and its rows recomputed."""

    def __init__(self, path: str | os.PathLike, key: tuple[str, ...]) -> None:
        self.path, self.key = Path(path), tuple(key)
        self.run_dir = self.path.parent
        # Last frame read or written, with the file signature it matches: an experiment calls
        # add() once per batch, and re-reading the whole parquet each time would be quadratic.
        self._cache: tuple[tuple[int, int] | None, pd.DataFrame] | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r})"

    def _signature(self) -> tuple[int, int] | None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        return (st.st_mtime_ns, st.st_size)

    # conversions between frames and arrow tables (ResultStore types the results schema)
    def _empty(self) -> pd.DataFrame:
        return pd.DataFrame(columns=list(self.key))

    def _coerce(self, df: pd.DataFrame) -> pd.DataFrame:
        return df

    def _to_table(self, df: pd.DataFrame) -> pa.Table:
        return pa.Table.from_pandas(df, preserve_index=False)

    def _from_table(self, table: pa.Table) -> pd.DataFrame:
        return table.to_pandas()

    def keys_of(self, df: pd.DataFrame) -> list[tuple[str, ...]]:
        # tolist() per column: iterating arrow-backed string rows one by one is ~50x slower.
        return list(zip(*(df[c].astype(str).tolist() for c in self.key)))

    def load(self) -> pd.DataFrame:
        """All stored rows; an empty frame when nothing is stored yet."""
        sig = self._signature()
        if sig is None:
            return self._empty()
        if self._cache is None or self._cache[0] != sig:
            try:
                table = pq.read_table(self.path)
            except (pa.ArrowInvalid, OSError) as err:
                # keep it for inspection, recompute its rows
                aside = self.path.with_name(f"{self.path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
                os.replace(self.path, aside)
                log.warning("%s is not a readable parquet file (%s): moved to %s; its rows will be recomputed",
                            self.path, " ".join(str(err).split())[:200], aside.name)
                self._cache = None
                return self._empty()
            self._cache = (sig, self._from_table(table))
        return self._cache[1].copy()

    def done_keys(self) -> set[tuple[str, ...]]:
        """Keys already stored, each value as a string."""
        return set(self.keys_of(self.load()))

    def pending(self, keys: Iterable[tuple[Any, ...]]) -> list[tuple[str, ...]]:
        """The given keys not yet stored, in their given order."""
        done = self.done_keys()
        return [k for k in (tuple(map(str, key)) for key in keys) if k not in done]

    def add(self, df: pd.DataFrame) -> pd.DataFrame:
        """Merge `df` into the stored rows (new rows replace stored rows of the same key),
        write atomically and return the merged frame.

        Each call rewrites the whole file, so add once per batch of work, not once per row."""
        new = self._coerce(df)
        dup = new.duplicated(list(self.key), keep=False)
        if dup.any():
            # Two rows for one key in a single batch is a bug upstream, not a replacement.
            dups = sorted(set(self.keys_of(new[dup])))[:5]
            raise ValueError(f"duplicate result keys in new rows, e.g. {dups}")
        old = self.load()
        if len(old):
            old = old[~pd.Series(self.keys_of(old), index=old.index).isin(set(self.keys_of(new)))]
            merged = pd.concat([old, new], ignore_index=True) if len(old) else new
        else:
            merged = new
        merged = merged.reset_index(drop=True)
        table = self._to_table(merged)
        atomic_write(self.path, lambda f: pq.write_table(table, f))
        self._cache = (self._signature(), merged.copy())
        return merged


class ResultStore(KeyedTable):
    """The results parquet of one run directory (the results schema), keyed by `RESULT_KEY`;
    `filename`: a shard's own file (`vlmloc.shards`)."""

    def __init__(self, run_dir: str | os.PathLike, filename: str = RESULTS_FILE) -> None:
        super().__init__(Path(run_dir) / filename, RESULT_KEY)

    def __repr__(self) -> str:
        return f"ResultStore({str(self.run_dir)!r})"

    def _empty(self) -> pd.DataFrame:
        return empty_results()

    def _coerce(self, df: pd.DataFrame) -> pd.DataFrame:
        return coerce_results(df)

    def _to_table(self, df: pd.DataFrame) -> pa.Table:
        return _to_arrow(df)

    def _from_table(self, table: pa.Table) -> pd.DataFrame:
        return _from_arrow(table)
