"""LLaVA-1.5 adapter: 336 px CLIP, 24x24 = 576 visual tokens, boxes on the frame the model saw."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from vlmloc import geometry
from vlmloc.models.adapter import Box, VLMAdapter
from vlmloc.models.layout import GLOBAL, VisualLayout


class LlavaAdapter(VLMAdapter):
    family = "llava"

    @property
    def tokens_per_side(self) -> int:
        """CLIP patches per side, one token each: 336 / 14 = 24."""
        vc = self.model.config.vision_config
        return int(vc.image_size) // int(vc.patch_size)

    def grid(self, width: int, height: int) -> geometry.TokenGrid:
        vc = self.model.config.vision_config
        return geometry.llava_grid(
            width,
            height,
            grid_size=self.tokens_per_side,
            image_size=int(vc.image_size),
            pad_to_square=bool(self.cfg.pad_to_square),
        )

    def processor_kwargs(self) -> dict:
        return {"do_pad": bool(self.cfg.pad_to_square)}

    def n_visual_tokens(self, width: int, height: int) -> int:
        return self.tokens_per_side**2

    def layout(self, input_ids: torch.Tensor, width: int, height: int) -> VisualLayout:
        positions = self.visual_positions(input_ids).numpy()
        g = self.tokens_per_side
        if len(positions) != g * g:
            raise ValueError(f"expected {g * g} image tokens in the row, found {len(positions)}")
        row, col = np.divmod(np.arange(g * g), g)
        return VisualLayout(
            positions=positions,
            tile=np.zeros(g * g, dtype=np.int64),
            view=np.full(g * g, GLOBAL),
            row=row,
            col=col,
            canvas_row=row,
            canvas_col=col,
            grids={GLOBAL: self.grid(width, height)},
            n_tiles=1,
        )

    # Boxes are normalised to the frame the model saw, the token grid's rectangle: the padded
    # square (pad_to_square=true, as LLaVA-1.5 was trained) or the centre crop (false), whose
    # [0, 1] spans only the part of the image inside the crop.
    def parse_box(self, text: str, width: int, height: int) -> Box | None:
        norm = geometry.parse_llava_box(text)
        return None if norm is None else geometry.grid_norm_to_pixels(norm, self.grid(width, height), width, height)

    def format_box(self, xyxy: Sequence[float], width: int, height: int) -> str:
        norm = geometry.pixels_to_grid_norm(xyxy, self.grid(width, height))
        # a box reaching outside the centre crop is said as its part inside it
        return geometry.format_llava_box([min(max(v, 0.0), 1.0) for v in norm], int(self.cfg.box_decimals))
