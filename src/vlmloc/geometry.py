"""Geometry: where visual tokens sit on the original image, and the frames of box answers.

Everything here is pure (numpy, scipy.ndimage, pycocotools); no torch.

Conventions
- Pixel (i, j) of an image occupies the square [j, j+1) x [i, i+1) in original pixel
  coordinates (x to the right, y down). Boxes are xyxy tuples of floats in these coordinates
  unless a name says otherwise; COCO boxes are xywh.
- A ``TokenGrid`` lays rows x cols visual tokens over a rectangle of original-image
  coordinates; the rectangle may reach beyond the image (padding) and need not be square.
- LLaVA-1.5 answers boxes normalised to the frame it saw: the padded square (as it was trained),
  or the centre crop with `pad_to_square=false`; InternVL answers on a 0..1000 scale of the
  original (unpadded) image (see TECH_NOTES "Boxes"). Qwen2.5-VL answers absolute pixels of its
  resized input (`qwen_resized_size`), Qwen3-VL a 0..1000 scale of the image, both usually as JSON
  `[{"bbox_2d": [x1, y1, x2, y2], "label": ...}]`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from pycocotools import mask as mask_utils
from scipy import ndimage

Box = tuple[float, float, float, float]

# Cell edges that should be integers (e.g. 3 * 400/24 + 100) can come out as 149.9999999;
# edges are snapped by this tolerance so floor/ceil do not pick up a neighbouring pixel.
_EDGE_EPS = 1e-6


# --------------------------------------------------------------------------- token grids


@dataclass(frozen=True)
class TokenGrid:
    """A rows x cols grid of visual tokens laid over ORIGINAL-image pixel coordinates.

    Token (r, c) covers x in [x0 + c*(x1-x0)/cols, x0 + (c+1)*(x1-x0)/cols), same for y.
    The region may extend beyond the image (padding) and need not be square.
    """

    x0: float
    y0: float
    x1: float
    y1: float
    rows: int
    cols: int

    def cell_bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Cell edges: x edges [cols+1], y edges [rows+1] (float64)."""
        # Multiply before dividing so that integer-valued edges come out exact.
        xs = self.x0 + (self.x1 - self.x0) * np.arange(self.cols + 1) / self.cols
        ys = self.y0 + (self.y1 - self.y0) * np.arange(self.rows + 1) / self.rows
        return xs, ys

    @property
    def n_tokens(self) -> int:
        return self.rows * self.cols


def llava_grid(
    width: int,
    height: int,
    *,
    grid_size: int = 24,
    image_size: int = 336,
    pad_to_square: bool = True,
) -> TokenGrid:
    """The grid_size x grid_size LLaVA token grid in original coordinates.

    pad_to_square=True: LLaVA-1.5 / HF ``do_pad=True``: pad to S = max(W, H) with offsets
    ((S-W)//2, (S-H)//2) as in ``LlavaImageProcessorPil.pad_to_square``, then resize to
    image_size (a square, so the crop is a no-op).
    pad_to_square=False: HF default: resize the shortest edge to image_size (long edge
    int(image_size * long / short)), then centre crop image_size x image_size.
    """
    if pad_to_square:
        s = max(width, height)
        left, top = (s - width) // 2, (s - height) // 2
        return TokenGrid(-left, -top, s - left, s - top, grid_size, grid_size)
    new_h, new_w = _shortest_edge_size(width, height, image_size)
    top, left = (new_h - image_size) // 2, (new_w - image_size) // 2
    # PIL resize maps [0, new] onto [0, orig] on each axis independently.
    sx, sy = width / new_w, height / new_h
    return TokenGrid(
        left * sx, top * sy, (left + image_size) * sx, (top + image_size) * sy, grid_size, grid_size
    )


def _shortest_edge_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(new_h, new_w) as transformers' get_resize_output_image_size(default_to_square=False)."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    return (new_long, new_short) if width <= height else (new_short, new_long)


