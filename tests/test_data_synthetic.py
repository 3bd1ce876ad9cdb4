"""Synthetic scenes: annotations match pixels, object removal is exact, splits are disjoint,
generation is idempotent and follows the config."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from vlmloc.data import DataError, load_samples
from vlmloc.data.sample import segmentation_to_mask
from vlmloc.data.synthetic import (
    OBJECT_INDEX_KEY,
    SCENE_KEY,
    SyntheticParams,
    ensure_synthetic,
    render_scene,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "data"
SMALL = {"n_images": 10, "width": [160, 260], "height": [120, 200], "seed": 3}


@pytest.fixture(scope="module")
def heldout(tmp_path_factory) -> tuple[Path, dict]:
    path = ensure_synthetic(tmp_path_factory.mktemp("syn"), "heldout", SMALL)
    return path, json.loads(path.read_text())


def _objects(data: dict):
    """(image entry, annotation, category name) for every annotation."""
    images = {im["id"]: im for im in data["images"]}
    cats = {c["id"]: c["name"] for c in data["categories"]}
    for ann in data["annotations"]:
        yield images[ann["image_id"]], ann, cats[ann["category_id"]]


def test_saved_images_are_render_scene_of_their_spec(heldout):
    path, data = heldout
    for im in data["images"]:
        saved = np.array(Image.open(path.parent / "images" / im["file_name"]).convert("RGB"))
        assert saved.shape == (im["height"], im["width"], 3)
        np.testing.assert_array_equal(saved, np.array(render_scene(im[SCENE_KEY])))


def test_annotation_masks_match_object_pixels(heldout):
    """IoU(pycocotools mask, pixels the object changes) > 0.95; bbox = polygon extents; area = mask."""
    _, data = heldout
    for im, ann, cat in _objects(data):
        spec, k = im[SCENE_KEY], ann[OBJECT_INDEX_KEY]
        assert spec["objects"][k]["category"] == cat
        mask = segmentation_to_mask(ann["segmentation"], im["height"], im["width"])
        drawn = (np.array(render_scene(spec)) != np.array(render_scene(spec, [k]))).any(-1)
        iou = (mask & drawn).sum() / (mask | drawn).sum()
        assert iou > 0.95, (im["id"], cat, iou)
        assert mask.sum() == ann["area"] > 0
        xs, ys = ann["segmentation"][0][0::2], ann["segmentation"][0][1::2]
        np.testing.assert_allclose(ann["bbox"], [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)], atol=0.011)
        assert 0 <= min(xs) and max(xs) <= im["width"] and 0 <= min(ys) and max(ys) <= im["height"]


def test_skip_objects_removes_exactly_that_object(heldout):
    _, data = heldout
    im = max(data["images"], key=lambda im: len(im[SCENE_KEY]["objects"]))
    spec = im[SCENE_KEY]
    assert len(spec["objects"]) >= 2
    full = np.array(render_scene(spec))
    masks = [segmentation_to_mask([o["polygon"]], spec["height"], spec["width"]) for o in spec["objects"]]
    for k, mask in enumerate(masks):
        without = np.array(render_scene(spec, skip_objects=[k]))
        np.testing.assert_array_equal(without[~mask], full[~mask])  # outside: identical
        assert (without[mask] != full[mask]).any(-1).mean() > 0.99  # inside: the object is gone
        assert (full[mask] == spec["objects"][k]["color"]).all()  # the object is exactly its colour
    assert all(not (a & b).any() for i, a in enumerate(masks) for b in masks[i + 1 :])  # no overlap
    with pytest.raises(ValueError, match="out of range"):
        render_scene(spec, [len(masks)])


def test_config_is_followed(heldout):
    path, data = heldout
    sizes = [(im["width"], im["height"]) for im in data["images"]]
    assert len(sizes) == 10
    assert all(160 <= w <= 260 and 120 <= h <= 200 for w, h in sizes)
    assert any(w != h for w, h in sizes)
    assert [c["name"] for c in data["categories"]] == list(SyntheticParams().categories)
    for im in data["images"]:
        cats = [o["category"] for o in im[SCENE_KEY]["objects"]]
        assert 1 <= len(cats) <= 4 and len(set(cats)) == len(cats)  # one per category
    assert data["info"]["vlmloc_params_hash"] == SyntheticParams.from_mapping(SMALL).hash("heldout")


def test_custom_categories(tmp_path):
    params = {**SMALL, "n_images": 4, "categories": ["star", "heart", "arrow"], "max_objects": 3}
    data = json.loads(ensure_synthetic(tmp_path, "train", params).read_text())
    assert [c["name"] for c in data["categories"]] == ["star", "heart", "arrow"]
    assert {o["category"] for im in data["images"] for o in im[SCENE_KEY]["objects"]} <= {"star", "heart", "arrow"}
    with pytest.raises(DataError, match="'blob'.*choose from"):
        ensure_synthetic(tmp_path, "train", {**params, "categories": ["star", "blob"]})
    with pytest.raises(DataError, match="unknown data.synthetic keys \\['n_image'\\]"):
        ensure_synthetic(tmp_path, "train", {"n_image": 3})


def test_splits_are_disjoint(heldout, tmp_path):
    _, held = heldout
    train = json.loads(ensure_synthetic(tmp_path, "train", SMALL).read_text())
    specs = lambda d: {json.dumps(im[SCENE_KEY], sort_keys=True) for im in d["images"]}
    assert not specs(train) & specs(held)
    seeds = lambda d: {im[SCENE_KEY]["background"]["seed"] for im in d["images"]}
    assert not seeds(train) & seeds(held)


def test_idempotent_and_regenerates_on_param_change(tmp_path):
    params = {**SMALL, "n_images": 3}
    path = ensure_synthetic(tmp_path, "heldout", params)
    first_png = path.parent / "images" / "heldout_000001.png"
    stamps = (path.stat().st_mtime_ns, first_png.stat().st_mtime_ns)
    assert ensure_synthetic(tmp_path, "heldout", params) == path
    assert (path.stat().st_mtime_ns, first_png.stat().st_mtime_ns) == stamps  # nothing rewritten
    again = ensure_synthetic(tmp_path, "heldout", {**params, "n_images": 2})
    assert len(json.loads(again.read_text())["images"]) == 2
    assert sorted(p.name for p in (tmp_path / "heldout" / "images").iterdir()) == [
        "heldout_000001.png", "heldout_000002.png"]
    assert [p.name for p in tmp_path.iterdir()] == ["heldout"]  # no temp folders left behind


def test_jobs_starting_together_generate_the_dataset_once(tmp_path, monkeypatch):
    import threading

    from vlmloc.data import synthetic

    calls, real = [], synthetic.generate_split

    def slow(*args, **kwargs):
        calls.append(1)
        threading.Event().wait(0.5)  # the sibling arrives while this one renders
        return real(*args, **kwargs)

    monkeypatch.setattr(synthetic, "generate_split", slow)
    params = {**SMALL, "n_images": 2}
    out: list[Path] = []
    threads = [threading.Thread(target=lambda: out.append(ensure_synthetic(tmp_path, "heldout", params)))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and out == [out[0], out[0]]
    assert len(json.loads(out[0].read_text())["images"]) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["heldout"]  # no lock or temp folder left behind


def test_refuses_to_overwrite_foreign_folder(tmp_path):
    (tmp_path / "heldout").mkdir()
    (tmp_path / "heldout" / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="not a vlmloc synthetic dataset"):
        ensure_synthetic(tmp_path, "heldout", SMALL)


def test_synthetic_yaml_through_load_samples(tmp_path):
    """configs/data/synthetic.yaml resolves, generates, and the filters keep the scene objects."""
    cfg = OmegaConf.create({"paths": {"data_dir": str(tmp_path)}, "data": OmegaConf.load(CONFIGS / "synthetic.yaml")})
    cfg.data.synthetic.n_images = 6
    cfg.data.n = None
    samples, report = load_samples(cfg.data)
    n_objects = len(json.loads((tmp_path / "synthetic" / "heldout" / "instances.json").read_text())["annotations"])
    assert report[0] == {"filter": "input", "kept": n_objects, "dropped": 0}
    singles = {r["filter"]: r for r in report}
    assert singles["single_instance"]["dropped"] == 0 and singles["no_crowd"]["dropped"] == 0
    assert len(samples) == report[-1]["kept"] >= n_objects - 2
    s = samples[0]
    assert s.image_path.is_file() and s.category in cfg.data.synthetic.categories
    spec = s.meta[SCENE_KEY]
    assert spec["objects"][s.meta[OBJECT_INDEX_KEY]]["category"] == s.category
    cfg.data.n = 3
    assert len(load_samples(cfg.data)[0]) == 3
