"""Qwen2.5-VL and Qwen3-VL adapters: dynamic resolution, one token grid per image, M-RoPE positions.

- The image is resized (aspect kept as closely as multiples allow) to multiples of patch x merge
  (Qwen2.5-VL 14 x 2 = 28 px, Qwen3-VL 16 x 2 = 32 px) with its area within
  [`model.min_pixels`, `model.max_pixels`]; after the 2x2 merge every factor x factor cell of the
  resized image is one LM token, row-major: a grid of (H'/factor) x (W'/factor) that differs per image.
- Visual tokens are `<|image_pad|>` between `<|vision_start|>` and `<|vision_end|>`; their id is read
  from the model config (`image_token_id`).
- Position ids are the model's own 3-D rotary indices (`get_rope_index`: temporal, row, column for
  visual tokens, one shared index for text), [3, batch, seq], left padding included.
- Boxes: Qwen2.5-VL answers absolute pixels of its resized input, Qwen3-VL a 0..1000 scale of the
  image (`model.box_frame`: resized | 1000), usually as JSON `[{"bbox_2d": [...], "label": ...}]`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from vlmloc import geometry
from vlmloc.models.adapter import Box, VLMAdapter
from vlmloc.models.layout import GLOBAL, VisualLayout

BOX_FRAMES = ("resized", "1000")


class QwenVLAdapter(VLMAdapter):
    """Shared by both Qwen families; the family facts differ as data (configs and the family table)."""

    family = "qwen2_5vl"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if str(self.cfg.box_frame) not in BOX_FRAMES:
            raise ValueError(f"model.box_frame must be one of {list(BOX_FRAMES)}, got {self.cfg.box_frame!r}")
        if int(self.cfg.min_pixels) > int(self.cfg.max_pixels):
            raise ValueError(f"model.min_pixels={self.cfg.min_pixels} exceeds model.max_pixels={self.cfg.max_pixels}")

    # ------------------------------------------------------------------ geometry
    @property
    def patch_size(self) -> int:
        return int(self.model.config.vision_config.patch_size)

    @property
    def merge_size(self) -> int:
        return int(self.model.config.vision_config.spatial_merge_size)

    @property
    def factor(self) -> int:
        """Pixels per LM token side in the resized image: patch x merge (28 or 32)."""
        return self.patch_size * self.merge_size

    @property
    def tokens_per_side(self) -> int:
        """Tokens per side of a square image at the pixel budget's upper bound (grids differ per image:
        `grid`); kept for the interface, never used to place tokens."""
        return int(np.sqrt(int(self.cfg.max_pixels))) // self.factor

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """(W', H'): the size the processor resizes a width x height image to."""
        return geometry.qwen_resized_size(width, height, factor=self.factor, min_pixels=int(self.cfg.min_pixels),
                                          max_pixels=int(self.cfg.max_pixels))

    def grid(self, width: int, height: int) -> geometry.TokenGrid:
        return geometry.qwen_grid(width, height, factor=self.factor, min_pixels=int(self.cfg.min_pixels),
                                  max_pixels=int(self.cfg.max_pixels))

    def processor_kwargs(self) -> dict:
        # the pixel budget is a config value: passed at every call, whatever the checkpoint's file says
        return {"size": {"shortest_edge": int(self.cfg.min_pixels), "longest_edge": int(self.cfg.max_pixels)}}

    def n_visual_tokens(self, width: int, height: int) -> int:
        return self.grid(width, height).n_tokens

    def position_ids(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """[3, batch, seq] M-RoPE indices from the model's own `get_rope_index` (padding ignored)."""
        if "image_grid_thw" not in inputs:
            return super().position_ids(inputs)
        pos, _ = self.model.model.get_rope_index(
            inputs["input_ids"],
            mm_token_type_ids=inputs["mm_token_type_ids"],
            image_grid_thw=inputs["image_grid_thw"],
            attention_mask=inputs["attention_mask"],
        )
        return pos

    def layout(self, input_ids: torch.Tensor, width: int, height: int) -> VisualLayout:
        positions = self.visual_positions(input_ids).numpy()
        g = self.grid(width, height)
        if len(positions) != g.n_tokens:
            raise ValueError(
                f"expected {g.rows} x {g.cols} image tokens for a {width}x{height} image (resized to "
                f"{self.resized_size(width, height)}), found {len(positions)}: processor and layout disagree"
            )
        row, col = np.divmod(np.arange(g.n_tokens), g.cols)
        return VisualLayout(
            positions=positions,
            tile=np.zeros(g.n_tokens, dtype=np.int64),
            view=np.full(g.n_tokens, GLOBAL),
            row=row,
            col=col,
            canvas_row=row,
            canvas_col=col,
            grids={GLOBAL: g},
            n_tiles=1,
        )

    # ------------------------------------------------------------------ projector rows in layout order
    def projector_rows(self, ins: torch.Tensor, outs: torch.Tensor, grid_thw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The merger's input [n_patches, d_vision] and output [n_tokens, hidden], as its hook sees them,
        -> ([n_tokens, merge^2 * d_vision], [n_tokens, hidden]) in layout order.

        The merger concatenates each 2x2 block of patches into one token; Qwen2.5-VL's window attention
        runs the tower (merger included) on window-ordered blocks and undoes the order after the merger.
        """
        ins = ins.reshape(-1, self.merge_size**2 * ins.shape[-1])
        order = self.window_order(grid_thw)
        if order is None:
            return ins, outs
        back = torch.argsort(order.to(outs.device))
        return ins[back], outs[back]

    def window_order(self, grid_thw: torch.Tensor) -> torch.Tensor | None:
        """Token order inside the vision tower (Qwen2.5-VL's window index), None when it is the layout's."""
        vc = self.model.config.vision_config
        if getattr(vc, "window_size", None) is None:
            return None
        from transformers.vision_utils import get_vision_window_index

        index, _ = get_vision_window_index(grid_thw, spatial_merge_size=self.merge_size,
                                           window_size=int(vc.window_size), patch_size=self.patch_size)
        return index

    # ------------------------------------------------------------------ boxes
    def _frame(self, width: int, height: int) -> tuple[float, float]:
        if str(self.cfg.box_frame) == "1000":
            return 1000.0, 1000.0
        rw, rh = self.resized_size(width, height)
        return float(rw), float(rh)

    def parse_box(self, text: str, width: int, height: int) -> Box | None:
        box = geometry.parse_qwen_box(text)
        if box is None:
            return None
        return geometry.scale_to_pixels(box, *self._frame(width, height), width, height)

    def format_box(self, xyxy: Sequence[float], width: int, height: int) -> str:
        return geometry.format_qwen_box(geometry.pixels_to_scale(xyxy, *self._frame(width, height), width, height))


class Qwen3VLAdapter(QwenVLAdapter):
    family = "qwen3vl"