def internvl_tiling(
    width: int, height: int, *, min_tiles: int = 1, max_tiles: int = 12, tile_size: int = 448
) -> tuple[int, int]:
    """(n_cols, n_rows) of InternVL's local tiles, from transformers' own tiling rule."""
    # Imported lazily: pure function, but its module pulls in the image-processing stack.
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import (
        get_optimal_tiled_canvas,
    )

    n_cols, n_rows = get_optimal_tiled_canvas(
        (int(height), int(width)), (int(tile_size), int(tile_size)), int(min_tiles), int(max_tiles)
    )
    return int(n_cols), int(n_rows)


def internvl_grids(
    width: int,
    height: int,
    *,
    min_tiles: int = 1,
    max_tiles: int = 12,
    tile_size: int = 448,
    tokens_per_tile: int = 16,
) -> tuple[TokenGrid, TokenGrid | None, int, int]:
    """(local canvas grid, thumbnail grid or None, n_cols, n_rows).

    The local canvas is the image resized (aspect not kept) to n_cols x n_rows tiles, so one
    grid of (n_rows*16) x (n_cols*16) tokens over [0, 0, W, H]; tile (tr, tc) holds canvas rows
    tr*16..tr*16+15 and cols tc*16..tc*16+15 (see ``split_canvas``). The thumbnail (the whole
    image resized to one tile, sequence position LAST) exists only with more than one tile.
    """
    n_cols, n_rows = internvl_tiling(
        width, height, min_tiles=min_tiles, max_tiles=max_tiles, tile_size=tile_size
    )
    t = tokens_per_tile
    local = TokenGrid(0.0, 0.0, float(width), float(height), n_rows * t, n_cols * t)
    thumb = TokenGrid(0.0, 0.0, float(width), float(height), t, t) if n_cols * n_rows > 1 else None
    return local, thumb, n_cols, n_rows


