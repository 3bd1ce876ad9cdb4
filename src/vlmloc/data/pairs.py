"""Object-removal pairs on disk: inpainted images + a manifest, written by experiment=make_pairs.

    <pairs_dir>/manifest.parquet     one row per object that was inpainted (kept or not)
    <pairs_dir>/pairs/<sample_id>.png  the image with that object removed

    samples, report = load_pairs("outputs/make_pairs-llava7b-coco", n=50)   # data=pairs
    base = inpainted_sample(samples[0])     # the same object's record, image = the inpainted one

experiment=make_pairs builds them with the helpers at the end of this module: `current_rows`,
`inpaint_missing`, `inpainted_view` and the filter rule `admitted` / `step_counts`.

A pairs `Sample` is the ORIGINAL sample (image, box, mask, category as the source data gave
them) with `meta["inpainted_path"]` (absolute path of the inpainted image) and `meta["pair"]`
(the model answers that admitted it). Causal mediation uses source = the sample,
base = `inpainted_sample(sample)`.

Manifest columns (`MANIFEST_COLUMNS`):

    sample_id, image_id, ann_id, category, category_id   the source sample's ids
    original_path        str    absolute path of the original image
    inpainted_path       str    path of the inpainted image, relative to pairs_dir
    width, height        int    image size in pixels (both images)
    box_xywh             list   COCO box of the object, 4 floats, original pixels
    area                 float  object mask area in pixels
    segmentation         str    the COCO segmentation as JSON
    meta                 str    the source sample's meta as JSON
    mask_margin_px       int    dilation of the object mask before inpainting
    hole_frac            float  dilated mask area / image area
    inpaint_backend      str    opencv | lama | oracle
    inpaint_checkpoint   str    checkpoint path (lama) or None
    inpaint_checkpoint_md5 str  its md5 or None
    inpaint_key          str    hash of the backend settings that made the image (resume key)
    model                str    the model whose answers are stored (None before it answered)
    p_yes_original, p_yes_inpainted       float  P(yes) of the classification question (NaN in open mode)
    answer_original, answer_inpainted     str    the raw classification answers
    recognized_original, recognized_inpainted  boolean  classification correct (NA = not asked)
    loc_answer_original  str    raw box answer on the original (None = not asked)
    iou_original         float  IoU of that box with the ground truth (NaN = not asked)
    localized_original   boolean  iou >= 0.5 (NA = not asked)
    kept                 bool   admitted to the pair set by the filter rule of the run
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from vlmloc.data.coco import DataError, select_subset
from vlmloc.data.sample import Sample

if TYPE_CHECKING:
    from vlmloc.inpaint import Inpainter

log = logging.getLogger("vlmloc.data")

MANIFEST_FILE = "manifest.parquet"
PAIRS_SUBDIR = "pairs"

ID_COLUMNS = ("sample_id", "image_id", "ann_id", "category", "category_id")
SAMPLE_COLUMNS = ("original_path", "width", "height", "box_xywh", "area", "segmentation", "meta")
INPAINT_COLUMNS = (
    "inpainted_path", "mask_margin_px", "hole_frac", "inpaint_backend", "inpaint_checkpoint",
    "inpaint_checkpoint_md5", "inpaint_key",
)
ANSWER_COLUMNS = (
    "model", "p_yes_original", "p_yes_inpainted", "answer_original", "answer_inpainted",
    "recognized_original", "recognized_inpainted", "loc_answer_original", "iou_original", "localized_original",
)
MANIFEST_COLUMNS = (*ID_COLUMNS, *SAMPLE_COLUMNS, *INPAINT_COLUMNS, *ANSWER_COLUMNS, "kept")

_DTYPES: dict[str, Any] = {
    "sample_id": "str", "image_id": "int64", "ann_id": "int64", "category": "str", "category_id": "int64",
    "original_path": "str", "width": "int64", "height": "int64", "box_xywh": object, "area": "float64",
    "segmentation": "str", "meta": "str", "inpainted_path": "str", "mask_margin_px": "int64",
    "hole_frac": "float64", "inpaint_backend": "str", "inpaint_checkpoint": object,
    "inpaint_checkpoint_md5": object, "inpaint_key": "str", "model": object,
    "p_yes_original": "float64", "p_yes_inpainted": "float64", "answer_original": object,
    "answer_inpainted": object, "recognized_original": "boolean", "recognized_inpainted": "boolean",
    "loc_answer_original": object, "iou_original": "float64", "localized_original": "boolean", "kept": "bool",
}
_ARROW = pa.schema([
    ("sample_id", pa.string()), ("image_id", pa.int64()), ("ann_id", pa.int64()), ("category", pa.string()),
    ("category_id", pa.int64()), ("original_path", pa.string()), ("width", pa.int64()), ("height", pa.int64()),
    ("box_xywh", pa.list_(pa.float64())), ("area", pa.float64()), ("segmentation", pa.string()),
    ("meta", pa.string()), ("inpainted_path", pa.string()), ("mask_margin_px", pa.int64()),
    ("hole_frac", pa.float64()), ("inpaint_backend", pa.string()), ("inpaint_checkpoint", pa.string()),
    ("inpaint_checkpoint_md5", pa.string()), ("inpaint_key", pa.string()), ("model", pa.string()),
    ("p_yes_original", pa.float64()), ("p_yes_inpainted", pa.float64()), ("answer_original", pa.string()),
    ("answer_inpainted", pa.string()), ("recognized_original", pa.bool_()), ("recognized_inpainted", pa.bool_()),
    ("loc_answer_original", pa.string()), ("iou_original", pa.float64()), ("localized_original", pa.bool_()),
    ("kept", pa.bool_()),
])
assert tuple(_ARROW.names) == MANIFEST_COLUMNS


def inpainted_name(sample_id: str) -> str:
    """Relative path of a sample's inpainted image inside pairs_dir."""
    return f"{PAIRS_SUBDIR}/{sample_id}.png"


