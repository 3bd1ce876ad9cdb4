"""COCO loader: filters drop exactly the hand-picked annotations, subsets are deterministic,
bad inputs fail early with a DataError that says what to do."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from vlmloc.data import DataError, Sample, load_samples
from vlmloc.data.coco import Filters, load_coco, select_subset

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "data"
CATS = [{"id": 1, "name": "dog"}, {"id": 2, "name": "cat"}, {"id": 3, "name": "bird"}]


def _rect(x: float, y: float, w: float, h: float) -> list[list[float]]:
    return [[x, y, x + w, y, x + w, y + h, x, y + h]]


def _ann(ann_id: int, image_id: int, cat: int, bbox: list[float], area: float, crowd: int = 0) -> dict:
    return {"id": ann_id, "image_id": image_id, "category_id": cat, "bbox": bbox, "area": area,
            "iscrowd": crowd, "segmentation": _rect(*bbox)}


def tiny_coco() -> dict:
    """5 images of 10,000 px each; comments say which filter drops each annotation."""
    images = [{"id": i, "file_name": f"{i:03d}.jpg", "width": 100, "height": 100} for i in (1, 2, 4, 5)]
    images.append({"id": 3, "file_name": "003.jpg", "width": 200, "height": 50})
    anns = [
        _ann(11, 1, 1, [10, 10, 50, 50], 2500),  # kept by everything: 25% area, fill 1.0
        _ann(12, 1, 2, [70, 70, 10, 5], 50),  # min_area_frac: 0.5% < 1%
        _ann(21, 2, 1, [0, 0, 20, 20], 400),  # single_instance: two dogs in image 2
        _ann(22, 2, 1, [50, 50, 20, 20], 400),  # single_instance
        _ann(23, 2, 2, [0, 0, 100, 60], 6000),  # max_area_frac: 60% > 50%
        _ann(31, 3, 1, [0, 0, 50, 40], 2000, crowd=1),  # no_crowd
        _ann(32, 3, 2, [100, 0, 100, 50], 500),  # min_box_fill: 500 / 5000 = 0.1 < 0.2
        _ann(41, 4, 1, [0, 0, 30, 30], 900),  # single_instance: the crowd 42 counts too
        _ann(42, 4, 1, [40, 40, 30, 30], 900, crowd=1),  # no_crowd
        _ann(51, 5, 3, [0, 0, 40, 40], 1600),  # categories: bird not in [dog, cat]
    ]
    return {"images": images, "annotations": anns, "categories": CATS}


def write_coco(tmp_path: Path, data: dict, touch_images: bool = True) -> tuple[Path, Path]:
    ann = tmp_path / "instances.json"
    ann.write_text(json.dumps(data))
    img_dir = tmp_path / "images"
    img_dir.mkdir(exist_ok=True)
    if touch_images:  # sizes come from the JSON, so empty files are enough
        for im in data["images"]:
            (img_dir / im["file_name"]).touch()
    return ann, img_dir


FILTERS = {"min_area_frac": 0.01, "max_area_frac": 0.5, "single_instance": True, "no_crowd": True,
           "min_box_fill": 0.2, "categories": ["dog", "cat"]}


def test_each_filter_drops_exactly_the_expected_annotations(tmp_path, caplog):
    ann, img = write_coco(tmp_path, tiny_coco())
    with caplog.at_level(logging.INFO, logger="vlmloc.data"):
        samples, report = load_coco(ann, img, FILTERS)
    assert report == [
        {"filter": "input", "kept": 10, "dropped": 0},
        {"filter": "well_formed", "kept": 10, "dropped": 0},
        {"filter": "categories", "kept": 9, "dropped": 1},  # 51
        {"filter": "no_crowd", "kept": 7, "dropped": 2},  # 31, 42
        {"filter": "single_instance", "kept": 4, "dropped": 3},  # 21, 22, 41
        {"filter": "min_area_frac", "kept": 3, "dropped": 1},  # 12
        {"filter": "max_area_frac", "kept": 2, "dropped": 1},  # 23
        {"filter": "min_box_fill", "kept": 1, "dropped": 1},  # 32
        {"filter": "subset", "kept": 1, "dropped": 0},
    ]
    assert [s.sample_id for s in samples] == ["1-11"]
    assert "min_box_fill" in caplog.text and "dropped" in caplog.text


def test_malformed_annotations_are_counted_by_reason_and_dropped(tmp_path, caplog):
    data = tiny_coco()
    good = data["annotations"][0]  # 1-11, kept by every filter
    bad = [
        {**good, "id": 61, "bbox": [10, 10, 50]},                        # bbox with 3 numbers
        {**good, "id": 62, "bbox": "10 10 50 50"},                       # bbox as a string
        {**good, "id": 63, "area": "2500"},                              # area as a string
        {**good, "id": 64, "area": -5.0},                                # negative area
        {**good, "id": 65, "bbox": [10, 10, -50, 50]},                   # negative width
        {**good, "id": 66, "segmentation": [[10, 10, 60, 10]]},          # a polygon of 2 points
        {**good, "id": 67, "segmentation": [[10, 10]]},                  # 1 point
        {**good, "id": 68, "segmentation": [[]]},                        # 0 points
        {**good, "id": 69, "segmentation": {"counts": "x", "size": [5, 5]}},  # RLE of another size
    ]
    for i, a in enumerate(bad):  # each in an image of its own, so single_instance keeps it
        data["images"].append({"id": 100 + i, "file_name": f"{100 + i}.jpg", "width": 100, "height": 100})
        a["image_id"] = 100 + i
    data["annotations"] += bad
    ann, img = write_coco(tmp_path, data)
    with caplog.at_level(logging.WARNING, logger="vlmloc.data"):
        samples, report = load_coco(ann, img, FILTERS)
    step = report[1]
    assert step["filter"] == "well_formed" and step["kept"] == 10 and step["dropped"] == 9
    assert step["reasons"] == {
        "bbox is not 4 numbers [x, y, w, h]": 2,
        "area is not a positive number": 2,
        "bbox width or height <= 0": 1,
        "a polygon has fewer than 3 points (or odd / non-numeric coordinates)": 3,
        "RLE segmentation lacks counts or its size is not the image's [height, width]": 1,
    }
    assert [s.sample_id for s in samples] == ["1-11"]
    assert "3 annotation(s) of instances.json dropped: a polygon has fewer than 3 points" in caplog.text


def test_disabled_filters_keep_everything_and_sample_fields(tmp_path):
    ann, img = write_coco(tmp_path, tiny_coco())
    off = {"min_area_frac": 0.0, "max_area_frac": 1.0, "single_instance": False, "no_crowd": False,
           "min_box_fill": 0.0, "categories": None}
    samples, report = load_coco(ann, img, off)
    assert len(samples) == 10 and all(r["dropped"] == 0 for r in report)
    assert [s.sample_id for s in samples] == [
        "1-11", "1-12", "2-21", "2-22", "2-23", "3-31", "3-32", "4-41", "4-42", "5-51"]
    s = next(s for s in samples if s.ann_id == 32)
    assert isinstance(s, Sample)
    assert (s.image_id, s.width, s.height, s.category, s.category_id) == (3, 200, 50, "cat", 2)
    assert s.box_xywh == (100.0, 0.0, 100.0, 50.0) and s.area == 500.0
    assert s.image_path == img / "003.jpg"
    assert s.mask().shape == (50, 200) and s.mask().sum() == 5000  # the rectangle polygon


def test_area_computed_from_segmentation_when_missing(tmp_path):
    data = tiny_coco()
    for a in data["annotations"]:
        del a["area"]
    ann, img = write_coco(tmp_path, data)
    off = {"min_area_frac": 0.0, "max_area_frac": 1.0, "single_instance": False, "no_crowd": False,
           "min_box_fill": 0.0}
    samples, _ = load_coco(ann, img, off)
    by_id = {s.ann_id: s for s in samples}
    assert by_id[11].area == 2500.0 and by_id[12].area == 50.0  # rectangle masks


def test_subset_is_deterministic_sorted_and_sized(tmp_path):
    images = [{"id": i, "file_name": f"{i}.jpg", "width": 64, "height": 48} for i in range(1, 31)]
    anns = [_ann(100 + i, i, 1, [0, 0, 20, 20], 400) for i in range(1, 31)]
    ann, img = write_coco(tmp_path, {"images": images, "annotations": anns, "categories": CATS})
    ids = lambda seed, n: [(s.image_id, s.ann_id) for s in load_coco(ann, img, {}, n=n, seed=seed)[0]]
    a, b, c = ids(0, 10), ids(0, 10), ids(1, 10)
    assert a == b and a != c
    assert len(a) == 10 and a == sorted(a) and len(set(a)) == 10
    assert len(ids(0, None)) == 30 and len(ids(0, 100)) == 30
    _, report = load_coco(ann, img, {}, n=10)
    assert report[-1] == {"filter": "subset", "kept": 10, "dropped": 20}
    # the draw depends only on the sorted ids, not on their order in the input
    assert select_subset(list(reversed(a)), 4, 3) == select_subset(a, 4, 3)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.pop("categories"), "missing list(s) ['categories']"),
        (lambda d: d["annotations"].append(_ann(99, 777, 1, [0, 0, 5, 5], 25)), "image_id 777"),
        (lambda d: d["annotations"].append(_ann(98, 1, 9, [0, 0, 5, 5], 25)), "unknown category_id 9"),
        (lambda d: d["images"][0].pop("width"), "lacks id / file_name / width / height"),
    ],
)
def test_malformed_json_structure(tmp_path, mutate, message):
    data = tiny_coco()
    mutate(data)
    ann, img = write_coco(tmp_path, data)
    with pytest.raises(DataError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        load_coco(ann, img)


def test_missing_paths_and_bad_json(tmp_path):
    ann, img = write_coco(tmp_path, tiny_coco())
    with pytest.raises(DataError, match="instances JSON not found.*data.annotations"):
        load_coco(tmp_path / "nope.json", img)
    with pytest.raises(DataError, match="image folder not found.*data.images"):
        load_coco(ann, tmp_path / "no_images")
    ann.write_text('{"images": [')  # truncated download
    with pytest.raises(DataError, match="not valid JSON"):
        load_coco(ann, img)


def test_missing_image_file_of_selected_samples(tmp_path):
    ann, img = write_coco(tmp_path, tiny_coco())
    (img / "005.jpg").unlink()  # only annotation 51 (bird) lives there
    load_coco(ann, img, FILTERS)  # bird is filtered out: its image is never needed
    with pytest.raises(DataError, match=r"1 image file\(s\).*005\.jpg.*data\.images"):
        load_coco(ann, img, {**FILTERS, "categories": None})


def test_bad_filter_config(tmp_path):
    ann, img = write_coco(tmp_path, tiny_coco())
    with pytest.raises(DataError, match="unknown data.filters keys \\['min_area'\\]"):
        load_coco(ann, img, {"min_area": 0.1})
    with pytest.raises(DataError, match="\\['zebra'\\] not in instances.json; available: \\['bird', 'cat', 'dog'\\]"):
        load_coco(ann, img, {"categories": ["zebra"]})
    with pytest.raises(DataError, match="data.n"):
        load_coco(ann, img, n=-1)
    assert Filters.from_mapping({"categories": "dog"}).categories == ("dog",)


def test_coco_yaml_through_load_samples(tmp_path):
    """configs/data/coco.yaml: root is required; with a root, paths resolve under it."""
    cfg = OmegaConf.create({"data": OmegaConf.load(CONFIGS / "coco.yaml")})
    for node in (cfg.data, OmegaConf.load(CONFIGS / "coco.yaml")):
        with pytest.raises(DataError, match=r"^data\.root is required .*pass data\.root="):
            load_samples(node)
    (tmp_path / "annotations").mkdir()
    data = tiny_coco()
    (tmp_path / "annotations" / "instances_valrem.json").write_text(json.dumps(data))
    (tmp_path / "val2017").mkdir()
    for im in data["images"]:
        (tmp_path / "val2017" / im["file_name"]).touch()
    cfg.data.root = str(tmp_path)
    samples, report = load_samples(cfg.data)
    assert [s.sample_id for s in samples] == ["1-11", "5-51"]  # FILTERS without the category filter
    assert report[-1]["filter"] == "subset"
    with pytest.raises(DataError, match="data.kind must be one of"):
        load_samples({"kind": "imagenet"})


def test_lvis_style_files_name_images_by_url_and_carry_category_synonyms(tmp_path):
    """LVIS v1 val: COCO's images named only by coco_url, categories with synonyms (underscored)."""
    data = tiny_coco()
    for im in data["images"]:
        im["coco_url"] = f"http://images.cocodataset.org/val2017/{im.pop('file_name')}"
    data["categories"] = [{**c, "synonyms": [c["name"], f"{c['name']}_dog_like"]} if c["id"] == 1 else c for c in CATS]
    ann = tmp_path / "lvis_v1_val.json"
    ann.write_text(json.dumps(data))
    (tmp_path / "val2017").mkdir()
    for i in (1, 2, 3, 4, 5):
        (tmp_path / "val2017" / f"{i:03d}.jpg").touch()
    samples, _ = load_coco(ann, tmp_path / "val2017", {"min_area_frac": 0.0, "max_area_frac": 1.0,
                                                      "single_instance": False, "no_crowd": False, "min_box_fill": 0.0})
    dog = next(s for s in samples if s.ann_id == 11)
    assert dog.image_path == tmp_path / "val2017" / "001.jpg"
    assert dog.meta["synonyms"] == ["dog", "dog dog like"]
    assert "synonyms" not in next(s for s in samples if s.ann_id == 12).meta  # cat: none listed