def qwen_resized_size(width: int, height: int, *, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """(resized_w, resized_h) of Qwen-VL's dynamic resolution: both multiples of `factor` (patch x merge),
    the area within [min_pixels, max_pixels], from transformers' own `smart_resize`."""
    # Imported lazily: pure function, but its module pulls in the image-processing stack.
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    h, w = smart_resize(int(height), int(width), factor=int(factor), min_pixels=int(min_pixels), max_pixels=int(max_pixels))
    return int(w), int(h)


def qwen_grid(width: int, height: int, *, factor: int, min_pixels: int, max_pixels: int) -> TokenGrid:
    """Qwen-VL's token grid (one token per factor x factor cell of the resized image, after the 2x2
    merge) over original pixels: the resize maps the whole image onto the whole resized frame, so the
    grid spans [0, W] x [0, H] with (resized_h / factor) rows and (resized_w / factor) cols."""
    rw, rh = qwen_resized_size(width, height, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)
    return TokenGrid(0.0, 0.0, float(width), float(height), rh // int(factor), rw // int(factor))


# --------------------------------------------------------------------------- token masks


def grid_mask(mask: np.ndarray, grid: TokenGrid) -> np.ndarray:
    """bool [H, W] pixel mask -> bool [rows, cols] token mask.

    A token is selected iff some mask pixel overlaps its cell with positive area. Pixel column
    j overlaps [a, b) iff floor(a) <= j <= ceil(b) - 1; the test is an exact rectangle sum on
    a summed-area table. Cells wholly outside the image (padding) are never selected.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D [H, W], got shape {mask.shape}")
    h, w = mask.shape
    sat = np.zeros((h + 1, w + 1), dtype=np.int64)
    sat[1:, 1:] = mask.cumsum(0, dtype=np.int64).cumsum(1)
    xs, ys = grid.cell_bounds()
    c_lo, c_hi = _pixel_ranges(xs, w)
    r_lo, r_hi = _pixel_ranges(ys, h)
    total = (
        sat[np.ix_(r_hi, c_hi)]
        - sat[np.ix_(r_lo, c_hi)]
        - sat[np.ix_(r_hi, c_lo)]
        + sat[np.ix_(r_lo, c_lo)]
    )
    valid = (r_hi > r_lo)[:, None] & (c_hi > c_lo)[None, :]
    return (total > 0) & valid


def _pixel_ranges(edges: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Per cell, the half-open pixel index range [lo, hi) it touches, clipped to [0, n]."""
    lo = np.floor(edges[:-1] + _EDGE_EPS).astype(np.int64)
    hi = np.ceil(edges[1:] - _EDGE_EPS).astype(np.int64)  # exclusive: last pixel is hi - 1
    return np.clip(lo, 0, n), np.clip(hi, 0, n)


def pad_token_mask(token_mask: np.ndarray, p: int) -> np.ndarray:
    """Grow (p > 0) or shrink (p < 0) a bool [rows, cols] token mask by |p| rings.

    Rings use the 8-neighbourhood (3x3 square). Growth is clipped at the grid border. For
    shrinking, the outside of the grid counts as background, so an object touching the border
    also loses its border ring (the ring cannot be "completed" outside the grid, and treating
    it as object would let an object that fills the grid never shrink). p = 0 returns a copy.
    """
    token_mask = np.asarray(token_mask, dtype=bool)
    if p == 0:  # scipy's iterations=0 means "until stable", so handle 0 here
        return token_mask.copy()
    square = np.ones((3, 3), dtype=bool)
    if p > 0:
        return ndimage.binary_dilation(token_mask, structure=square, iterations=p)
    return ndimage.binary_erosion(token_mask, structure=square, iterations=-p, border_value=0)


def split_canvas(
    canvas_mask: np.ndarray, n_cols: int, n_rows: int, tokens_per_tile: int = 16
) -> np.ndarray:
    """[n_rows*t, n_cols*t] canvas token mask -> [n_tiles, t, t] in row-major tile order."""
    t = tokens_per_tile
    canvas_mask = np.asarray(canvas_mask)
    if canvas_mask.shape != (n_rows * t, n_cols * t):
        raise ValueError(f"canvas shape {canvas_mask.shape} != {(n_rows * t, n_cols * t)}")
    tiles = canvas_mask.reshape(n_rows, t, n_cols, t).transpose(0, 2, 1, 3)
    return tiles.reshape(n_rows * n_cols, t, t).copy()


# --------------------------------------------------------------------------- box frames


def xywh_to_xyxy(b: Sequence[float]) -> Box:
    """COCO [x, y, w, h] -> (x1, y1, x2, y2)."""
    x, y, w, h = (float(v) for v in b)
    return (x, y, x + w, y + h)


def xyxy_to_xywh(b: Sequence[float]) -> Box:
    """(x1, y1, x2, y2) -> COCO (x, y, w, h)."""
    x1, y1, x2, y2 = (float(v) for v in b)
    return (x1, y1, x2 - x1, y2 - y1)


def clip_box(xyxy: Sequence[float], width: int, height: int) -> Box:
    """Clip an xyxy box to [0, W] x [0, H]."""
    x1, y1, x2, y2 = (float(v) for v in xyxy)
    w, h = float(width), float(height)
    return (min(max(x1, 0.0), w), min(max(y1, 0.0), h), min(max(x2, 0.0), w), min(max(y2, 0.0), h))


def grid_norm_to_pixels(box_norm: Sequence[float], grid: TokenGrid, width: int, height: int) -> Box:
    """[0,1] box on the frame the model saw (`grid`'s rectangle) -> xyxy original pixels, clipped."""
    xn1, yn1, xn2, yn2 = (float(v) for v in box_norm)
    sx, sy = grid.x1 - grid.x0, grid.y1 - grid.y0
    box = (grid.x0 + xn1 * sx, grid.y0 + yn1 * sy, grid.x0 + xn2 * sx, grid.y0 + yn2 * sy)
    return clip_box(box, width, height)


def pixels_to_grid_norm(xyxy: Sequence[float], grid: TokenGrid) -> Box:
    """xyxy original pixels -> [0,1] box on the frame the model saw (no rounding, no clipping)."""
    x1, y1, x2, y2 = (float(v) for v in xyxy)
    sx, sy = grid.x1 - grid.x0, grid.y1 - grid.y0
    return ((x1 - grid.x0) / sx, (y1 - grid.y0) / sy, (x2 - grid.x0) / sx, (y2 - grid.y0) / sy)


def llava_norm_to_pixels(box_norm: Sequence[float], width: int, height: int) -> Box:
    """LLaVA [0,1] box on the padded square -> xyxy original pixels, clipped to the image."""
    return grid_norm_to_pixels(box_norm, llava_grid(width, height, pad_to_square=True), width, height)


def pixels_to_llava_norm(xyxy: Sequence[float], width: int, height: int) -> Box:
    """xyxy original pixels -> LLaVA [0,1] box on the padded square (no rounding)."""
    return pixels_to_grid_norm(xyxy, llava_grid(width, height, pad_to_square=True))


def internvl_1000_to_pixels(box_1000: Sequence[float], width: int, height: int) -> Box:
    """InternVL 0..1000 box -> xyxy original pixels, clipped to the image."""
    v1, v2, v3, v4 = (float(v) for v in box_1000)
    box = (v1 / 1000 * width, v2 / 1000 * height, v3 / 1000 * width, v4 / 1000 * height)
    return clip_box(box, width, height)


def pixels_to_internvl_1000(xyxy: Sequence[float], width: int, height: int) -> tuple[int, int, int, int]:
    """xyxy original pixels -> InternVL integer box on 0..1000 (round half up, clipped)."""
    x1, y1, x2, y2 = (float(v) for v in xyxy)
    scaled = (x1 / width, y1 / height, x2 / width, y2 / height)
    return tuple(min(max(math.floor(v * 1000 + 0.5), 0), 1000) for v in scaled)  # type: ignore[return-value]


def format_llava_box(box_norm: Sequence[float], decimals: int = 2) -> str:
    """'[0.61, 0.36, 0.92, 0.83]' (LLaVA-1.5's answer format)."""
    return "[" + ", ".join(f"{float(v):.{decimals}f}" for v in box_norm) + "]"


def format_internvl_box(box_1000: Sequence[float]) -> str:
    """'<box>[[610, 360, 920, 830]]</box>' (InternVL's answer format, integers)."""
    return "<box>[[" + ", ".join(str(int(round(float(v)))) for v in box_1000) + "]]</box>"


# ASCII digits only: \d would also accept other scripts' digits.
_NUM = r"-?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)"
_FOUR = r"\s*(" + _NUM + r")\s*,\s*(" + _NUM + r")\s*,\s*(" + _NUM + r")\s*,\s*(" + _NUM + r")\s*"
_RE_BRACKET4 = re.compile(r"\[" + _FOUR + r"\]")
_RE_INTERNVL_TAG = re.compile(r"<box>\s*\[\s*\[" + _FOUR + r"\]\s*\]\s*</box>")


def _first_finite(pattern: re.Pattern[str], text: str) -> Box | None:
    """Four numbers from the first match of pattern whose values are all finite."""
    for m in pattern.finditer(text):
        vals = tuple(float(g) for g in m.groups())
        if all(math.isfinite(v) for v in vals):
            return vals  # type: ignore[return-value]
    return None


def parse_llava_box(text: str) -> Box | None:
    """First '[a, b, c, d]' of four numbers in text, raw order; None if there is none."""
    if not isinstance(text, str):
        return None
    return _first_finite(_RE_BRACKET4, text)


def parse_internvl_box(text: str) -> Box | None:
    """'<box>[[a, b, c, d]]</box>' if present, else the first '[[...]]' / '[...]' of four numbers."""
    if not isinstance(text, str):
        return None
    found = _first_finite(_RE_INTERNVL_TAG, text)
    # The single-bracket pattern also matches the inner part of '[[...]]'.
    return found if found is not None else _first_finite(_RE_BRACKET4, text)


def scale_to_pixels(box: Sequence[float], sx: float, sy: float, width: int, height: int) -> Box:
    """A box on a frame of sx x sy units spanning the image (Qwen2.5-VL: the resized input in pixels;
    Qwen3-VL: 1000 x 1000) -> xyxy original pixels, clipped."""
    v1, v2, v3, v4 = (float(v) for v in box)
    return clip_box((v1 / sx * width, v2 / sy * height, v3 / sx * width, v4 / sy * height), width, height)


def pixels_to_scale(xyxy: Sequence[float], sx: float, sy: float, width: int, height: int) -> tuple[int, int, int, int]:
    """xyxy original pixels -> integer box on a frame of sx x sy units (round half up, clipped to it)."""
    x1, y1, x2, y2 = (float(v) for v in xyxy)
    scaled = (x1 / width * sx, y1 / height * sy, x2 / width * sx, y2 / height * sy)
    bounds = (sx, sy, sx, sy)
    return tuple(int(min(max(math.floor(v + 0.5), 0), b)) for v, b in zip(scaled, bounds))  # type: ignore[return-value]


def format_qwen_box(box: Sequence[float]) -> str:
    """'[{"bbox_2d": [61, 36, 92, 83]}]' (Qwen-VL's JSON grounding answer, integers, no label)."""
    return '[{"bbox_2d": [' + ", ".join(str(int(round(float(v)))) for v in box) + "]}]"


# "bbox_2d": [a, b, c, d] (JSON key, single or double quotes), then any plain [a, b, c, d] list.
_RE_QWEN_BBOX = re.compile(r"""["']bbox_2d["']\s*:\s*\[""" + _FOUR + r"\]")


def parse_qwen_box(text: str) -> Box | None:
    """The first '"bbox_2d": [a, b, c, d]' of a JSON answer, else the first '[a, b, c, d]'; None if neither."""
    if not isinstance(text, str):
        return None
    found = _first_finite(_RE_QWEN_BBOX, text)
    return found if found is not None else _first_finite(_RE_BRACKET4, text)


# --------------------------------------------------------------------------- scoring


def _degenerate(xyxy: Sequence[float]) -> bool:
    x1, y1, x2, y2 = (float(v) for v in xyxy)
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        return True
    return x2 - x1 <= 0 or y2 - y1 <= 0


def box_iou(pred_xyxy: Sequence[float] | None, gt_xyxy: Sequence[float]) -> float:
    """IoU of two xyxy boxes via pycocotools (iscrowd=0); 0.0 if pred is None or degenerate."""
    if pred_xyxy is None or _degenerate(pred_xyxy) or _degenerate(gt_xyxy):
        return 0.0
    d = np.asarray([xyxy_to_xywh(pred_xyxy)], dtype=np.float64)
    g = np.asarray([xyxy_to_xywh(gt_xyxy)], dtype=np.float64)
    return float(mask_utils.iou(d, g, [0])[0, 0])


def hits(iou: float, thresholds: Sequence[float] = (0.5, 0.7, 0.9)) -> dict[float, bool]:
    """{threshold: iou >= threshold}."""
    return {float(t): bool(iou >= t) for t in thresholds}


def scale_box(xyxy: Sequence[float], factor: float, width: int, height: int) -> Box:
    """Scale a box's width and height by factor about its centre, then clip to the image."""
    x1, y1, x2, y2 = (float(v) for v in xyxy)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    hw, hh = (x2 - x1) * factor / 2, (y2 - y1) * factor / 2
    return clip_box((cx - hw, cy - hh, cx + hw, cy + hh), width, height)
