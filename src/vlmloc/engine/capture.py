"""Capture the visual tokens' activations at every stage of a VLM in one forward pass.

A *stage* is a place where the visual tokens have a representation: each vision-encoder layer
(`vision.0 .. vision.{L-1}`), the projector output (`projector`) and each LLM decoder layer
(`llm.0 .. llm.{N-1}`), in that (positional) order. Hooks keep only the visual tokens, in the
order of the batch's `VisualLayout`s (row by row, tiles in processor order, row-major in a tile):

    stages = model_stages(adapter)                       # or a subset
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
  32x32 per 448 px tile, before pixel shuffle). Hooks on the encoder layers rather than
  `output_hidden_states=True`: they fire inside the one full-model forward (no second vision pass;
  the model's own call does not return the tower's hidden states), and each layer is cut down to
  its patches as soon as it is computed.
- projector: the projector's output, [n_visual, d_model]; it is exactly what the LM receives at
  the image-token positions (masked_scatter fills them in this order).
- llm.i: the output of decoder layer i at the row's image-token positions, [n_visual, d_model].
  This is the residual stream *before* the final norm (HF's `hidden_states[-1]` is after it).

Captured tensors stay on the model's device in the model's dtype; the caller decides to move them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from vlmloc.engine.hooks import Call, Hooks
from vlmloc.models.adapter import PreparedBatch, VLMAdapter
from vlmloc.models.layout import VisualLayout

VISION, PROJECTOR, LLM = "vision", "projector", "llm"
STAGE_KINDS = (VISION, PROJECTOR, LLM)

# Where the encoder's layer list lives in the vision towers we support (CLIP, InternViT).


@dataclass(frozen=True)
class Stage:
    """One stage. `grid`: tokens per side of the grid its tokens lie on, per tile."""

    name: str
    kind: str
    index: int  # position in the model's stage order (vision layers, projector, LLM layers)
    layer: int | None  # layer number within its kind; None for the projector
    grid: int
    module: nn.Module = field(repr=False, compare=False)


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


def vision_grid(adapter: VLMAdapter) -> int:
    """Patches per side of one tile: image_size / patch_size (LLaVA-1.5: 24, InternVL: 32)."""
    vc = adapter.model.config.vision_config
    return _side(vc.image_size) // _side(vc.patch_size)


def model_stages(adapter: VLMAdapter) -> list[Stage]:
    """Every stage of the model in positional order: vision.0.., projector, llm.0.."""
    vg, tg = vision_grid(adapter), adapter.tokens_per_side
    stages = [Stage(f"{VISION}.{i}", VISION, 0, i, vg, m) for i, m in enumerate(adapter.vision_layers)]
    stages.append(Stage(PROJECTOR, PROJECTOR, 0, None, tg, adapter.projector))
    stages += [Stage(f"{LLM}.{i}", LLM, 0, i, tg, m) for i, m in enumerate(adapter.layers)]
    return [Stage(s.name, s.kind, i, s.layer, s.grid, s.module) for i, s in enumerate(stages)]


def stage_tokens(stage: Stage, layouts: Sequence[VisualLayout]) -> TokenMeta:
    """Which token of which row, tile and view each captured activation of `stage` belongs to."""
    if stage.kind != VISION:
        n = [lay.n_visual for lay in layouts]
        return TokenMeta(
            batch_row=np.repeat(np.arange(len(layouts)), n),
            tile=np.concatenate([lay.tile for lay in layouts]),
            view=np.concatenate([lay.view for lay in layouts]),
            row=np.concatenate([lay.row for lay in layouts]),
            col=np.concatenate([lay.col for lay in layouts]),
        )
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
        self.patches = vision_grid(adapter) ** 2
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
        def hook(_call: Call, output: Any) -> None:
            x = _tensor(output).detach()
            if stage.kind == VISION:
                if x.shape[1] == self.patches + 1:  # CLS first (CLIP, InternViT): not a grid position
                    x = x[:, 1:]
                x = x.reshape(-1, x.shape[-1])
            elif stage.kind == PROJECTOR:
                x = x.reshape(-1, x.shape[-1])
            else:
                x = x[self._rows, self._pos]
            self._parts.setdefault(stage.name, []).append(x)
            if stage.name == self.last and sum(len(p) for p in self._parts[stage.name]) >= self._expected(stage):
                raise _StopForward

        return hook

    def _expected(self, stage: Stage) -> int:
        return self.n_tiles * self.patches if stage.kind == VISION else self.n_visual

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