def sample_record(sample: Sample) -> dict[str, Any]:
    """The manifest's id and sample columns for `sample` (enough to rebuild it)."""
    return {
        "sample_id": sample.sample_id,
        "image_id": int(sample.image_id),
        "ann_id": int(sample.ann_id),
        "category": sample.category,
        "category_id": int(sample.category_id),
        "original_path": str(Path(sample.image_path).resolve()),
        "width": int(sample.width),
        "height": int(sample.height),
        "box_xywh": [float(v) for v in sample.box_xywh],
        "area": float(sample.area),
        "segmentation": json.dumps(sample.segmentation),
        "meta": json.dumps(sample.meta, default=str),
    }


def empty_manifest() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series([], dtype=t) for c, t in _DTYPES.items()})


def coerce_manifest(df: pd.DataFrame) -> pd.DataFrame:
    """Copy of `df` with exactly the manifest columns in canonical dtypes (missing columns -> NA)."""
    out = df.copy()
    for col in MANIFEST_COLUMNS:
        if col not in out.columns:
            out[col] = None
    out = out[list(MANIFEST_COLUMNS)]
    out["kept"] = out["kept"].fillna(False)
    for col, dtype in _DTYPES.items():
        if dtype == "boolean":
            out[col] = pd.array([pd.NA if _missing(v) else bool(v) for v in out[col]], dtype="boolean")
        elif dtype is object:
            out[col] = pd.Series([None if _missing(v) else v for v in out[col]], index=out.index, dtype=object)
        else:
            out[col] = out[col].astype(dtype)
    return out.reset_index(drop=True)


def _missing(v: Any) -> bool:
    return v is None or (np.ndim(v) == 0 and bool(pd.isna(v)))


def write_manifest(pairs_dir: str | Path, df: pd.DataFrame) -> Path:
    """Write the manifest atomically (readers see the old or the new file), rows by sample_id."""
    from vlmloc.results import atomic_write  # results is the layer that owns atomic files

    df = coerce_manifest(df).sort_values(["image_id", "ann_id"], kind="stable").reset_index(drop=True)
    table = pa.Table.from_pandas(df, schema=_ARROW, preserve_index=False)
    return atomic_write(Path(pairs_dir) / MANIFEST_FILE, lambda f: pq.write_table(table, f))


def read_manifest(pairs_dir: str | Path) -> pd.DataFrame:
    """The manifest of `pairs_dir`; an empty frame with the columns when there is none yet."""
    path = Path(pairs_dir) / MANIFEST_FILE
    if not path.is_file():
        return empty_manifest()
    table = pq.read_table(path)
    df = table.drop_columns(["box_xywh"]).to_pandas()
    df["box_xywh"] = pd.Series(table.column("box_xywh").to_pylist(), index=df.index, dtype=object)
    return coerce_manifest(df)


