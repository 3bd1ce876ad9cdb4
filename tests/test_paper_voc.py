"""experiment=paper on a second image set (data=voc) and the report comparing the findings across
image sets. The VOC folder is written by hand in VOC 2012's layout (JPEG images, XML boxes,
SegmentationObject PNGs) from the synthetic scenes the demo model knows, so its answers mean
something; the loader reads it as it reads the real VOC."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from conftest import compose_cfg
from test_data_voc import OBJ, XML
from vlmloc import app
from vlmloc.data.synthetic import ensure_synthetic
from vlmloc.reports.sections import IMAGE_SETS


def write_voc_from_synthetic(root: Path, instances: Path) -> int:
    """The synthetic split's images and objects as a VOC 2012 folder; returns the object count."""
    coco = json.loads(instances.read_text())
    for d in ("Annotations", "SegmentationObject", "JPEGImages", "ImageSets/Segmentation"):
        (root / d).mkdir(parents=True, exist_ok=True)
    names = {c["id"]: c["name"] for c in coco["categories"]}
    stems, n = [], 0
    for im in coco["images"]:
        stem = f"2012_{im['id']:06d}"
        w, h = im["width"], im["height"]
        Image.open(instances.parent / "images" / im["file_name"]).convert("RGB").save(root / "JPEGImages" / f"{stem}.jpg", quality=95)
        anns = [a for a in coco["annotations"] if a["image_id"] == im["id"]]
        inst = np.zeros((h, w), dtype=np.uint8)
        objects = []
        for k, a in enumerate(anns, start=1):
            m = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(a["segmentation"], h, w))).astype(bool)
            inst[m] = k
            ys, xs = np.nonzero(m)
            objects.append({"name": names[a["category_id"]], "difficult": 0, "x1": xs.min() + 1, "y1": ys.min() + 1,
                            "x2": xs.max() + 1, "y2": ys.max() + 1})  # VOC: 1-based, inclusive
        (root / "Annotations" / f"{stem}.xml").write_text(XML.format(stem=stem, w=w, h=h, objects="".join(OBJ.format(**o) for o in objects)))
        png = Image.fromarray(inst)
        png.putpalette([0, 0, 0] + [128, 0, 0] * 254 + [224, 224, 192])
        png.save(root / "SegmentationObject" / f"{stem}.png")
        stems.append(stem)
        n += len(objects)
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(stems) + "\n")
    return n


@pytest.mark.slow
def test_paper_runs_on_voc_and_the_report_compares_the_image_sets(tmp_path):
    instances = ensure_synthetic(tmp_path / "synthetic", "heldout", compose_cfg("data=synthetic").data.synthetic)
    voc = tmp_path / "VOC2012"
    assert write_voc_from_synthetic(voc, instances) > 100
    common = ("experiment=paper_smoke", "model=demo_llava", f"paths.cache_dir={tmp_path / 'cache'}",
              "experiment.runs=[baseline,token_ablation,shuffle,make_pairs,cma]", "experiment.data.make_pairs.n=12")
    on_voc = compose_cfg(*common, "data=voc", f"data.root={voc}", "inpaint=opencv", data_dir=tmp_path / "data")
    app.run(on_voc, tmp_path / "paper-voc")
    for name in ("baseline", "token_ablation", "shuffle", "make_pairs", "cma"):
        assert (tmp_path / "paper-voc" / name / "run.json").is_file(), name
    rows = pd.read_parquet(tmp_path / "paper-voc" / "baseline" / "results.parquet")
    assert len(rows) == 8 and set(rows["category"]) <= set(compose_cfg("data=synthetic").data.synthetic.categories)
    app.run(compose_cfg(*common, "inpaint=oracle", data_dir=tmp_path / "data"), tmp_path / "paper-synthetic")
    cfg = compose_cfg("experiment=report", f"runs=[{tmp_path / 'paper-voc'},{tmp_path / 'paper-synthetic'}]",
                      "experiment.bootstrap.resamples=200")
    app.run(cfg, tmp_path / "report")
    tables = pd.read_parquet(tmp_path / "report" / "report_tables.parquet")
    sides = tables[tables.caption == IMAGE_SETS]
    assert {"voc", "synthetic"} <= set(sides.columns)
    assert {"pairs of voc", "pairs of synthetic"} <= set(tables[tables.section == "cma"]["data"])
    # the report's baseline accuracy on VOC is that run's own
    base = tables[(tables.section == "baseline") & (tables.data == "voc") & (tables.task == "classification")
                  & tables.accuracy.notna()]
    assert float(base["accuracy"].iloc[0]) == pytest.approx(100 * rows[rows.task == "classification"]["correct"].astype(float).mean())
