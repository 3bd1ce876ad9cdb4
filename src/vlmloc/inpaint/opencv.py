"""OpenCV inpainting (cv2.inpaint): no weights, CPU, a few ms per image. Fills the hole by
propagating the surrounding colours inward; fine for smooth backgrounds, blurry on texture."""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np
from PIL import Image

from vlmloc.inpaint import InpaintError, Inpainter

METHODS = {"telea": cv2.INPAINT_TELEA, "ns": cv2.INPAINT_NS}


class OpenCVInpainter(Inpainter):
    """cv2.inpaint with Telea's fast marching method (default) or Navier-Stokes."""

    backend = "opencv"

    def __init__(self, method: str = "telea", radius: float = 5, **common: Any) -> None:
        super().__init__(**common)
        method = str(method).lower()
        if method not in METHODS:
            raise InpaintError(f"inpaint.method must be one of {sorted(METHODS)}, got {method!r}")
        if float(radius) <= 0:
            raise InpaintError(f"inpaint.radius must be > 0 pixels, got {radius}")
        self.method = method
        self.radius = float(radius)

    def _fill(self, images: list[Image.Image], holes: list[np.ndarray], samples: list[Any]) -> list[Image.Image]:
        out = []
        for im, hole in zip(images, holes):
            # cv2 treats the 3 channels independently, so RGB order needs no BGR swap.
            arr = cv2.inpaint(np.asarray(im), hole.astype(np.uint8), self.radius, METHODS[self.method])
            out.append(Image.fromarray(arr))
        return out

    def info(self) -> dict[str, Any]:
        return {**super().info(), "method": self.method, "radius": self.radius}
