"""PASCAL VOC 2012 through the COCO loader: a hand-written VOC folder, masks and boxes checked by hand."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import compose_cfg
from vlmloc.data import DataError, load_samples

XML = """<annotation><filename>{stem}.jpg</filename><size><width>{w}</width><height>{h}</height><depth>3</depth></size>
{objects}</annotation>"""
OBJ = """<object><name>{name}</name><difficult>{difficult}</difficult>
<bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>"""


def write_image(root: Path, stem: str, size: tuple[int, int], objects: list[dict], instance: np.ndarray) -> None:
    w, h = size
    Image.new("RGB", size, (90, 120, 150)).save(root / "JPEGImages" / f"{stem}.jpg")
    body = "".join(OBJ.format(**o) for o in objects)
    (root / "Annotations" / f"{stem}.xml").write_text(XML.format(stem=stem, w=w, h=h, objects=body))
    png = Image.fromarray(instance.astype(np.uint8))  # "L"; the palette makes it "P", as VOC ships it
    png.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0, 128, 128, 0] + [0] * (3 * 251) + [224, 224, 192])
    png.save(root / "SegmentationObject" / f"{stem}.png")


@pytest.fixture
def voc(tmp_path) -> Path:
    """Two images: a 60x40 with a dog (instance 1, its border void) and a difficult chair
    (instance 2); a 50x50 with a dining table."""
    root = tmp_path / "VOC2012"
    for d in ("Annotations", "SegmentationObject", "JPEGImages", "ImageSets/Segmentation"):
        (root / d).mkdir(parents=True)
    inst = np.zeros((40, 60), dtype=np.uint8)
    inst[10:30, 5:25] = 255  # void border around the dog
    inst[11:29, 6:24] = 1  # dog: rows 11-28, cols 6-23 -> 18 x 18 px
    inst[2:8, 40:58] = 2  # chair
    write_image(root, "2007_000001", (60, 40), [
        {"name": "dog", "difficult": 0, "x1": 6, "y1": 11, "x2": 25, "y2": 30},  # VOC box: 1-based, inclusive
        {"name": "chair", "difficult": 1, "x1": 41, "y1": 3, "x2": 58, "y2": 8},
    ], inst)
    inst2 = np.zeros((50, 50), dtype=np.uint8)
    inst2[20:45, 10:40] = 1
    write_image(root, "2007_000002", (50, 50), [{"name": "diningtable", "difficult": 0, "x1": 11, "y1": 21, "x2": 40, "y2": 45}], inst2)
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("2007_000001\n2007_000002\n")
    return root


def voc_cfg(tmp_path: Path, root: Path, *extra: str):
    return compose_cfg("data=voc", f"data.root={root}", "data.filters.min_area_frac=0", "data.filters.max_area_frac=1",
                       "data.filters.min_box_fill=0", f"paths.cache_dir={tmp_path / 'cache'}", *extra).data


def test_voc_objects_become_samples_with_their_masks_and_boxes(tmp_path, voc):
    samples, report = load_samples(voc_cfg(tmp_path, voc))
    # the difficult chair is dropped (no_crowd) but the dog and the table stay
    assert [(s.image_id, s.category) for s in samples] == [(1, "dog"), (2, "dining table")]
    dog, table = samples
    expected = np.zeros((40, 60), dtype=bool)
    expected[11:29, 6:24] = True  # the void border is not the dog's
    np.testing.assert_array_equal(dog.mask(), expected)
    assert dog.area == 18 * 18
    assert dog.box_xyxy == (5.0, 10.0, 25.0, 30.0)  # xmin=6 (1-based) is pixel 5; xmax=25 inclusive ends at 25
    assert (dog.width, dog.height) == (60, 40) and dog.image_path == voc / "JPEGImages" / "2007_000001.jpg"
    assert dog.load_image().size == (60, 40)
    assert table.box_xyxy == (10.0, 20.0, 40.0, 45.0)
    assert {r["filter"]: r["dropped"] for r in report}["no_crowd"] == 1


def test_voc_boxes_from_masks_and_counted_difficult_objects(tmp_path, voc):
    cfg = voc_cfg(tmp_path, voc, "data.box_from=mask", "data.filters.no_crowd=false")
    samples, _ = load_samples(cfg)
    by_cat = {s.category: s for s in samples}
    assert by_cat["dog"].box_xyxy == (6.0, 11.0, 24.0, 29.0)  # the mask's tight box
    assert by_cat["chair"].box_xyxy == (40.0, 2.0, 58.0, 8.0)
    assert by_cat["chair"].meta["iscrowd"] == 1
    # a second chair in the image (even a difficult one) would make "the chair" ambiguous
    assert len(samples) == 3


def test_voc_single_instance_counts_difficult_objects(tmp_path, voc):
    xml = voc / "Annotations" / "2007_000001.xml"
    xml.write_text(xml.read_text().replace("<name>chair</name>", "<name>dog</name>"))
    samples, report = load_samples(voc_cfg(tmp_path, voc))
    assert [s.category for s in samples] == ["dining table"]
    dropped = {r["filter"]: r["dropped"] for r in report}
    assert dropped["no_crowd"] == 1 and dropped["single_instance"] == 1  # the plain dog: a difficult dog beside it


def test_bad_voc_folders_are_clear_errors(tmp_path, voc):
    with pytest.raises(DataError, match="VOC 2012 folder"):
        load_samples(voc_cfg(tmp_path, tmp_path / "nowhere"))
    (voc / "Annotations" / "2007_000002.xml").write_text("<annotation><size>")
    with pytest.raises(DataError, match="2007_000002.xml is not a VOC annotation"):
        load_samples(voc_cfg(tmp_path, voc))
    (voc / "Annotations" / "2007_000002.xml").unlink()
    with pytest.raises(DataError, match="2007_000002.xml is missing"):
        load_samples(voc_cfg(tmp_path, voc))


def test_voc_mask_that_disagrees_with_its_xml_is_refused(tmp_path, voc):
    inst = np.zeros((50, 50), dtype=np.uint8)
    inst[0:5, 0:5] = 3  # instance 3, but the XML lists one object
    Image.fromarray(inst).save(voc / "SegmentationObject" / "2007_000002.png")
    with pytest.raises(DataError, match=r"instance ids \[3\] but its XML lists 1 objects"):
        load_samples(voc_cfg(tmp_path, voc))
