"""A tiny real-photo COCO dataset from scikit-image's bundled photos, for offline tests and demos.

    path = ensure_fixture("data/fixture")   # data/fixture/instances.json + data/fixture/images/

The polygons below were outlined by hand (8-20 vertices, x/y in original-image pixels) while
looking at the photos; they are reasonably tight, not pixel-exact. Category ids follow COCO
(person 1, cat 17, cup 47, spoon 50); "rocket" is not a COCO category and gets id 1001.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
from importlib import resources
from pathlib import Path
from typing import Any

from pycocotools import mask as mask_utils

from vlmloc.data.coco import DataError

log = logging.getLogger("vlmloc.data")

FIXTURE_VERSION = 1
CATEGORIES = [
    {"id": 1, "name": "person", "supercategory": "person"},
    {"id": 17, "name": "cat", "supercategory": "animal"},
    {"id": 47, "name": "cup", "supercategory": "kitchen"},
    {"id": 50, "name": "spoon", "supercategory": "kitchen"},
    {"id": 1001, "name": "rocket", "supercategory": "vehicle"},
]

# file name, (width, height), [(category, polygon [(x, y), ...]), ...]
PHOTOS: list[tuple[str, tuple[int, int], list[tuple[str, list[tuple[float, float]]]]]] = [
    ("astronaut.png", (512, 512), [
        # Eileen Collins in her orange suit; the helmet she holds (bottom right) is left out.
        ("person", [(190, 15), (270, 24), (296, 55), (298, 100), (282, 140), (302, 175),
                    (308, 225), (340, 250), (358, 290), (362, 345), (320, 362), (292, 420), (280, 511),
                    (22, 511), (28, 380), (45, 270), (85, 222), (124, 168), (158, 130), (152, 60)]),
    ]),
    ("chelsea.png", (451, 300), [
        # Cat's face and head, filling most of the frame; cut by the top and bottom edges.
        ("cat", [(30, 0), (395, 0), (385, 40), (370, 80), (365, 120), (360, 160), (345, 200),
                 (325, 240), (305, 275), (290, 299), (0, 299), (0, 140), (15, 90), (25, 45)]),
    ]),
    ("coffee.png", (600, 400), [
        # Espresso cup with its handle, without the saucer; the spoon is a separate object.
        ("cup", [(290, 18), (350, 25), (395, 50), (408, 100), (394, 190), (380, 225),
                 (360, 250), (330, 270), (290, 280), (255, 278), (240, 300), (210, 305), (198, 285),
                 (200, 255), (208, 236), (188, 200), (176, 150), (173, 100), (190, 55), (235, 25)]),
        ("spoon", [(403, 68), (423, 70), (416, 120), (400, 200), (392, 238), (404, 262), (405, 290),
                   (395, 315), (365, 325), (335, 315), (326, 290), (332, 262), (355, 245), (376, 232),
                   (390, 150)]),
    ]),
    ("rocket.jpg", (640, 427), [
        # Falcon 9 on the pad, nose cone to the launch mount; towers excluded.
        ("rocket", [(322, 126), (328, 131), (332, 142), (334, 155), (334, 178), (333, 260), (334, 405),
                    (311, 405), (312, 260), (310, 178), (310, 155), (312, 142), (316, 131)]),
    ]),
]


def skimage_data_dir() -> Path:
    """Folder of scikit-image's bundled sample images (no network)."""
    if importlib.util.find_spec("skimage") is None:
        raise DataError(
            "the photo fixture needs scikit-image's bundled photos, but scikit-image is not "
            "installed: pip install scikit-image (it is in the dev extra: pip install -e .[dev])"
        )
    return Path(str(resources.files("skimage") / "data"))


def fixture_coco() -> dict[str, Any]:
    """The fixture's COCO dict (bbox from polygon extents, area from the rasterised polygon)."""
    images, anns = [], []
    for image_id, (name, (w, h), objects) in enumerate(PHOTOS, start=1):
        images.append({"id": image_id, "file_name": name, "width": w, "height": h})
        for category, pts in objects:
            anns.append(_annotation(len(anns) + 1, image_id, category, pts, w, h))
    coco = {"info": {}, "licenses": [], "images": images, "annotations": anns, "categories": CATEGORIES}
    digest = hashlib.sha256(json.dumps(coco, sort_keys=True).encode()).hexdigest()[:16]
    coco["info"] = {
        "description": "vlmloc photo fixture (scikit-image sample photos, hand-drawn polygons)",
        "version": FIXTURE_VERSION,
        "vlmloc_generator": "vlmloc.data.fixture",
        "vlmloc_params_hash": digest,
    }
    return coco


def _annotation(
    ann_id: int, image_id: int, category: str, pts: list[tuple[float, float]], w: int, h: int
) -> dict[str, Any]:
    poly = [float(v) for p in pts for v in p]
    xs, ys = poly[0::2], poly[1::2]
    rle = mask_utils.merge(mask_utils.frPyObjects([poly], h, w))
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": next(c["id"] for c in CATEGORIES if c["name"] == category),
        "segmentation": [poly],
        "bbox": [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)],
        "area": float(mask_utils.area(rle)),
        "iscrowd": 0,
    }


def ensure_fixture(root: str | Path) -> Path:
    """root/instances.json + root/images/, written only if missing or out of date."""
    root = Path(root).expanduser()
    ann_path = root / "instances.json"
    coco = fixture_coco()
    if _is_current(ann_path, coco["info"]["vlmloc_params_hash"]):
        return ann_path
    src = skimage_data_dir()
    img_dir = root / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    for name, _, _ in PHOTOS:
        if not (src / name).is_file():
            raise DataError(f"{src / name} is missing from the scikit-image install; reinstall scikit-image")
        shutil.copyfile(src / name, img_dir / name)
    tmp = ann_path.with_suffix(f".json.tmp{os.getpid()}")
    tmp.write_text(json.dumps(coco, indent=1))
    os.replace(tmp, ann_path)  # atomic: parallel jobs see the old file or the new one
    log.info("photo fixture written to %s", root)
    return ann_path


def _is_current(ann_path: Path, digest: str) -> bool:
    try:
        info = json.loads(ann_path.read_text()).get("info", {})
    except (OSError, ValueError):
        return False
    images_ok = all((ann_path.parent / "images" / name).is_file() for name, _, _ in PHOTOS)
    return info.get("vlmloc_params_hash") == digest and images_ok
