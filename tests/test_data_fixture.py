"""Photo fixture: loads through load_samples like COCO, annotations are well formed."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from vlmloc.data import DataError, load_samples
from vlmloc.data import fixture as fixture_mod
from vlmloc.data.fixture import ensure_fixture

pytest.importorskip("skimage")
CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "data"
EXPECTED = {
    "astronaut.png": ["person"], "chelsea.png": ["cat"], "coffee.png": ["cup", "spoon"], "rocket.jpg": ["rocket"]
}


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("data")
    cfg = OmegaConf.create({"paths": {"data_dir": str(data_dir)}, "data": OmegaConf.load(CONFIGS / "fixture.yaml")})
    samples, report = load_samples(cfg.data)
    return data_dir / "fixture", samples, report


def test_loads_every_object(loaded):
    _, samples, report = loaded
    got: dict[str, list[str]] = {}
    for s in samples:
        got.setdefault(s.image_path.name, []).append(s.category)
    assert got == EXPECTED
    assert report[-1] == {"filter": "subset", "kept": 5, "dropped": 0}
    assert [s.sample_id for s in samples] == ["1-1", "2-2", "3-3", "3-4", "4-5"]


def test_sizes_masks_and_boxes(loaded):
    _, samples, _ = loaded
    sizes = set()
    for s in samples:
        with Image.open(s.image_path) as im:
            assert im.size == (s.width, s.height)  # the JSON's size is the file's size
        sizes.add((s.width, s.height))
        mask = s.mask()
        assert mask.shape == (s.height, s.width)
        assert 0.01 * s.width * s.height < mask.sum() == s.area
        poly = np.asarray(s.segmentation[0]).reshape(-1, 2)
        assert 8 <= len(poly) <= 20
        assert (poly >= 0).all() and (poly[:, 0] <= s.width).all() and (poly[:, 1] <= s.height).all()
        x0, y0 = poly.min(0)
        x1, y1 = poly.max(0)
        assert s.box_xywh == (x0, y0, x1 - x0, y1 - y0)
        ys, xs = np.nonzero(mask)  # the mask lies inside its box (pixel-centre rasterisation)
        assert xs.min() >= int(x0) and xs.max() < x1 and ys.min() >= int(y0) and ys.max() < y1
    assert (451, 300) in sizes and (600, 400) in sizes  # non-square photos


def test_ensure_fixture_is_idempotent(loaded):
    root, _, _ = loaded
    path = root / "instances.json"
    stamps = (path.stat().st_mtime_ns, (root / "images" / "chelsea.png").stat().st_mtime_ns)
    assert ensure_fixture(root) == path
    assert (path.stat().st_mtime_ns, (root / "images" / "chelsea.png").stat().st_mtime_ns) == stamps
    assert json.loads(path.read_text())["info"]["vlmloc_generator"] == "vlmloc.data.fixture"


def test_missing_scikit_image_says_how_to_install(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    fake = lambda name, *a: None if name == "skimage" else real(name, *a)  # noqa: E731
    monkeypatch.setattr(fixture_mod.importlib.util, "find_spec", fake)
    with pytest.raises(DataError, match="pip install scikit-image"):
        ensure_fixture(tmp_path)
