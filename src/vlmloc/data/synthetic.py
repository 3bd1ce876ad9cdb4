"""Synthetic shape scenes written as a real COCO dataset (PNG images + instances.json).

A scene is a JSON-serialisable *spec* (size, background, distractors, objects with polygon and
colour). `render_scene(spec)` is a pure function of it, so any image can be re-rendered
without some of its objects, exactly: that is the "oracle" inpainter.

    path = ensure_synthetic("data/synthetic", "heldout", {"n_images": 64})
    # data/synthetic/heldout/instances.json, data/synthetic/heldout/images/heldout_000001.png

Each `images` entry carries its spec under "vlmloc_scene"; each annotation carries
"vlmloc_object_index", its index in `spec["objects"]`. Objects never overlap and are drawn last
(over the unannotated distractors), so each annotation's polygon is exactly the visible object.
Object pixels are painted through the pycocotools rasterisation of the annotation's own polygon:
the COCO mask and the painted pixels are identical (see `object_mask`).
"""

from __future__ import annotations

import colorsys
import hashlib
import json
import logging
import math
import os
import shutil
import uuid
import zlib
from collections.abc import Callable, Collection, Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

from vlmloc.data.coco import DataError
from vlmloc.rundir import exclusive

log = logging.getLogger("vlmloc.data")

# Bump when rendering or sampling changes: existing datasets are then regenerated.
GENERATOR_VERSION = 1
GENERATOR_NAME = "vlmloc.data.synthetic"
SCENE_KEY = "vlmloc_scene"
OBJECT_INDEX_KEY = "vlmloc_object_index"
RGB = list[int]


