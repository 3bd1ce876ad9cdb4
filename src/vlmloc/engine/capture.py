"""Capture the visual tokens' activations at every stage of a VLM in one forward pass.

A *stage* is a place where the visual tokens have a representation: each vision-encoder layer
(`vision.0 .. vision.{L-1}`), the projector output (`projector`) and each LLM decoder layer
(`llm.0 .. llm.{N-1}`), in that (positional) order. Hooks keep only the visual tokens, in the
order of the batch's `VisualLayout`s (row by row, tiles in processor order, row-major in a tile):

    stages = model_stages(adapter)                       # or a subset; Qwen-VL: model_stages(adapter, 16)
    batch = adapter.prepare(images, texts)
    acts = capture(adapter, batch, stages)               # {name: [n_tokens(stage), dim(stage)]}
    meta = stage_tokens(stages[0], batch.layouts)        # row, tile, view, grid row/col per token

or, around any forward the caller runs itself (generation, an intervention):

    with VisualCapture(adapter, batch, stages) as acts:
        adapter.model(**batch.inputs)

`capture` ends the forward right after the last requested stage (a hook raises, the context
manager swallows it), so probing the ViT alone never runs the LLM.

What each stage holds, per batch row:
- vision.i: the output of encoder layer i (the residual stream) for every patch of every tile,
  CLS dropped: [n_tiles * P, d_vision], P = (image_size / patch_size)^2 (LLaVA-1.5 24x24; InternVL
  32x32 per 448 px tile, before pixel shuffle), each tile's patches row-major. Hooks on the encoder
  layers rather than `output_hidden_states=True`: they fire inside the one full-model forward (no
  second vision pass; the model's own call does not return the tower's hidden states), and each
  layer is cut down to its patches as soon as it is computed.
  Merge-block families (Qwen-VL, `Family.vision_merge_blocks`): [n_visual * m^2, d_vision], the
  m x m patches (m = spatial_merge_size = 2) behind each LM token, tokens in layout order, each block
  row-major: patch u of the token at (R, C) lies at (R*m + u // m, C*m + u % m) on the image's patch
  grid. That is the processor's patchify order; Qwen2.5-VL's tower permutes the blocks into its
  attention windows before the first layer and keeps that order to the merger, so its rows are
  put back (`VisualCapture._layout_order`).
- projector: the projector's output, [n_visual, d_model], in layout order (Qwen2.5-VL's merger
  output comes in window order and is put back, as the model does); it is exactly what the LM
  receives at the image-token positions (masked_scatter fills them in this order).
- llm.i: the output of decoder layer i at the row's image-token positions, [n_visual, d_model].
  This is the residual stream *before* the final norm (HF's `hidden_states[-1]` is after it), and
  on Qwen3-VL before the DeepStack features that the stack adds after the first layers' outputs
  (as HF's `hidden_states[i + 1]`; layer i + 1 reads the sum).

Grids: dynamic-resolution families (Qwen-VL) give each image its own grid; `model_stages` then
takes the one grid every probe image was fitted to (`stage_grids`), and `stage_tokens` refuses a
token outside it.

Captured tensors stay on the model's device in the model's dtype; the caller decides to move them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from vlmloc.engine.hooks import Call, Hooks
from vlmloc.models.adapter import PreparedBatch, VLMAdapter
from vlmloc.models.layout import VisualLayout

VISION, PROJECTOR, LLM = "vision", "projector", "llm"
STAGE_KINDS = (VISION, PROJECTOR, LLM)


@dataclass(frozen=True)
class Stage:
    """One stage. `grid`: tokens per side of the grid its tokens lie on, per tile (dynamic-resolution
    families: per image, every probe image fitted to one grid). `patch_block`: vision stages of a
    merge-block family, the side m of the patch block behind each LM token (Qwen-VL: 2); 0 = each
    tile's patches row-major."""

    name: str
    kind: str
    index: int  # position in the model's stage order (vision layers, projector, LLM layers)
    layer: int | None  # layer number within its kind; None for the projector
    grid: int
    module: nn.Module = field(repr=False, compare=False)
    patch_block: int = 0


