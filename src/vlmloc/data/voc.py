"""PASCAL VOC 2012 segmentation split -> a COCO instances file, then the COCO loader and filters.

    annotations = ensure_voc(root, "val", cache_dir, names={"aeroplane": "airplane"}, box_from="xml")
    samples, report = load_coco(annotations, Path(root) / "JPEGImages", filters=...)

VOC's objects are read from `Annotations/<id>.xml` (name, bndbox, difficult) and their masks from
`SegmentationObject/<id>.png`: a palette PNG whose pixel value k marks the k-th `<object>` of the
XML (0 background, 255 the void border, which belongs to no object). Only images of
`ImageSets/Segmentation/<split>.txt` have these masks. Each object becomes one COCO annotation
with an RLE mask (pycocotools), so VOC samples go through the same `Sample` records, filters and
subset draw as COCO's. VOC's `difficult` flag is carried as COCO's `iscrowd`: `filters.no_crowd`
drops difficult objects and `filters.single_instance` still counts them.

The converted file is written once per (split list, settings) under `cache_dir` and reused.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from vlmloc.data.coco import DataError

CONVERTER_VERSION = 1  # bump when the conversion changes, so cached files are rebuilt
BOX_SOURCES = ("xml", "mask")


def ensure_voc(root: str | Path, split: str, cache_dir: str | Path, names: Mapping[str, str] | None = None,
               box_from: str = "xml") -> Path:
    """The COCO instances file of VOC split `split` under `root` (VOCdevkit/VOC2012), built if absent.

    names: VOC class name -> the name prompts use (e.g. diningtable -> dining table); others as is.
    box_from: xml (VOC's own bndbox, 1-based inclusive pixels -> COCO [x, y, w, h]) | mask (the
    mask's tight box, as COCO-ReM recomputes its boxes).
    """
    root = Path(root)
    if box_from not in BOX_SOURCES:
        raise DataError(f"data.box_from must be one of {list(BOX_SOURCES)}, got {box_from!r}")
    split_file = root / "ImageSets" / "Segmentation" / f"{split}.txt"
    for need in (split_file, root / "Annotations", root / "SegmentationObject", root / "JPEGImages"):
        if not need.exists():
            raise DataError(f"{need} does not exist: data.root must be a VOC 2012 folder (VOCdevkit/VOC2012) "
                            f"holding Annotations/, SegmentationObject/, JPEGImages/ and ImageSets/Segmentation/")
    ids = [line.strip() for line in split_file.read_text().splitlines() if line.strip()]
    if not ids:
        raise DataError(f"{split_file} lists no images")
    names = dict(names or {})
    key = json.dumps([CONVERTER_VERSION, str(root.resolve()), split, ids, sorted(names.items()), box_from])
    out = Path(cache_dir) / f"voc-{split}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"
    if not out.is_file():
        _write_atomic(out, voc_to_coco(root, ids, names, box_from))
    return out


def voc_to_coco(root: Path, ids: list[str], names: Mapping[str, str], box_from: str) -> dict[str, Any]:
    """COCO instances dict of the listed VOC images; image ids are their order in the split list (1-based)."""
    images, annotations, categories = [], [], {}
    for image_id, stem in enumerate(ids, start=1):
        xml_path = root / "Annotations" / f"{stem}.xml"
        objects, (width, height) = read_objects(xml_path)
        instance = read_instances(root / "SegmentationObject" / f"{stem}.png", (height, width), len(objects))
        images.append({"id": image_id, "file_name": f"{stem}.jpg", "width": width, "height": height})
        for k, obj in enumerate(objects, start=1):
            mask = instance == k
            if not mask.any():
                raise DataError(f"{xml_path}: object {k} ({obj['name']}) has no pixels in its SegmentationObject mask")
            name = names.get(obj["name"], obj["name"])
            cat = categories.setdefault(name, {"id": len(categories) + 1, "name": name, "voc_name": obj["name"]})
            rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
            bbox = obj["bbox"] if box_from == "xml" else [float(v) for v in mask_utils.toBbox(rle)]
            rle["counts"] = rle["counts"].decode("ascii")
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": cat["id"], "bbox": bbox,
                "segmentation": rle, "area": float(mask.sum()), "iscrowd": int(obj["difficult"]),
                "source": f"voc:{stem}#{k}",
            })
    return {"images": images, "annotations": annotations, "categories": sorted(categories.values(), key=lambda c: c["id"])}


def read_objects(path: Path) -> tuple[list[dict[str, Any]], tuple[int, int]]:
    """(objects in XML order: name, bbox [x, y, w, h] in 0-based pixels, difficult; (width, height))."""
    try:
        tree = ET.parse(path).getroot()
        size = tree.find("size")
        width, height = int(size.findtext("width")), int(size.findtext("height"))  # type: ignore[union-attr,arg-type]
        objects = []
        for obj in tree.findall("object"):
            b = obj.find("bndbox")
            x1, y1, x2, y2 = (float(b.findtext(t)) for t in ("xmin", "ymin", "xmax", "ymax"))  # type: ignore[union-attr,arg-type]
            # VOC pixels are 1-based and inclusive: xmin=1, xmax=W spans the whole width W
            objects.append({"name": str(obj.findtext("name")).strip(), "bbox": [x1 - 1, y1 - 1, x2 - x1 + 1, y2 - y1 + 1],
                            "difficult": int(obj.findtext("difficult") or 0)})
    except FileNotFoundError:
        raise DataError(f"{path} is missing: every image of the split list needs its Annotations/ XML") from None
    except (ET.ParseError, AttributeError, TypeError, ValueError) as err:
        raise DataError(f"{path} is not a VOC annotation (size, object name and bndbox expected): {err}") from None
    return objects, (width, height)


def read_instances(path: Path, shape: tuple[int, int], n_objects: int) -> np.ndarray:
    """Instance ids [height, width] of a SegmentationObject PNG (palette indices, not colours)."""
    if not path.is_file():
        raise DataError(f"{path} is missing: the split's images need SegmentationObject masks "
                        f"(use a list of ImageSets/Segmentation/)")
    with Image.open(path) as im:
        if im.mode not in ("P", "L"):
            raise DataError(f"{path}: mode {im.mode}, expected VOC's palette PNG of instance indices")
        ids = np.asarray(im)
    if ids.shape != shape:
        raise DataError(f"{path}: mask is {ids.shape[1]}x{ids.shape[0]}, its XML says {shape[1]}x{shape[0]}")
    found = set(np.unique(ids).tolist()) - {0, 255}
    if found - set(range(1, n_objects + 1)):
        raise DataError(f"{path}: instance ids {sorted(found)} but its XML lists {n_objects} objects")
    return ids


def _write_atomic(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)