@dataclass(frozen=True)
class SyntheticParams:
    """Generator settings; defaults match configs/data/synthetic.yaml (`data.synthetic`)."""

    n_images: int = 64
    width: tuple[int, int] = (240, 480)  # image width range in pixels, inclusive
    height: tuple[int, int] = (240, 480)  # image height range in pixels, inclusive
    categories: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "diamond", "hexagon", "heart")
    min_objects: int = 1
    max_objects: int = 4
    one_per_category: bool = True  # at most one instance per category per image
    size_frac: tuple[float, float] = (0.12, 0.6)  # object's longer side / min(W, H), log-uniform
    n_distractors: tuple[int, int] = (1, 5)  # unannotated lines, scribbles, noise patches
    min_gap: int = 4  # pixels between object boxes
    min_contrast: float = 60.0  # target RGB distance between object colour and every pixel under it
    seed: int = 0  # base seed; each split derives its own stream from (seed, split)

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any] | SyntheticParams | None) -> SyntheticParams:
        """Build from `data.synthetic`; unknown keys and unknown categories are errors."""
        if isinstance(cfg, SyntheticParams):
            return cfg
        cfg = dict(cfg or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise DataError(f"unknown data.synthetic keys {unknown}; valid keys are {sorted(known)}")
        for key in ("width", "height", "size_frac", "n_distractors", "categories"):
            if key in cfg:
                cfg[key] = tuple(cfg[key])
        params = cls(**cfg)
        params.check()
        return params

    def check(self) -> None:
        bad = sorted(set(self.categories) - set(SHAPES))
        if bad or not self.categories:
            raise DataError(f"data.synthetic.categories {bad or '[]'} invalid; choose from {sorted(SHAPES)}")
        if len(set(self.categories)) != len(self.categories):
            raise DataError(f"data.synthetic.categories has duplicates: {list(self.categories)}")
        if not 1 <= self.min_objects <= self.max_objects:
            raise DataError("data.synthetic needs 1 <= min_objects <= max_objects")
        if self.one_per_category and self.max_objects > len(self.categories):
            raise DataError("data.synthetic.max_objects exceeds the number of categories with one_per_category")
        if min(self.width + self.height) < 32 or self.width[0] > self.width[1] or self.height[0] > self.height[1]:
            raise DataError("data.synthetic.width/height must be [min, max] ranges of at least 32 pixels")
        if not 0 < self.size_frac[0] <= self.size_frac[1] <= 1:
            raise DataError("data.synthetic.size_frac must satisfy 0 < min <= max <= 1")

    def as_json(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))

    def hash(self, split: str) -> str:
        """Identifies a dataset: params + split + generator version."""
        blob = json.dumps({"params": self.as_json(), "split": split, "version": GENERATOR_VERSION}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


# --- shapes: unit outlines, [k, 2] points roughly in [-1, 1], y down ------------------------


def _regular(k: int, phase: float = -math.pi / 2) -> np.ndarray:
    t = phase + 2 * math.pi * np.arange(k) / k
    return np.stack([np.cos(t), np.sin(t)], 1)


def _star(rng: np.random.Generator) -> np.ndarray:
    inner = rng.uniform(0.38, 0.5)
    pts = _regular(10)
    return pts * np.where(np.arange(10) % 2 == 0, 1.0, inner)[:, None]


def _cross(rng: np.random.Generator) -> np.ndarray:
    t = rng.uniform(0.22, 0.38)  # half arm thickness
    q = [(t, -1), (t, -t), (1, -t), (1, t), (t, t), (t, 1)]
    return np.array(q + [(-x, -y) for x, y in q], float)


def _heart(rng: np.random.Generator) -> np.ndarray:
    t = np.linspace(0, 2 * math.pi, 48, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    return np.stack([x, y], 1) / 17.0


def _arrow(rng: np.random.Generator) -> np.ndarray:
    s, h = rng.uniform(0.2, 0.35), rng.uniform(0.1, 0.4)  # shaft half-width, head start
    return np.array([(-1, -s), (h, -s), (h, -0.8), (1, 0), (h, 0.8), (h, s), (-1, s)], float)


@dataclass(frozen=True)
class Shape:
    """How to draw one category: outline, aspect (w/h) range, rotation range in degrees."""

    outline: Callable[[np.random.Generator], np.ndarray]
    aspect: tuple[float, float] = (1.0, 1.0)
    rotation: tuple[float, float] = (0.0, 0.0)


SHAPES: dict[str, Shape] = {
    "circle": Shape(lambda rng: _regular(64)),
    # Squares stay within 20 degrees of upright so they are not read as diamonds.
    "square": Shape(lambda rng: _regular(4, math.pi / 4), rotation=(-20, 20)),
    "rectangle": Shape(lambda rng: _regular(4, math.pi / 4), aspect=(1.5, 2.5), rotation=(-30, 30)),
    "triangle": Shape(lambda rng: np.array([(0, -1), (1, 1), (-1, 1)], float), (0.8, 1.3), (-40, 40)),
    "star": Shape(_star, rotation=(-36, 36)),
    "cross": Shape(_cross, rotation=(-20, 20)),
    "diamond": Shape(lambda rng: _regular(4), aspect=(0.55, 0.8), rotation=(-15, 15)),
    "pentagon": Shape(lambda rng: _regular(5), rotation=(-36, 36)),
    "hexagon": Shape(lambda rng: _regular(6, 0.0), rotation=(0, 60)),
    "heart": Shape(_heart, aspect=(0.9, 1.1), rotation=(-20, 20)),
    "arrow": Shape(_arrow, aspect=(1.4, 2.2), rotation=(0, 360)),
}


def shape_polygon(category: str, size: float, rng: np.random.Generator) -> np.ndarray:
    """Outline of `category`, longer box side = `size` px, top-left of its box at (0, 0). [k, 2]"""
    shape = SHAPES[category]
    pts = shape.outline(rng) * [rng.uniform(*shape.aspect), 1.0]
    a = math.radians(rng.uniform(*shape.rotation))
    pts = pts @ np.array([[math.cos(a), math.sin(a)], [-math.sin(a), math.cos(a)]])
    pts = pts - pts.min(0)
    return pts * (size / pts.max())


# --- rendering: pure functions of the spec -------------------------------------------------


def render_scene(spec: Mapping[str, Any], skip_objects: Collection[int] = ()) -> Image.Image:
    """Spec -> RGB image [H, W]; objects whose index is in `skip_objects` are left out."""
    return Image.fromarray(paint_objects(render_base(spec), spec, skip_objects))


def render_base(spec: Mapping[str, Any]) -> np.ndarray:
    """The scene without any object: background + distractors, uint8 [H, W, 3]."""
    img = Image.fromarray(render_background(spec["background"], spec["width"], spec["height"]))
    for d in spec["distractors"]:
        _draw_distractor(img, d)
    return np.array(img)


def paint_objects(base: np.ndarray, spec: Mapping[str, Any], skip_objects: Collection[int] = ()) -> np.ndarray:
    """Objects of `spec` painted over a copy of `base` (uint8 [H, W, 3]), except `skip_objects`."""
    n = len(spec["objects"])
    bad = [i for i in skip_objects if not 0 <= i < n]
    if bad:
        raise ValueError(f"skip_objects {bad} out of range for a scene with {n} objects")
    arr = base.copy()
    for i, obj in enumerate(spec["objects"]):
        if i not in skip_objects:
            arr[object_mask(obj["polygon"], spec["width"], spec["height"])] = obj["color"]
    return arr


def object_mask(polygon: list[float], width: int, height: int) -> np.ndarray:
    """COCO polygon [x0, y0, x1, y1, ...] -> bool [height, width], rasterised by pycocotools.

    Objects are painted through this mask, not ImageDraw.polygon: PIL rounds both ends of each
    scanline span outwards (about a half-pixel dilation), which for 30-px shapes disagrees with
    pycocotools' pixel-centre rule by 10% IoU. Using one rasteriser makes mask == pixels.
    """
    rle = mask_utils.merge(mask_utils.frPyObjects([list(map(float, polygon))], height, width))
    return mask_utils.decode(rle).astype(bool)


def render_background(bg: Mapping[str, Any], width: int, height: int) -> np.ndarray:
    """Background spec -> uint8 [height, width, 3]."""
    yy = np.arange(height, dtype=np.float32)[:, None]
    xx = np.arange(width, dtype=np.float32)[None, :]
    a = math.radians(bg.get("angle", 0.0))
    u = xx * math.cos(a) + yy * math.sin(a)  # [H, W] coordinate along the pattern direction
    c0, c1 = (np.asarray(c, np.float32) for c in bg["colors"])
    kind = bg["kind"]
    if kind == "gradient":
        t = (u - u.min()) / max(float(u.max() - u.min()), 1.0)
    elif kind == "stripes":
        t = np.floor(u / bg["period"]) % 2
    elif kind == "checker":
        v = -xx * math.sin(a) + yy * math.cos(a)
        t = (np.floor(u / bg["period"]) + np.floor(v / bg["period"])) % 2
    elif kind == "noise":
        t = _smooth_noise(width, height, bg["period"], bg["seed"])
    else:
        raise ValueError(f"unknown background kind {kind!r}")
    out = c0 + t[..., None] * (c1 - c0)  # [H, W, 3]
    # Luminance grain, uniform in [-grain, grain]: texture at a third of the cost of RGB noise.
    grain = np.random.default_rng(bg["seed"] + 1).random((height, width, 1), dtype=np.float32)
    out += (grain * 2 - 1) * np.float32(bg["grain"])
    return np.clip(out, 0, 255, out=out).round(out=out).astype(np.uint8)


def _smooth_noise(width: int, height: int, period: float, seed: int) -> np.ndarray:
    """Low-frequency noise in [0, 1], [height, width]: a coarse random grid, bicubic-upsampled."""
    gw, gh = max(2, math.ceil(width / period) + 1), max(2, math.ceil(height / period) + 1)
    grid = np.random.default_rng(seed).random((gh, gw), dtype=np.float32)
    up = Image.fromarray(grid).resize((width, height), Image.Resampling.BICUBIC)
    return np.clip(np.asarray(up), 0.0, 1.0)


def _draw_distractor(img: Image.Image, d: Mapping[str, Any]) -> None:
    draw = ImageDraw.Draw(img)
    if d["kind"] in ("line", "scribble"):
        draw.line([tuple(p) for p in d["points"]], fill=tuple(d["color"]), width=d["width"], joint="curve")
    elif d["kind"] == "noise_patch":
        x0, y0, x1, y1 = d["box"]
        patch = np.random.default_rng(d["seed"]).integers(0, 256, (y1 - y0, x1 - x0, 3), dtype=np.uint8)
        img.paste(Image.fromarray(patch), (x0, y0))
    else:
        raise ValueError(f"unknown distractor kind {d['kind']!r}")


# --- sampling a scene spec -----------------------------------------------------------------


def sample_scene(rng: np.random.Generator, p: SyntheticParams) -> dict[str, Any]:
    """One random scene spec (JSON-serialisable)."""
    return _sample_scene(rng, p)[0]


def _sample_scene(rng: np.random.Generator, p: SyntheticParams) -> tuple[dict[str, Any], np.ndarray]:
    """(scene spec, render_base(spec)); the base is reused to paint the final image."""
    w = int(rng.integers(p.width[0], p.width[1] + 1))
    h = int(rng.integers(p.height[0], p.height[1] + 1))
    spec: dict[str, Any] = {"width": w, "height": h, "background": _sample_background(rng, w, h)}
    n_distractors = int(rng.integers(p.n_distractors[0], p.n_distractors[1] + 1))
    spec["distractors"] = [_sample_distractor(rng, w, h) for _ in range(n_distractors)]
    spec["objects"] = []
    base = render_base(spec)  # what the objects are drawn over, for the contrast check
    boxes: list[tuple[float, float, float, float]] = []
    for cat in _sample_categories(rng, p):
        poly = _place(rng, cat, w, h, p, boxes)
        if poly is None:
            continue  # no room left; the scene gets fewer objects
        flat = [round(float(v), 2) for v in poly.ravel()]
        color = _pick_color(rng, base[object_mask(flat, w, h)], p.min_contrast)
        spec["objects"].append({"category": cat, "polygon": flat, "color": color})
    return spec, base


def _sample_categories(rng: np.random.Generator, p: SyntheticParams) -> list[str]:
    k = int(rng.integers(p.min_objects, p.max_objects + 1))
    idx = rng.choice(len(p.categories), size=k, replace=not p.one_per_category)
    return [p.categories[i] for i in idx]


def _place(
    rng: np.random.Generator, cat: str, w: int, h: int, p: SyntheticParams, boxes: list[tuple[float, ...]]
) -> np.ndarray | None:
    """Polygon [k, 2] inside the image whose box keeps `min_gap` from `boxes` (appended), or None."""
    lo, hi = p.size_frac
    size = min(w, h) * math.exp(rng.uniform(math.log(lo), math.log(hi)))
    for _ in range(6):  # shrink and retry when a size does not fit among the placed objects
        pts = shape_polygon(cat, size, rng)
        ext = pts.max(0)
        for _ in range(30):  # rejection sampling of the position
            x = rng.uniform(1, w - 1 - ext[0]) if w - 2 > ext[0] else None
            y = rng.uniform(1, h - 1 - ext[1]) if h - 2 > ext[1] else None
            if x is None or y is None:
                break
            box = (x, y, x + ext[0], y + ext[1])
            if all(_apart(box, b, p.min_gap) for b in boxes):
                boxes.append(box)
                return pts + [x, y]
        size *= 0.8
    return None


def _apart(a: tuple[float, ...], b: tuple[float, ...], gap: float) -> bool:
    return a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]


def _random_color(rng: np.random.Generator, sat: tuple[float, float], val: tuple[float, float]) -> RGB:
    r, g, b = colorsys.hsv_to_rgb(rng.random(), rng.uniform(*sat), rng.uniform(*val))
    return [round(r * 255), round(g * 255), round(b * 255)]


def _pick_color(rng: np.random.Generator, under: np.ndarray, min_contrast: float, tries: int = 24) -> RGB:
    """A vivid colour far from every pixel it covers (best of `tries` if none reaches min_contrast).

    under: uint8 [n_pixels, 3], the pixels the object will cover.
    """
    under = under.astype(np.float32)
    best, best_d = None, -1.0
    for _ in range(tries):
        c = _random_color(rng, (0.45, 1.0), (0.35, 1.0))
        d = float(np.linalg.norm(under - np.asarray(c, np.float32), axis=1).min()) if len(under) else 255.0
        if d >= min_contrast:
            return c
        if d > best_d:
            best, best_d = c, d
    return best  # type: ignore[return-value]


def _sample_background(rng: np.random.Generator, w: int, h: int) -> dict[str, Any]:
    kind = str(rng.choice(["gradient", "stripes", "checker", "noise"]))
    c0 = _random_color(rng, (0.0, 0.6), (0.25, 0.95))
    # Second colour near the first keeps textures from dominating the objects.
    c1 = [int(np.clip(v + rng.integers(-70, 71), 0, 255)) for v in c0]
    return {
        "kind": kind,
        "colors": [c0, c1],
        "angle": round(float(rng.uniform(0, 180)), 2),
        "period": int(rng.integers(8, max(9, min(w, h) // 4))),
        "grain": round(float(rng.uniform(0, 6)), 2),
        "seed": int(rng.integers(2**31)),
    }


def _sample_distractor(rng: np.random.Generator, w: int, h: int) -> dict[str, Any]:
    kind = str(rng.choice(["line", "scribble", "noise_patch"]))
    color = _random_color(rng, (0.0, 1.0), (0.1, 1.0))
    if kind == "noise_patch":
        pw, ph = (int(v) for v in rng.integers(8, max(9, min(w, h) // 6), 2))
        x0, y0 = int(rng.integers(0, w - pw)), int(rng.integers(0, h - ph))
        return {"kind": kind, "box": [x0, y0, x0 + pw, y0 + ph], "seed": int(rng.integers(2**31))}
    n_pts = 2 if kind == "line" else int(rng.integers(3, 7))
    if kind == "line":
        pts = rng.uniform([0, 0], [w, h], (2, 2))
    else:  # a short random walk
        steps = rng.normal(0, min(w, h) / 10, (n_pts - 1, 2))
        pts = np.cumsum(np.vstack([rng.uniform([0, 0], [w, h]), steps]), 0)
    return {"kind": kind, "points": pts.round(1).tolist(), "width": int(rng.integers(1, 4)), "color": color}


# --- COCO dataset on disk ------------------------------------------------------------------


def split_seed(seed: int, split: str) -> np.random.SeedSequence:
    """Disjoint random streams per split: (base seed, crc32 of the split name)."""
    return np.random.SeedSequence([seed, zlib.crc32(split.encode())])


def generate_split(out_dir: Path, split: str, params: SyntheticParams) -> dict[str, Any]:
    """Render `params.n_images` scenes into out_dir/images; return the COCO dict (not written)."""
    img_dir = out_dir / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    cat_ids = {name: i + 1 for i, name in enumerate(params.categories)}
    images, anns = [], []
    for i, child in enumerate(split_seed(params.seed, split).spawn(params.n_images)):
        spec, base = _sample_scene(np.random.default_rng(child), params)
        image_id, file_name = i + 1, f"{split}_{i + 1:06d}.png"
        # == render_scene(spec), without rendering the background a second time
        Image.fromarray(paint_objects(base, spec)).save(img_dir / file_name, compress_level=1)
        images.append(
            {"id": image_id, "file_name": file_name, "width": spec["width"], "height": spec["height"], SCENE_KEY: spec}
        )
        for k, obj in enumerate(spec["objects"]):
            anns.append(_annotation(len(anns) + 1, image_id, cat_ids[obj["category"]], obj["polygon"], spec, k))
    return {
        "info": {
            "description": f"vlmloc synthetic shapes, split {split}",
            "vlmloc_generator": GENERATOR_NAME,
            "version": GENERATOR_VERSION,
            "split": split,
            "vlmloc_params": params.as_json(),
            "vlmloc_params_hash": params.hash(split),
        },
        "licenses": [],
        "images": images,
        "annotations": anns,
        "categories": [{"id": i, "name": n, "supercategory": "shape"} for n, i in cat_ids.items()],
    }


def _annotation(ann_id: int, image_id: int, cat_id: int, poly: list[float], spec: dict, k: int) -> dict[str, Any]:
    """COCO annotation: bbox from the polygon's extents, area from its rasterised mask."""
    xs, ys = poly[0::2], poly[1::2]
    rle = mask_utils.merge(mask_utils.frPyObjects([poly], spec["height"], spec["width"]))
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": cat_id,
        "segmentation": [poly],
        "bbox": [round(min(xs), 2), round(min(ys), 2), round(max(xs) - min(xs), 2), round(max(ys) - min(ys), 2)],
        "area": float(mask_utils.area(rle)),
        "iscrowd": 0,
        OBJECT_INDEX_KEY: k,
    }


def ensure_synthetic(
    root: str | Path, split: str, params: SyntheticParams | Mapping[str, Any] | None = None
) -> Path:
    """root/split/instances.json, generated only if missing or made with other params."""
    params = SyntheticParams.from_mapping(params)
    final = Path(root).expanduser() / split
    ann_path = final / "instances.json"
    if _is_current(ann_path, params.hash(split)):
        log.info("synthetic %s: reusing %s", split, ann_path)
        return ann_path
    _check_ours(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    # shards starting together: one generates, the others wait and reuse it
    with exclusive(final.parent / f".{split}.lock"):
        if _is_current(ann_path, params.hash(split)):
            log.info("synthetic %s: reusing %s", split, ann_path)
            return ann_path
        # Build beside the target and swap in, so crashes never leave a half dataset behind a
        # valid-looking instances.json.
        tmp = final.parent / f".{split}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            coco = generate_split(tmp, split, params)
            _write_json(tmp / "instances.json", coco)
            _swap_in(tmp, final, params.hash(split))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    n_img, n_obj = len(coco["images"]), len(coco["annotations"])
    log.info("synthetic %s: wrote %d images, %d objects to %s", split, n_img, n_obj, final)
    return ann_path


def _is_current(ann_path: Path, params_hash: str) -> bool:
    """True when ann_path exists, was made with `params_hash` and all its images exist."""
    try:
        data = json.loads(ann_path.read_text())
    except (OSError, ValueError):
        return False
    if data.get("info", {}).get("vlmloc_params_hash") != params_hash:
        return False
    return all((ann_path.parent / "images" / im["file_name"]).is_file() for im in data["images"])


def _check_ours(folder: Path) -> None:
    """Refuse to replace a folder that holds something other than our generated data."""
    if not folder.exists() or not any(folder.iterdir()):
        return
    try:
        info = json.loads((folder / "instances.json").read_text()).get("info", {})
    except (OSError, ValueError):
        info = {}
    if info.get("vlmloc_generator") != GENERATOR_NAME:
        raise DataError(
            f"{folder} exists and is not a vlmloc synthetic dataset; refusing to overwrite it. "
            f"Choose another data.root or remove the folder."
        )


def _swap_in(tmp: Path, final: Path, params_hash: str) -> None:
    old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
    if final.exists():
        final.rename(old)
    try:
        tmp.rename(final)
    except OSError:
        # Another job published first; fine if it made the same dataset.
        if not _is_current(final / "instances.json", params_hash):
            raise
    shutil.rmtree(old, ignore_errors=True)


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, separators=(",", ":")))
    os.replace(tmp, path)
