"""Visual layout: where every visual token of one batch row sits, in the sequence and in the image.

A layout is pure data (numpy), built by a model adapter from a prepared batch. It answers the
questions every token-level experiment asks: which sequence positions hold the object's tokens
(optionally grown or shrunk by p rings), which tokens belong to the global view or to the local
tiles, and where a token lies on its view's grid.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from vlmloc.geometry import TokenGrid, grid_mask, pad_token_mask

GLOBAL, LOCAL = "global", "local"


@dataclass(frozen=True)
class VisualLayout:
    """Per-row description of the visual tokens, arrays of length n_visual in sequence order.

    positions:   [n_visual] int, index of the token in the row's (padded) sequence
    tile:        [n_visual] int, tile index as the processor emits tiles (LLaVA: always 0)
    view:        [n_visual] str, "global" (whole image: LLaVA's only view, InternVL's thumbnail
                 or its single tile) or "local" (an InternVL crop)
    row, col:    [n_visual] int, position on the tile's own token grid
    canvas_row, canvas_col: [n_visual] int, position on the view's canvas grid (local crops form
                 one canvas of n_rows*16 x n_cols*16 tokens)
    grids:       view name -> TokenGrid of that view's canvas over original-image pixels
    """

    positions: np.ndarray
    tile: np.ndarray
    view: np.ndarray
    row: np.ndarray
    col: np.ndarray
    canvas_row: np.ndarray
    canvas_col: np.ndarray
    grids: dict[str, TokenGrid] = field(repr=False)
    n_tiles: int = 1

    def __post_init__(self) -> None:
        n = len(self.positions)
        for name in ("tile", "view", "row", "col", "canvas_row", "canvas_col"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"layout field {name} has {len(getattr(self, name))} entries, expected {n}")

    @property
    def n_visual(self) -> int:
        return len(self.positions)

    def in_view(self, view: str) -> np.ndarray:
        """bool [n_visual]: tokens of one view ("global" or "local")."""
        return self.view == view

    def view_token_masks(self, mask: np.ndarray, pad: int = 0) -> dict[str, np.ndarray]:
        """Object mask bool [H, W] -> per view a token mask bool [canvas_rows, canvas_cols], padded by p rings."""
        return {name: pad_token_mask(grid_mask(mask, grid), pad) for name, grid in self.grids.items()}

    def object_tokens(self, mask: np.ndarray, pad: int = 0) -> np.ndarray:
        """bool [n_visual]: tokens covering the object (any-pixel overlap), grown/shrunk by `pad` rings."""
        return self.tokens_of(self.view_token_masks(mask, pad))

    def tokens_of(self, view_masks: dict[str, np.ndarray]) -> np.ndarray:
        """Per view token masks bool [canvas_rows, canvas_cols] (`view_token_masks`) -> bool [n_visual]."""
        selected = np.zeros(self.n_visual, dtype=bool)
        for name, token_mask in view_masks.items():
            in_view = self.view == name
            selected[in_view] = token_mask[self.canvas_row[in_view], self.canvas_col[in_view]]
        return selected
