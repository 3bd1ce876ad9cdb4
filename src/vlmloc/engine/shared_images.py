"""Run the vision encoder once per distinct image (or tile) of a batch.

Batches mix conditions of one sample (`vlmloc.evaluation.length_order` keeps a sample's rows
together), so a batch of 8 rows often holds one image 8 times, and the vision encoder, which
treats every row of its pixel batch on its own, would compute the same features 8 times.

Usage::

    with vision_once_per_image(adapter):
        adapter.model.generate(**batch.inputs, ...)   # the encoder sees each distinct row once

A hook before the encoder finds rows of `pixel_values` ([n_images_or_tiles, 3, H, W]) that are
exactly equal, passes the distinct ones, and a hook after it copies each result back to every
row that had that input, so the model downstream sees the output it would have computed (equal
to it wherever the encoder's arithmetic does not depend on the batch size; bitwise for CLIP on
CPU; tests/test_token_experiments.py). Pixel inputs that are not one image or tile per row
(Qwen-VL's flattened patches, [n_patches, patch_dim]) pass through untouched.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from vlmloc.engine.hooks import Call, Hooks
from vlmloc.models.adapter import VLMAdapter


def distinct_rows(pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """pixels [n, ...] -> (indices of the distinct rows [u], first occurrence order; inverse [n]:
    for each row the index among them of the row equal to it)."""
    flat = pixels.reshape(pixels.shape[0], -1)
    sums = flat.float().sum(-1).tolist()  # a cheap key; equal rows are then confirmed exactly
    firsts: list[int] = []
    inverse: list[int | None] = [None] * len(sums)
    by_sum: dict[float, list[int]] = {}
    for i, key in enumerate(sums):
        by_sum.setdefault(key, []).append(i)
    for rows in by_sum.values():
        if len(rows) == 1:  # a sum of its own: distinct, nothing to confirm
            firsts.append(rows[0])
            inverse[rows[0]] = len(firsts) - 1
            continue
        while rows:
            # one comparison of the group's rows with its first (a single wait for the GPU per group)
            same = (flat[rows] == flat[rows[0]]).all(-1).tolist()
            firsts.append(rows[0])
            for r, eq in zip(rows, same):
                if eq:
                    inverse[r] = len(firsts) - 1
            rows = [r for r, eq in zip(rows, same) if not eq]
    order = sorted(range(len(firsts)), key=lambda u: firsts[u])  # first occurrence order
    rank = {u: k for k, u in enumerate(order)}
    dev = pixels.device
    return (torch.tensor([firsts[u] for u in order], device=dev),
            torch.tensor([rank[u] for u in inverse], device=dev))  # type: ignore[index]


def _expand(value: Any, inverse: torch.Tensor, n_distinct: int) -> Any:
    """Every tensor of `value` (a tensor, a tuple / list of them, or a ModelOutput) whose first axis
    has the distinct rows, indexed back to one entry per original row."""
    if isinstance(value, torch.Tensor):
        return value[inverse] if value.dim() and value.shape[0] == n_distinct else value
    if isinstance(value, (tuple, list)) and not hasattr(value, "keys"):
        return type(value)(_expand(v, inverse, n_distinct) for v in value)
    if hasattr(value, "keys"):  # transformers' ModelOutput (a dataclass and an ordered dict)
        return type(value)(**{k: _expand(value[k], inverse, n_distinct) for k in value.keys()})
    return value


@contextlib.contextmanager
def vision_once_per_image(adapter: VLMAdapter) -> Iterator[None]:
    """Inside the block, every call of the vision encoder computes each distinct pixel row once."""
    pending: list[tuple[torch.Tensor, int] | None] = []  # per encoder call, outermost first

    def before(call: Call) -> Call | None:
        in_args = bool(call.args) and isinstance(call.args[0], torch.Tensor)
        pixels = call.args[0] if in_args else call.kwargs.get("pixel_values")
        if not isinstance(pixels, torch.Tensor) or pixels.dim() != 4 or pixels.shape[0] < 2:
            pending.append(None)
            return None
        firsts, inverse = distinct_rows(pixels)
        if len(firsts) == pixels.shape[0]:
            pending.append(None)
            return None
        pending.append((inverse, len(firsts)))
        return call.replace(hidden=pixels[firsts]) if in_args else call.replace(pixel_values=pixels[firsts])

    def after(_call: Call, output: Any) -> Any:
        entry = pending.pop()
        return None if entry is None else _expand(output, *entry)

    with Hooks().before(adapter.vision_tower, before).after(adapter.vision_tower, after):
        yield
