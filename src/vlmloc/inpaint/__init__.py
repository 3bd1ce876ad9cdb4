"""Object removal by inpainting: one interface, three backends chosen by `cfg.inpaint` (`inpaint=`).

    inpainter = build_inpainter(cfg.inpaint)          # fails here on a bad checkpoint, before any work
    out = inpainter.inpaint(images, masks, samples)   # list[PIL RGB], same sizes as `images`

Backends (configs/inpaint/*.yaml):
    opencv  cv2.inpaint (Telea or Navier-Stokes); no weights; the default of experiment=make_pairs
    lama    big-lama TorchScript checkpoint (the paper's inpainter), torch.jit.load, batched, GPU if present
    oracle  synthetic scenes only: re-render the scene without the object (the exact background)

Every backend gets the object mask dilated by `inpaint.dilate_px` pixels first (`dilate_mask`), so
no edge of the object (anti-aliasing, a mask a pixel too tight) survives, and every backend's
output equals the input outside that dilated hole (`composite`): only the hole changes.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any

import cv2
import numpy as np
from PIL import Image

from vlmloc.errors import VlmlocError

__all__ = ["BACKENDS", "InpaintError", "Inpainter", "build_inpainter", "composite", "dilate_mask"]

BACKENDS = ("opencv", "lama", "oracle")


class InpaintError(VlmlocError, ValueError):
    """Bad inpainting config, checkpoint or input; the message says what to do."""


def dilate_mask(mask: np.ndarray, margin_px: int) -> np.ndarray:
    """bool [H, W] -> bool [H, W] grown by `margin_px` pixels (a disc: Euclidean, not a square).

    The disc keeps the margin equal in every direction; a square kernel would grow diagonal
    edges by up to 1.41 x margin.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise InpaintError(f"a mask must be bool [H, W], got shape {mask.shape}")
    if margin_px < 0:
        raise InpaintError(f"inpaint.dilate_px must be >= 0, got {margin_px}")
    if margin_px == 0:
        return mask.copy()
    r = int(margin_px)
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    kernel = (yy**2 + xx**2 <= r * r).astype(np.uint8)  # exact disc; cv2's MORPH_ELLIPSE overshoots
    return cv2.dilate(mask.astype(np.uint8), kernel).astype(bool)


def composite(original: Image.Image, filled: Image.Image, hole: np.ndarray) -> Image.Image:
    """`filled` inside `hole` (bool [H, W]), `original` everywhere else; RGB, original's size."""
    a = np.asarray(original.convert("RGB"))
    b = np.asarray(filled.convert("RGB"))
    if b.shape != a.shape:
        raise InpaintError(f"inpainter returned an image of shape {b.shape}, expected {a.shape}")
    return Image.fromarray(np.where(hole[..., None], b, a))


class Inpainter(ABC):
    """Removes objects from images. Subclasses implement `_fill` on already dilated holes."""

    backend: str = ""

    def __init__(self, dilate_px: int = 8, batch_size: int = 1) -> None:
        if int(dilate_px) < 0:
            raise InpaintError(f"inpaint.dilate_px must be >= 0, got {dilate_px}")
        if int(batch_size) < 1:
            raise InpaintError(f"inpaint.batch_size must be >= 1, got {batch_size}")
        self.dilate_px = int(dilate_px)
        self.batch_size = int(batch_size)

    def inpaint(
        self, images: Sequence[Image.Image], masks: Sequence[np.ndarray], samples: Sequence[Any] | None = None
    ) -> list[Image.Image]:
        """Remove the masked object from each image.

        images: PIL images (converted to RGB); masks: bool [H, W] object masks (not yet dilated),
        one per image, same size; samples: the `Sample` of each image (the oracle needs its
        scene spec; other backends ignore it). Returns RGB images of the input sizes, equal to
        the input outside the dilated masks.
        """
        images = [im.convert("RGB") for im in images]
        if len(masks) != len(images) or (samples is not None and len(samples) != len(images)):
            raise InpaintError(f"got {len(images)} images, {len(masks)} masks, {len(samples or [])} samples")
        holes = []
        for im, m in zip(images, masks):
            m = np.asarray(m, dtype=bool)
            if m.shape != (im.height, im.width):
                raise InpaintError(f"mask of shape {m.shape} for an image of size {im.height}x{im.width}")
            holes.append(self.hole(m))
        filled = self._fill(images, holes, list(samples) if samples is not None else [None] * len(images))
        return [composite(im, f, h) for im, f, h in zip(images, filled, holes)]

    def hole(self, mask: np.ndarray) -> np.ndarray:
        """The region this backend replaces: the object mask dilated by `dilate_px`. bool [H, W]"""
        return dilate_mask(mask, self.dilate_px)

    @abstractmethod
    def _fill(self, images: list[Image.Image], holes: list[np.ndarray], samples: list[Any]) -> list[Image.Image]:
        """Images with the holes filled (pixels outside the holes are restored by `inpaint`)."""

    def check_samples(self, samples: Sequence[Any]) -> None:
        """Raise InpaintError if this backend cannot handle `samples` (cheap; before any work)."""

    def info(self) -> dict[str, Any]:
        """What identifies this backend's output (recorded in the manifest and run.json)."""
        return {"backend": self.backend, "dilate_px": self.dilate_px, "checkpoint": None, "checkpoint_md5": None}

    def key(self) -> str:
        """Short hash of `info()`: two runs with the same key produce the same inpainted images."""
        blob = json.dumps(self.info(), sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def build_inpainter(cfg: Mapping[str, Any] | Any) -> Inpainter:
    """`inpaint` config (DictConfig or mapping) -> a ready backend. Loads and checks weights now."""
    cfg = _plain(cfg)
    backend = cfg.get("backend")
    common = {"dilate_px": cfg.get("dilate_px", 8), "batch_size": cfg.get("batch_size", 1)}
    if backend == "opencv":
        from vlmloc.inpaint.opencv import OpenCVInpainter

        return OpenCVInpainter(method=cfg.get("method", "telea"), radius=cfg.get("radius", 5), **common)
    if backend == "lama":
        from vlmloc.inpaint.lama import LamaInpainter

        extra = {k: cfg[k] for k in ("device", "expected_md5", "pad_multiple") if k in cfg}  # absent: class defaults
        return LamaInpainter(checkpoint=cfg.get("checkpoint"), **extra, **common)
    if backend == "oracle":
        from vlmloc.inpaint.oracle import OracleInpainter

        return OracleInpainter(**common)
    raise InpaintError(f"inpaint.backend must be one of {list(BACKENDS)}, got {backend!r} (pick inpaint=opencv|lama|oracle)")


def _plain(cfg: Any) -> dict[str, Any]:
    if cfg is None:
        raise InpaintError("no inpaint config: pass inpaint=opencv|lama|oracle")
    from vlmloc.config_nodes import plain_node

    return plain_node(cfg, "inpaint", InpaintError, "build_inpainter", {"inpaint.checkpoint": " (the path of big-lama.pt)"})