@dataclass(frozen=True)
class TokenMeta:
    """Per captured token of one stage, arrays [n_tokens] in capture order."""

    batch_row: np.ndarray  # int, row of the batch
    tile: np.ndarray  # int, tile index in processor order (LLaVA: 0)
    view: np.ndarray  # str, "global" | "local"
    row: np.ndarray  # int, row on the stage's per-tile grid
    col: np.ndarray  # int, column on the stage's per-tile grid

    def __len__(self) -> int:
        return len(self.row)


def _side(value: Any) -> int:
    return int(value[0] if isinstance(value, (list, tuple)) else value)


def merge_size(adapter: VLMAdapter) -> int:
    """Side of the patch block behind one LM token in a merge-block family (Qwen-VL's
    `spatial_merge_size`: 2); 0 for families whose vision patches are row-major per tile."""
    if not adapter.facts.vision_merge_blocks:
        return 0
    return int(adapter.model.config.vision_config.spatial_merge_size)


def token_pixels(adapter: VLMAdapter) -> int:
    """Pixels per LM-token side of a merge-block family's resized image: patch x merge (Qwen2.5-VL
    14 x 2 = 28, Qwen3-VL 16 x 2 = 32)."""
    return _side(adapter.model.config.vision_config.patch_size) * max(merge_size(adapter), 1)


def stage_grids(adapter: VLMAdapter, token_grid: int | None = None) -> tuple[int, int]:
    """(vision grid, LM grid): patches and LM tokens per side of one tile (LLaVA-1.5 24 and 24,
    InternVL 32 and 16). A dynamic-resolution family has no grid of its own: `token_grid`, the LM
    tokens per side every probe image is fitted to (experiment.image_grid), sets it, and its vision
    grid is merge_size times finer (Qwen-VL, 16 -> 32 patches per side)."""
    if adapter.facts.dynamic_resolution:
        if token_grid is None:
            raise ValueError(f"family {adapter.family!r} gives every image its own token grid: position probes need "
                             "one grid for all images (experiment.image_grid.tokens_per_side)")
        return int(token_grid) * max(merge_size(adapter), 1), int(token_grid)
    vc = adapter.model.config.vision_config
    return _side(vc.image_size) // _side(vc.patch_size), adapter.tokens_per_side


def model_stages(adapter: VLMAdapter, token_grid: int | None = None) -> list[Stage]:
    """Every stage of the model in positional order: vision.0.., projector, llm.0..
    token_grid: the probe grid of a dynamic-resolution family (`stage_grids`); ignored otherwise."""
    vg, tg = stage_grids(adapter, token_grid)
    block = merge_size(adapter)
    stages = [Stage(f"{VISION}.{i}", VISION, 0, i, vg, m, block) for i, m in enumerate(adapter.vision_layers)]
    stages.append(Stage(PROJECTOR, PROJECTOR, 0, None, tg, adapter.projector))
    stages += [Stage(f"{LLM}.{i}", LLM, 0, i, tg, m) for i, m in enumerate(adapter.layers)]
    return [replace(s, index=i) for i, s in enumerate(stages)]


def stage_tokens(stage: Stage, layouts: Sequence[VisualLayout]) -> TokenMeta:
    """Which token of which row, tile and view each captured activation of `stage` belongs to.
    Raises when a row's tiles do not fill the stage's grid (an image of a dynamic-resolution family
    that was not fitted to the probe grid has a grid of its own)."""
    _check_grid(stage, layouts)
    return _stage_tokens(stage, layouts)


def _check_grid(stage: Stage, layouts: Sequence[VisualLayout]) -> None:
    if stage.kind == VISION and not stage.patch_block:
        return  # each tile's patch grid is the stage's by construction
    g = stage.grid // max(stage.patch_block, 1)  # the LM token grid the layout describes
    for i, lay in enumerate(layouts):
        if lay.n_visual != lay.n_tiles * g * g or lay.row.max() >= g or lay.col.max() >= g:
            raise ValueError(
                f"stage {stage.name}: row {i} has {lay.n_visual} visual tokens on a {lay.row.max() + 1}x"
                f"{lay.col.max() + 1} grid per tile, the stage's grid is {g}x{g}; images of a dynamic-resolution "
                "family must be fitted to the probe grid first (vlmloc.probe_training.grid_images)")


