"""The record every data source produces: one queried object in one image."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils


@dataclass(frozen=True)
class Sample:
    """One object of one image, as the experiments query it.

    `box_xywh` is the COCO box in original-image pixels; `segmentation` is the COCO
    segmentation (polygon list, or RLE dict with counts as str or list).
    """

    sample_id: str
    image_id: int
    ann_id: int
    image_path: Path
    width: int
    height: int
    category: str
    category_id: int
    box_xywh: tuple[float, float, float, float]
    segmentation: Any = field(repr=False)
    area: float = 0.0
    # Free-form extras a data source wants to carry (e.g. synonyms, pair paths).
    meta: dict[str, Any] = field(default_factory=dict, repr=False, compare=False, hash=False)

    @property
    def box_xyxy(self) -> tuple[float, float, float, float]:
        x, y, w, h = self.box_xywh
        return (x, y, x + w, y + h)

    def load_image(self) -> Image.Image:
        """The image as RGB PIL."""
        with Image.open(self.image_path) as im:
            return im.convert("RGB")

    def mask(self) -> np.ndarray:
        """Object mask, bool [height, width]."""
        return segmentation_to_mask(self.segmentation, self.height, self.width)


def segmentation_to_mask(segmentation: Any, height: int, width: int) -> np.ndarray:
    """COCO polygon list or RLE (compressed or uncompressed) -> bool [height, width]."""
    if isinstance(segmentation, list):
        rles = mask_utils.frPyObjects(segmentation, height, width)
        rle = mask_utils.merge(rles)
    elif isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), list):
        rle = mask_utils.frPyObjects(segmentation, height, width)
    elif isinstance(segmentation, dict):
        rle = dict(segmentation)
        if isinstance(rle["counts"], str):
            rle["counts"] = rle["counts"].encode("ascii")
    else:
        raise ValueError(f"unsupported COCO segmentation of type {type(segmentation).__name__}")
    return mask_utils.decode(rle).astype(bool)
