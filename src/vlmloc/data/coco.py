"""Load a COCO-format instances JSON into `Sample` records, with filters and a seeded subset.

Every data source (COCO val2017, COCO-ReM, our synthetic scenes, the photo fixture) ends up
here, so filters and subset selection behave identically for all of them.

    samples, report = load_coco("instances_valrem.json", "val2017", filters={"min_area_frac": 0.02}, n=100)

`report` is a list of `{"filter": name, "kept": int, "dropped": int}`, one per filter step in
the order applied (plus "input" first and "subset" last), so a caller can store how the sample
set was obtained next to its results.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from vlmloc.data.sample import Sample
from vlmloc.errors import VlmlocError

log = logging.getLogger("vlmloc.data")

# Annotation / image keys copied into `Sample.meta` when present. COCO-ReM keeps the original
# COCO annotation in `source`/`source_id`; our synthetic data adds `vlmloc_*` keys (scene spec,
# object index) that an oracle inpainter needs.
_ANN_META_KEYS = ("source", "source_id")
_META_PREFIX = "vlmloc_"


class DataError(VlmlocError, ValueError):
    """Bad data config or data files; the message says what is wrong and what to do."""


@dataclass(frozen=True)
class Filters:
    """Which annotations may be queried. Defaults match configs/data/coco.yaml.

    Areas are mask areas (the annotation's `area`, computed from its segmentation if absent).
    """

    min_area_frac: float = 0.01  # object area / image area; below: too small to localize
    max_area_frac: float = 0.5  # above: the box is (nearly) the whole image
    single_instance: bool = True  # the queried category occurs exactly once in the image
    no_crowd: bool = True  # crowd annotations are groups, not one object
    min_box_fill: float = 0.2  # mask area / box area; below: thin, broken or degenerate
    categories: tuple[str, ...] | None = None  # category names to keep; None = all

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any] | None) -> Filters:
        """Build from a config mapping; unknown keys are an error (a typo would silently not filter)."""
        cfg = dict(cfg or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise DataError(f"unknown data.filters keys {unknown}; valid keys are {sorted(known)}")
        if cfg.get("categories") is not None:
            cats = cfg["categories"]
            if isinstance(cats, str):
                cats = [cats]
            cfg["categories"] = tuple(str(c) for c in cats)
        out = cls(**cfg)
        if not 0 <= out.min_area_frac <= out.max_area_frac:
            raise DataError(
                f"data.filters needs 0 <= min_area_frac <= max_area_frac, got "
                f"{out.min_area_frac} and {out.max_area_frac}"
            )
        return out


def load_coco(
    annotations: str | Path,
    images: str | Path,
    filters: Filters | Mapping[str, Any] | None = None,
    n: int | None = None,
    seed: int = 0,
) -> tuple[list[Sample], list[dict[str, Any]]]:
    """COCO instances JSON + image folder -> (samples sorted by (image_id, ann_id), filter report).

    Image sizes come from the JSON's `width`/`height` (images are not opened); only the
    selected samples' image files are checked for existence.
    """
    annotations, images = _check_paths(annotations, images)
    filt = filters if isinstance(filters, Filters) else Filters.from_mapping(filters)
    n = _check_n(n)
    data = _read_json(annotations)
    _validate(data, annotations)
    coco = _index(data)

    anns = sorted(coco.anns.values(), key=lambda a: (a["image_id"], a["id"]))
    report: list[dict[str, Any]] = []
    _record(report, "input", len(anns), 0)
    reasons = {a["id"]: _malformed(a, coco.imgs[a["image_id"]]) for a in anns}
    bad = Counter(r for r in reasons.values() if r is not None)
    anns = [a for a in anns if reasons[a["id"]] is None]
    _record(report, "well_formed", len(anns), sum(bad.values()))
    if bad:
        report[-1]["reasons"] = dict(sorted(bad.items()))
        for reason, count in sorted(bad.items()):
            log.warning("data: %d annotation(s) of %s dropped: %s", count, annotations.name, reason)
    for name, keep in _filter_steps(coco, filt, annotations):
        before = len(anns)
        anns = [a for a in anns if keep(a)]
        _record(report, name, len(anns), before - len(anns))

    chosen = select_subset([(a["image_id"], a["id"]) for a in anns], n, seed)
    _record(report, "subset", len(chosen), len(anns) - len(chosen))
    samples = [_to_sample(coco, coco.anns[ann_id], images) for _, ann_id in chosen]
    _check_image_files(samples, images, annotations)
    return samples, report


def select_subset(ids: Sequence[tuple[int, int]], n: int | None, seed: int) -> list[tuple[int, int]]:
    """Deterministic subset: shuffle the sorted ids with default_rng(seed), take n, sort again."""
    ids = sorted(ids)
    if n is None or n >= len(ids):
        return ids
    order = np.random.default_rng(seed).permutation(len(ids))[:n]
    return sorted(ids[i] for i in order)


# --- input checks: cheap, before any heavy work ------------------------------------------


def _check_paths(annotations: str | Path, images: str | Path) -> tuple[Path, Path]:
    ann_path = Path(annotations).expanduser()
    img_dir = Path(images).expanduser()
    if not ann_path.is_file():
        raise DataError(
            f"instances JSON not found: {ann_path}. Set data.annotations (or data.root) to an "
            f"existing COCO instances file, e.g. <coco>/annotations/instances_valrem.json "
            f"(COCO-ReM) or instances_val2017.json (see scripts/ for download instructions)."
        )
    if not img_dir.is_dir():
        raise DataError(
            f"image folder not found: {img_dir}. Set data.images (or data.root) to the folder "
            f"holding the images of {ann_path.name}, e.g. <coco>/val2017."
        )
    return ann_path, img_dir


def _check_n(n: int | None) -> int | None:
    if n is None:
        return None
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise DataError(f"data.n must be a non-negative integer or null (= all), got {n!r}")
    return n


def _read_json(path: Path) -> Any:
    try:
        with path.open("rb") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(
            f"{path} is not valid JSON ({e}). Is it a truncated download or a different file? "
            f"Re-download or regenerate it."
        ) from e


def _validate(data: Any, path: Path) -> None:
    """Structural checks that pycocotools would otherwise turn into KeyErrors deep inside."""
    required = ("images", "annotations", "categories")
    if not isinstance(data, dict):
        raise DataError(f"{path} is not a COCO instances JSON: top level is {type(data).__name__}, not an object")
    missing = [k for k in required if not isinstance(data.get(k), list)]
    if missing:
        raise DataError(
            f"{path} is not a COCO instances JSON: missing list(s) {missing} (needs {list(required)}). "
            f"Point data.annotations at an instances_*.json file, not e.g. captions or panoptic."
        )
    images = _check_images(data["images"], path)
    cats = {c.get("id") for c in data["categories"] if isinstance(c, dict) and "name" in c}
    if len(cats) != len(data["categories"]):
        raise DataError(f"{path}: every category needs an `id` and a `name`")
    seen: set[int] = set()
    for ann in data["annotations"]:
        _check_annotation(ann, images, cats, seen, path)


def _check_images(images: list[Any], path: Path) -> set[int]:
    ids: set[int] = set()
    for im in images:
        if isinstance(im, dict) and "file_name" not in im and isinstance(im.get("coco_url"), str):
            im["file_name"] = im["coco_url"].rsplit("/", 1)[-1]  # LVIS v1 names COCO's images by URL only
        if not isinstance(im, dict) or not {"id", "file_name", "width", "height"} <= im.keys():
            raise DataError(f"{path}: image entry {im!r:.120} lacks id / file_name / width / height")
        if not (_pos_int(im["width"]) and _pos_int(im["height"])):
            raise DataError(f"{path}: image {im['id']} has invalid size {im['width']}x{im['height']}")
        if im["id"] in ids:
            raise DataError(f"{path}: duplicate image id {im['id']}")
        ids.add(im["id"])
    return ids


def _check_annotation(ann: Any, images: set[int], cats: set[int], seen: set[int], path: Path) -> None:
    if not isinstance(ann, dict) or not {"id", "image_id", "category_id", "bbox", "segmentation"} <= ann.keys():
        raise DataError(
            f"{path}: annotation {ann!r:.120} lacks one of id / image_id / category_id / bbox / segmentation"
        )
    if ann["id"] in seen:
        raise DataError(f"{path}: duplicate annotation id {ann['id']}")
    seen.add(ann["id"])
    if ann["image_id"] not in images:
        raise DataError(
            f"{path}: annotation {ann['id']} references image_id {ann['image_id']}, which is not in "
            f"`images`. The file is inconsistent (mixed splits?); regenerate or re-download it."
        )
    if ann["category_id"] not in cats:
        raise DataError(f"{path}: annotation {ann['id']} references unknown category_id {ann['category_id']}")


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)


def _malformed(ann: dict[str, Any], image: dict[str, Any]) -> str | None:
    """Why an annotation cannot be queried (None: it can). Such annotations are counted and dropped."""
    box = ann["bbox"]
    if not isinstance(box, (list, tuple)) or len(box) != 4 or not all(_number(v) for v in box):
        return "bbox is not 4 numbers [x, y, w, h]"
    if box[2] <= 0 or box[3] <= 0:
        return "bbox width or height <= 0"
    if "area" in ann and not (_number(ann["area"]) and ann["area"] > 0):
        return "area is not a positive number"
    seg = ann["segmentation"]
    if isinstance(seg, dict):
        size = seg.get("size")
        if "counts" not in seg or not isinstance(size, (list, tuple)) or list(size) != [image["height"], image["width"]]:
            return "RLE segmentation lacks counts or its size is not the image's [height, width]"
        return None
    if not isinstance(seg, list) or not seg:
        return "segmentation is neither polygons nor RLE"
    for poly in seg:
        if not isinstance(poly, list) or len(poly) < 6 or len(poly) % 2 or not all(_number(v) for v in poly):
            return "a polygon has fewer than 3 points (or odd / non-numeric coordinates)"
    return None


def _pos_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


# --- filtering ----------------------------------------------------------------------------


def _index(data: dict[str, Any]) -> COCO:
    """pycocotools index over already-parsed data (no second file read, no stdout chatter)."""
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _filter_steps(coco: COCO, f: Filters, path: Path) -> list[tuple[str, Callable[[dict], bool]]]:
    """(name, keep(annotation)) in application order; inactive filters keep everything."""
    cat_ids = _category_ids(coco, f.categories, path)
    # Counted over ALL annotations (crowd included): a crowd of the same category means the
    # query "the X" is ambiguous even if only one X is annotated individually.
    per_image = Counter((a["image_id"], a["category_id"]) for a in coco.anns.values())
    area = _area_fn(coco)

    def image_area(a: dict) -> float:
        im = coco.imgs[a["image_id"]]
        return float(im["width"] * im["height"])

    return [
        ("categories", lambda a: cat_ids is None or a["category_id"] in cat_ids),
        ("no_crowd", lambda a: not (f.no_crowd and a.get("iscrowd", 0))),
        ("single_instance", lambda a: not f.single_instance or per_image[(a["image_id"], a["category_id"])] == 1),
        ("min_area_frac", lambda a: area(a) / image_area(a) >= f.min_area_frac),
        ("max_area_frac", lambda a: area(a) / image_area(a) <= f.max_area_frac),
        ("min_box_fill", lambda a: _box_fill(a, area(a)) >= f.min_box_fill),
    ]


def _category_ids(coco: COCO, names: tuple[str, ...] | None, path: Path) -> set[int] | None:
    if names is None:
        return None
    by_name = {c["name"]: c["id"] for c in coco.cats.values()}
    unknown = sorted(set(names) - set(by_name))
    if unknown:
        raise DataError(
            f"data.filters.categories {unknown} not in {path.name}; available: {sorted(by_name)}"
        )
    return {by_name[name] for name in names}


def _area_fn(coco: COCO) -> Callable[[dict], float]:
    """Mask area in pixels: the JSON's `area`, else computed from the segmentation (cached)."""
    cache: dict[int, float] = {}

    def area(a: dict) -> float:
        if "area" in a:
            return float(a["area"])
        if a["id"] not in cache:
            cache[a["id"]] = float(mask_utils.area(coco.annToRLE(a)))
        return cache[a["id"]]

    return area


def _box_fill(ann: dict, area: float) -> float:
    _, _, w, h = ann["bbox"]
    return area / (w * h) if w > 0 and h > 0 else 0.0


def _record(report: list[dict[str, Any]], name: str, kept: int, dropped: int) -> None:
    report.append({"filter": name, "kept": kept, "dropped": dropped})
    log.info("data filter %-16s kept %6d  dropped %6d", name, kept, dropped)


# --- samples ------------------------------------------------------------------------------


def _to_sample(coco: COCO, ann: dict[str, Any], images: Path) -> Sample:
    im = coco.imgs[ann["image_id"]]
    meta = {k: v for k, v in ann.items() if k in _ANN_META_KEYS or k.startswith(_META_PREFIX)}
    meta.update({k: v for k, v in im.items() if k.startswith(_META_PREFIX)})
    meta["iscrowd"] = int(ann.get("iscrowd", 0))
    synonyms = coco.cats[ann["category_id"]].get("synonyms")  # LVIS categories list theirs
    if synonyms:
        meta["synonyms"] = [str(w).replace("_", " ") for w in synonyms]
    return Sample(
        sample_id=f"{im['id']}-{ann['id']}",
        image_id=int(im["id"]),
        ann_id=int(ann["id"]),
        image_path=images / im["file_name"],
        width=int(im["width"]),
        height=int(im["height"]),
        category=coco.cats[ann["category_id"]]["name"],
        category_id=int(ann["category_id"]),
        box_xywh=tuple(float(v) for v in ann["bbox"]),  # type: ignore[arg-type]
        segmentation=ann["segmentation"],
        area=_area_fn(coco)(ann),
        meta=meta,
    )


def _check_image_files(samples: list[Sample], images: Path, annotations: Path) -> None:
    missing = sorted({str(s.image_path.name) for s in samples if not s.image_path.is_file()})
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise DataError(
            f"{len(missing)} image file(s) of the selected samples are missing from {images}: "
            f"{shown}. Check that data.images is the image folder of {annotations.name} "
            f"(e.g. val2017 for a val annotations file) and that the download is complete."
        )


def filters_as_dict(f: Filters) -> dict[str, Any]:
    """Plain dict of the filter values (for provenance records)."""
    d = asdict(f)
    d["categories"] = list(f.categories) if f.categories is not None else None
    return d