def _stage_tokens(stage: Stage, layouts: Sequence[VisualLayout]) -> TokenMeta:
    if stage.kind != VISION:
        n = [lay.n_visual for lay in layouts]
        return TokenMeta(
            batch_row=np.repeat(np.arange(len(layouts)), n),
            tile=np.concatenate([lay.tile for lay in layouts]),
            view=np.concatenate([lay.view for lay in layouts]),
            row=np.concatenate([lay.row for lay in layouts]),
            col=np.concatenate([lay.col for lay in layouts]),
        )
    if stage.patch_block:
        return _block_patches(stage.patch_block, layouts)
    # Vision tokens: every tile contributes its whole patch grid; a tile's view is the view of
    # its LM tokens in the layout.
    p = stage.grid * stage.grid
    prow, pcol = np.divmod(np.arange(p), stage.grid)
    rows, tiles, views = [], [], []
    for b, lay in enumerate(layouts):
        for t in range(lay.n_tiles):
            rows.append(b)
            tiles.append(t)
            views.append(lay.view[np.argmax(lay.tile == t)])
    k = len(rows)
    return TokenMeta(
        batch_row=np.repeat(np.asarray(rows, dtype=np.int64), p),
        tile=np.repeat(np.asarray(tiles, dtype=np.int64), p),
        view=np.repeat(np.asarray(views), p),
        row=np.tile(prow, k),
        col=np.tile(pcol, k),
    )


def _block_patches(m: int, layouts: Sequence[VisualLayout]) -> TokenMeta:
    """Vision patches of a merge-block family: m x m per LM token, tokens in layout order, each block
    row-major, so patch u of the token at (R, C) lies at (R*m + u // m, C*m + u % m); every patch
    shares its token's tile and view."""
    du, dv = np.divmod(np.arange(m * m), m)
    k = m * m
    return TokenMeta(
        batch_row=np.repeat(np.arange(len(layouts)), [lay.n_visual * k for lay in layouts]),
        tile=np.concatenate([np.repeat(lay.tile, k) for lay in layouts]),
        view=np.concatenate([np.repeat(lay.view, k) for lay in layouts]),
        row=np.concatenate([np.repeat(lay.row, k) * m + np.tile(du, lay.n_visual) for lay in layouts]),
        col=np.concatenate([np.repeat(lay.col, k) * m + np.tile(dv, lay.n_visual) for lay in layouts]),
    )


class _StopForward(Exception):
    """Raised by the last needed stage's hook: nothing after it needs computing."""


