"""Data stage: COCO / COCO-ReM, PASCAL VOC, synthetic shape scenes and a photo fixture -> `Sample` records.

    samples, report = load_samples(cfg.data)

`cfg.data.kind` picks the source; synthetic and fixture data are first written to disk as COCO
datasets under `cfg.data.root`, then every kind goes through the same COCO loader and
filters (`vlmloc.data.coco.load_coco`); VOC is converted to a COCO file first (`vlmloc.data.voc`). `report` lists each filter's kept/dropped counts.
`pairs` loads the object-removal pairs a make_pairs run wrote (`vlmloc.data.pairs`): the
original samples, with the inpainted image in `meta["inpainted_path"]`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from vlmloc.data.coco import DataError, Filters, load_coco
from vlmloc.data.sample import Sample

__all__ = ["DataError", "Filters", "Sample", "load_samples", "plain_config"]

KINDS = ("coco", "voc", "synthetic", "fixture", "pairs")


def load_samples(data_cfg: Any) -> tuple[list[Sample], list[dict[str, Any]]]:
    """`data` config (DictConfig or mapping) -> (samples sorted by (image_id, ann_id), filter report)."""
    cfg = plain_config(data_cfg)
    kind = cfg.get("kind")
    if kind == "coco":
        annotations, images = Path(_required(cfg, "annotations")), Path(_required(cfg, "images"))
    elif kind == "voc":
        from vlmloc.data.voc import ensure_voc

        root = Path(_required(cfg, "root"))
        annotations = ensure_voc(root, _required(cfg, "split"), _required(cfg, "cache_dir"), cfg.get("names"),
                                 cfg.get("box_from", "xml"))
        images = root / "JPEGImages"
    elif kind == "synthetic":
        from vlmloc.data.synthetic import ensure_synthetic

        annotations = ensure_synthetic(_required(cfg, "root"), cfg.get("split", "heldout"), cfg.get("synthetic"))
        images = annotations.parent / "images"
    elif kind == "fixture":
        from vlmloc.data.fixture import ensure_fixture

        annotations = ensure_fixture(_required(cfg, "root"))
        images = annotations.parent / "images"
    elif kind == "pairs":
        from vlmloc.data.pairs import load_pairs

        return load_pairs(_required(cfg, "pairs_dir"), n=cfg.get("n"), seed=cfg.get("seed", 0))
    else:
        raise DataError(
            f"data.kind must be one of {list(KINDS)}, got {kind!r} (pick a config: data=coco|voc|synthetic|fixture|pairs)"
        )
    return load_coco(annotations, images, filters=cfg.get("filters"), n=cfg.get("n"), seed=cfg.get("seed", 0))


def plain_config(data_cfg: Any, user: str = "load_samples") -> dict[str, Any]:
    """Resolve a `data` config to plain containers; missing values (???) become DataErrors."""
    from vlmloc.config_nodes import plain_node

    return plain_node(data_cfg, "data", DataError, user, default_hint=" (it is ??? in the config)")


def _required(cfg: Mapping[str, Any], key: str) -> Any:
    if cfg.get(key) in (None, "", "???"):
        raise DataError(f"data.{key} is required for data.kind={cfg.get('kind')}: pass data.{key}=...")
    return cfg[key]
