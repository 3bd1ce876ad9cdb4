"""InternVL-3.5 adapter: dynamic 448 px tiling, 16x16 tokens per tile, thumbnail last, 0-1000 boxes."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from vlmloc import geometry
from vlmloc.models.adapter import Box, VLMAdapter
from vlmloc.models.layout import GLOBAL, LOCAL, VisualLayout


class InternVLAdapter(VLMAdapter):
    family = "internvl"

    @property
    def tile_size(self) -> int:
        size = self.model.config.vision_config.image_size
        return int(size[0] if isinstance(size, (list, tuple)) else size)

    @property
    def tokens_per_side(self) -> int:
        """Tokens per tile side after pixel shuffle: 448 / 14 * 0.5 = 16."""
        vc = self.model.config.vision_config
        patch = vc.patch_size[0] if isinstance(vc.patch_size, (list, tuple)) else vc.patch_size
        return int(self.tile_size // int(patch) * float(self.model.config.downsample_ratio))

    def processor_kwargs(self) -> dict:
        return {
            "crop_to_patches": True,
            "min_patches": int(self.cfg.min_tiles),
            "max_patches": int(self.cfg.max_tiles),
        }

    def grids(self, width: int, height: int) -> tuple[geometry.TokenGrid, geometry.TokenGrid | None, int, int]:
        return geometry.internvl_grids(
            width,
            height,
            min_tiles=int(self.cfg.min_tiles),
            max_tiles=int(self.cfg.max_tiles),
            tile_size=self.tile_size,
            tokens_per_tile=self.tokens_per_side,
        )

    def n_visual_tokens(self, width: int, height: int) -> int:
        _, thumb, n_cols, n_rows = self.grids(width, height)
        return (n_cols * n_rows + (thumb is not None)) * self.tokens_per_side**2

    def layout(self, input_ids: torch.Tensor, width: int, height: int) -> VisualLayout:
        positions = self.visual_positions(input_ids).numpy()
        local, thumb, n_cols, n_rows = self.grids(width, height)
        t = self.tokens_per_side
        n_local = n_cols * n_rows
        n_tiles = n_local + (1 if thumb is not None else 0)
        if len(positions) != n_tiles * t * t:
            raise ValueError(
                f"expected {n_tiles} tiles x {t * t} image tokens for a {width}x{height} image, "
                f"found {len(positions)}: processor and layout disagree on the tiling"
            )
        idx = np.arange(n_tiles * t * t)
        tile, within = np.divmod(idx, t * t)
        row, col = np.divmod(within, t)
        if thumb is None:
            # A single tile covers the whole image at thumbnail resolution: it is the global view.
            view = np.full(len(idx), GLOBAL)
            return VisualLayout(positions, tile, view, row, col, row, col, {GLOBAL: local}, n_tiles)
        is_thumb = tile == n_local
        tile_row, tile_col = np.divmod(np.minimum(tile, n_local - 1), n_cols)
        canvas_row = np.where(is_thumb, row, tile_row * t + row)
        canvas_col = np.where(is_thumb, col, tile_col * t + col)
        view = np.where(is_thumb, GLOBAL, LOCAL)
        return VisualLayout(
            positions, tile, view, row, col, canvas_row, canvas_col, {LOCAL: local, GLOBAL: thumb}, n_tiles
        )

    def parse_box(self, text: str, width: int, height: int) -> Box | None:
        box = geometry.parse_internvl_box(text)
        return None if box is None else geometry.internvl_1000_to_pixels(box, width, height)

    def format_box(self, xyxy: Sequence[float], width: int, height: int) -> str:
        return geometry.format_internvl_box(geometry.pixels_to_internvl_1000(xyxy, width, height))