def _tensor(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


class VisualCapture:
    """Context manager: forward hooks on the stages' modules keep the visual tokens of one forward.

    Entering returns a dict that the forward fills: {stage name: [n_tokens, dim]}. On exit the
    hooks are removed and every stage is checked to have been captured with the expected token
    count (a stage whose module never ran is an error, not a silent gap).
    """

    def __init__(
        self, adapter: VLMAdapter, batch: PreparedBatch, stages: Sequence[Stage], *, stop_early: bool = False
    ) -> None:
        self.adapter = adapter
        self.stages = list(stages)
        # stop_early: the last stage (in model order) ends the forward once captured; only for
        # callers that catch _StopForward (`capture` does) and need no model output.
        self.last = max(self.stages, key=lambda s: s.index).name if stop_early and self.stages else None
        self.layouts = batch.layouts
        self.grid_thw = batch.inputs.get("image_grid_thw")
        self._order: torch.Tensor | None = None  # merge-block families: tower row of each layout-order patch
        self.n_tiles = sum(lay.n_tiles for lay in batch.layouts)
        self.n_visual = sum(lay.n_visual for lay in batch.layouts)
        device = batch.inputs["input_ids"].device
        # Flat (row, position) index of every visual token in the [batch, seq, dim] LM states.
        self._rows = torch.as_tensor(
            np.repeat(np.arange(len(batch.layouts)), [lay.n_visual for lay in batch.layouts]), device=device
        )
        self._pos = torch.as_tensor(np.concatenate([lay.positions for lay in batch.layouts]), device=device)
        self._parts: dict[str, list[torch.Tensor]] = {}
        self._hooks = Hooks()
        for s in self.stages:
            self._hooks.after(s.module, self._hook(s))
        self.activations: dict[str, torch.Tensor] = {}

    def _hook(self, stage: Stage):
        def hook(call: Call, output: Any) -> None:
            x = _tensor(output).detach()
            if stage.kind == VISION:
                if x.dim() == 3 and x.shape[1] == stage.grid**2 + 1:  # CLS first (CLIP, InternViT): not a grid position
                    x = x[:, 1:]
                x = x.reshape(-1, x.shape[-1])
                if stage.patch_block:
                    x = self._layout_order(stage, x)
            elif stage.kind == PROJECTOR:
                # the adapter knows the order its projector emits tokens in (Qwen2.5-VL: windows)
                _, x = self.adapter.projector_rows(call.hidden.detach(), x, self.grid_thw)
            else:
                x = x[self._rows, self._pos]
            self._parts.setdefault(stage.name, []).append(x)
            if stage.name == self.last and sum(len(p) for p in self._parts[stage.name]) >= self._expected(stage):
                raise _StopForward

        return hook

    def _layout_order(self, stage: Stage, x: torch.Tensor) -> torch.Tensor:
        """One vision layer's patch rows [n_patches, d] of a merge-block family, as the tower holds
        them, -> in layout order. Every block keeps the order the merger reads, so the adapter's map
        of the merger's input to layout order (`projector_rows`), applied to the row indices, is the
        permutation: Qwen2.5-VL's window order, the identity for Qwen3-VL."""
        if x.shape[0] != self._expected(stage):  # a window order spans the whole batch's images
            raise RuntimeError(f"stage {stage.name}: {x.shape[0]} patches in one call, the layouts say "
                               f"{self._expected(stage)}; the vision tower must see the whole batch at once")
        if self._order is None:
            idx = torch.arange(x.shape[0], device=x.device)[:, None]
            rows, _ = self.adapter.projector_rows(idx, idx[: self.n_visual], self.grid_thw)
            self._order = rows.reshape(-1)
        return x[self._order]

    def _expected(self, stage: Stage) -> int:
        if stage.kind != VISION:
            return self.n_visual
        if stage.patch_block:
            return self.n_visual * stage.patch_block**2
        return self.n_tiles * stage.grid**2

    def __enter__(self) -> dict[str, torch.Tensor]:
        self._hooks.__enter__()
        return self.activations

    def __exit__(self, exc_type: Any, *_: Any) -> bool:
        self._hooks.remove()
        if exc_type is not None and not issubclass(exc_type, _StopForward):
            return False
        for s in self.stages:
            parts = self._parts.pop(s.name, None)
            if not parts:
                raise RuntimeError(f"stage {s.name} was not captured: its module did not run in the forward")
            # The LM runs once per forward; vision layers and projector may run in chunks of tiles.
            x = parts[0] if len(parts) == 1 else torch.cat(parts)
            if x.shape[0] != self._expected(s):
                raise RuntimeError(f"stage {s.name}: captured {x.shape[0]} tokens, the layouts say {self._expected(s)}")
            self.activations[s.name] = x
        return exc_type is not None  # swallow the early stop


@torch.no_grad()
def capture(adapter: VLMAdapter, batch: PreparedBatch, stages: Sequence[Stage]) -> dict[str, torch.Tensor]:
    """{stage name: [n_tokens, dim]} from one forward of the model trunk.

    Runs `model.model` (no lm_head: the logits are not needed) without a KV cache (it would
    cost 2 x layers x seq x d_model per row for nothing), and stops after the last requested
    stage (probing only ViT layers skips the LLM).
    """
    with VisualCapture(adapter, batch, stages, stop_early=True) as acts:
        adapter.model.model(**batch.inputs, use_cache=False)
    return acts