def record_to_sample(row: dict[str, Any] | pd.Series, pairs_dir: str | Path) -> Sample:
    """A manifest row -> the ORIGINAL sample with the pair facts in meta."""
    meta = json.loads(row["meta"])
    meta["inpainted_path"] = str((Path(pairs_dir) / row["inpainted_path"]).resolve())
    meta["pair"] = {
        k: (None if _missing(row[k]) else (row[k].item() if hasattr(row[k], "item") else row[k]))
        for k in (*INPAINT_COLUMNS[1:], *ANSWER_COLUMNS)
    }
    return Sample(
        sample_id=str(row["sample_id"]),
        image_id=int(row["image_id"]),
        ann_id=int(row["ann_id"]),
        image_path=Path(row["original_path"]),
        width=int(row["width"]),
        height=int(row["height"]),
        category=str(row["category"]),
        category_id=int(row["category_id"]),
        box_xywh=tuple(float(v) for v in row["box_xywh"]),  # type: ignore[arg-type]
        segmentation=json.loads(row["segmentation"]),
        area=float(row["area"]),
        meta=meta,
    )


def inpainted_sample(sample: Sample) -> Sample:
    """The same object record with the inpainted image (the CMA base run's input)."""
    path = sample.meta.get("inpainted_path")
    if not path:
        raise DataError(f"sample {sample.sample_id} has no meta['inpainted_path']: load it with data=pairs")
    return dataclasses.replace(sample, image_path=Path(path))


def load_pairs(
    pairs_dir: str | Path, n: int | None = None, seed: int = 0
) -> tuple[list[Sample], list[dict[str, Any]]]:
    """Kept pairs of a make_pairs run -> (original samples sorted by (image_id, ann_id), report)."""
    pairs_dir = Path(pairs_dir).expanduser()
    if not (pairs_dir / MANIFEST_FILE).is_file():
        raise DataError(
            f"no {MANIFEST_FILE} in {pairs_dir}: data.pairs_dir must be the run directory of "
            f"`python -m vlmloc experiment=make_pairs ...` (its outputs/make_pairs-<model>-<data>/)."
        )
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
        raise DataError(f"data.n must be a non-negative integer or null (= all), got {n!r}")
    df = read_manifest(pairs_dir)
    kept = df[df["kept"]]
    report = [
        {"filter": "input", "kept": len(df), "dropped": 0},
        {"filter": "pair_kept", "kept": len(kept), "dropped": len(df) - len(kept)},
    ]
    rows = {(int(r["image_id"]), int(r["ann_id"])): r for r in kept.to_dict("records")}
    chosen = select_subset(list(rows), n, seed)
    report.append({"filter": "subset", "kept": len(chosen), "dropped": len(rows) - len(chosen)})
    samples = [record_to_sample(rows[key], pairs_dir) for key in chosen]
    missing = [p for s in samples for p in (s.image_path, Path(s.meta["inpainted_path"])) if not p.is_file()]
    if missing:
        shown = ", ".join(str(p) for p in missing[:3]) + (" ..." if len(missing) > 3 else "")
        raise DataError(
            f"{len(missing)} image file(s) of the pairs in {pairs_dir} are missing: {shown}. Originals are "
            f"referenced by absolute path: restore the source data there, or rerun experiment=make_pairs."
        )
    for r in report:
        log.info("data filter %-16s kept %6d  dropped %6d", r["filter"], r["kept"], r["dropped"])
    return samples, report


# --------------------------------------------------------------------------- building the pairs
# The data side of experiment=make_pairs: which manifest rows are current, inpainting, the view of a
# sample on its inpainted image and the filter rule. Asking the model is the experiment's part.

INPAINTED_SUFFIX = "/inpainted"


def current_rows(manifest: pd.DataFrame, samples: Sequence[Sample]) -> dict[str, dict[str, Any]]:
    """Manifest rows of this run's samples by sample_id; rows of other samples are dropped
    (the manifest describes the current data config, so data=pairs loads only its pairs)."""
    ids = {s.sample_id for s in samples}
    rows = {r["sample_id"]: r for r in manifest.to_dict("records") if r["sample_id"] in ids}
    if len(rows) < len(manifest):
        log.info("dropping %d manifest rows of samples not in this run's data", len(manifest) - len(rows))
    return rows


def _batches(items: Sequence[Sample], size: int) -> Iterator[list[Sample]]:
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


def inpaint_missing(
    inpainter: Inpainter, samples: Sequence[Sample], rows: dict[str, dict[str, Any]], pairs_dir: Path
) -> int:
    """Inpaint every sample whose image is missing or was made with other settings; returns how many.

    `rows` (manifest rows by sample_id) gets a fresh row, not yet kept, for each. The manifest is
    written after each batch, so an interrupted run resumes after the last one.
    """
    from vlmloc.results import atomic_write

    key = inpainter.key()
    info = inpainter.info()

    def done(s: Sample) -> bool:
        row = rows.get(s.sample_id)
        return row is not None and row["inpaint_key"] == key and (pairs_dir / row["inpainted_path"]).is_file()

    todo = [s for s in samples if not done(s)]
    stale = sum(1 for s in todo if s.sample_id in rows)
    if stale:
        log.warning("%d stored inpaintings were made with other settings than %s: redoing them", stale, info)
    log.info("inpainting %d of %d objects (%s)", len(todo), len(samples), inpainter.backend)
    for chunk in _batches(todo, inpainter.batch_size):
        masks = [s.mask() for s in chunk]
        out = inpainter.inpaint([s.load_image() for s in chunk], masks, chunk)
        for s, im, m in zip(chunk, out, masks):
            rel = inpainted_name(s.sample_id)
            atomic_write(pairs_dir / rel, lambda f, im=im: im.save(f, format="PNG", compress_level=3))
            rows[s.sample_id] = {
                **sample_record(s),
                "inpainted_path": rel,
                "mask_margin_px": inpainter.dilate_px,
                "hole_frac": float(inpainter.hole(m).mean()),
                "inpaint_backend": inpainter.backend,
                "inpaint_checkpoint": info.get("checkpoint"),
                "inpaint_checkpoint_md5": info.get("checkpoint_md5"),
                "inpaint_key": key,
                "kept": False,  # answers are asked next
            }
        write_manifest(pairs_dir, pd.DataFrame(list(rows.values())))
    return len(todo)


def inpainted_view(sample: Sample, pairs_dir: Path) -> Sample:
    """The sample pointing at its inpainted image (same object record, other image file).

    Its sample_id gets INPAINTED_SUFFIX so both images can share one evaluate call: evaluate
    caches images by sample_id within a batch.
    """
    return dataclasses.replace(
        sample, sample_id=sample.sample_id + INPAINTED_SUFFIX, image_path=pairs_dir / inpainted_name(sample.sample_id)
    )


def _true(v: Any) -> bool:
    return not _missing(v) and bool(v)


def admitted(row: dict[str, Any], require_localization: bool) -> bool:
    """The pair rule: recognized in the original, not in the inpainted image [, localized in the original]."""
    ok = (_true(row.get("recognized_original")) and not _missing(row.get("recognized_inpainted"))
          and not bool(row["recognized_inpainted"]))
    return ok and (not require_localization or _true(row.get("localized_original")))


def step_counts(rows: dict[str, dict[str, Any]], require_localization: bool) -> list[dict[str, Any]]:
    """Objects left after each step of the filter, cumulative: [{step, kept, dropped}]."""
    r = list(rows.values())
    steps = [
        ("inpainted", lambda x: True),
        ("recognized_original", lambda x: _true(x.get("recognized_original"))),
        ("not_recognized_inpainted", lambda x: admitted(x, False)),
    ]
    if require_localization:
        steps.append(("localized_original", lambda x: admitted(x, True)))
    out = [{"step": "objects", "kept": len(r), "dropped": 0}]
    left = r
    for name, keep in steps:
        now = [x for x in left if keep(x)]
        out.append({"step": name, "kept": len(now), "dropped": len(left) - len(now)})
        left = now
    n_kept = sum(bool(x["kept"]) for x in r)
    out.append({"step": "kept", "kept": n_kept, "dropped": len(r) - n_kept})
    return out
