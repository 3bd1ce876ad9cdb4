"""Mean head outputs over a reference set, for mean-ablation of attention heads.

Usage::

    means = head_means(adapter, samples, "localization", n=64)            # clean runs, that task's prompt
    value, tail = means.row_value(layer=12, layout=batch.layouts[i], seq_len=batch.seq_len)
    sl = head_slice(adapter, head)                                         # value [seq_len, H*D], tail [H*D]
    edit = HeadEdit(12, head, value=value[:, sl], tail=tail[sl])

A head's output is its slice of the o_proj input ([batch, seq, n_heads * head_dim], head-major).
The mean at a position averages the reference runs at the position that plays the same part in
their prompts, so a visual token never takes a text token's mean or the other way round. A
prompt is three segments around the image, each aligned on its own:

- prefix (the chat template before the image): right-aligned to the image start;
- image: per visual token, keyed by (view, row, column) in its tile: LLaVA's 24x24 tokens one
  by one; for InternVL the thumbnail's tokens, and the local crops' tokens pooled over tiles (the
  tile count differs between images, so sequence offsets inside the image span do not align);
- text after the image: right-aligned to the sequence end (prompts differ in length by the
  category name; the last token, where the answer is read, always aligns).

Positions a row has and no reference reached take the segment's overall mean. Tokens generated
after the prompt take `tail`: with `answer_mean="text"` (the default) the mean over the text
positions after the image, the positions whose role an answer token shares; `"prompt"` gives the
mean over every prompt position (~93 % visual tokens for LLaVA: an off-distribution value for a
text token). With one reference sample the ablation reproduces that sample's own prompt run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from vlmloc.data.sample import Sample
from vlmloc.engine.heads import capture_heads
from vlmloc.engine.visual_features import prepared_batches
from vlmloc.models.adapter import VLMAdapter
from vlmloc.models.layout import LOCAL, VisualLayout

ANSWER_MEANS = ("text", "prompt")


class _Aligned:
    """Running sums [n_layers, T, D] and counts [T] of a segment indexed by an offset (0 = first)."""

    def __init__(self) -> None:
        self.sums: torch.Tensor | None = None
        self.counts: torch.Tensor | None = None

    def add(self, x: torch.Tensor, index: torch.Tensor) -> None:
        """x: [n_layers, k, D] values at offsets index [k]."""
        size = int(index.max()) + 1 if len(index) else 0
        if self.sums is None:
            self.sums = x.new_zeros(x.shape[0], size, x.shape[2])
            self.counts = x.new_zeros(size)
        elif size > self.sums.shape[1]:
            grow = size - self.sums.shape[1]
            self.sums = torch.cat([self.sums, self.sums.new_zeros(self.sums.shape[0], grow, self.sums.shape[2])], 1)
            self.counts = torch.cat([self.counts, self.counts.new_zeros(grow)])
        self.sums.index_add_(1, index, x)
        self.counts.index_add_(0, index, torch.ones_like(index, dtype=self.counts.dtype))

    def means(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(per offset [L, T, D], seen [T] bool, overall [L, D])."""
        assert self.sums is not None and self.counts is not None
        seen = self.counts > 0
        per = self.sums / self.counts.clamp(min=1)[None, :, None]
        overall = self.sums.sum(1) / self.counts.sum().clamp(min=1)
        return per, seen, overall


@dataclass(frozen=True)
class HeadMeans:
    """Per-segment means, [n_layers, offsets, n_heads * head_dim] each, in the model's dtype.

    prefix[k-1]: k positions before the image start; image: per `image_key`; text[k-1]: k
    positions before the sequence end; *_overall [n_layers, H*D]; tail: generated tokens.
    """

    prefix: torch.Tensor
    prefix_seen: torch.Tensor
    image: torch.Tensor
    image_seen: torch.Tensor
    text: torch.Tensor
    text_seen: torch.Tensor
    prefix_overall: torch.Tensor
    image_overall: torch.Tensor
    text_overall: torch.Tensor
    tail: torch.Tensor
    grid: int  # tokens per tile side, for image_key

    def row_value(self, layer: int, layout: VisualLayout, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(value [seq_len, H*D] by absolute position of a row padded to seq_len, tail [H*D])."""
        dev = self.text.device
        start, end = int(layout.positions.min()), int(layout.positions.max()) + 1
        value = self.text_overall[layer].expand(seq_len, -1).clone()
        k = torch.arange(1, start + 1, device=dev).flip(0)  # offsets before the image start
        value[:start] = _pick(self.prefix[layer], self.prefix_seen, k - 1, self.prefix_overall[layer])
        keys = torch.as_tensor(image_key(layout, self.grid), device=dev)
        value[torch.as_tensor(layout.positions, device=dev)] = _pick(
            self.image[layer], self.image_seen, keys, self.image_overall[layer])
        k = torch.arange(seq_len - end, 0, -1, device=dev)  # offsets before the sequence end
        value[end:] = _pick(self.text[layer], self.text_seen, k - 1, self.text_overall[layer])
        return value, self.tail[layer]


def _pick(per: torch.Tensor, seen: torch.Tensor, index: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    """per[index] where a reference reached that offset, else `fallback`: [len(index), D]."""
    ok = index < per.shape[0]
    if per.shape[0]:
        ok &= seen[index.clamp(max=per.shape[0] - 1)]
    out = fallback.expand(len(index), -1).clone()
    out[ok] = per[index[ok]]
    return out


def image_key(layout: VisualLayout, grid: int) -> np.ndarray:
    """[n_visual] the key of each visual token: (view, row, column within its tile); global view 0, local 1."""
    view_id = (layout.view == LOCAL).astype(np.int64)
    return (view_id * grid + layout.row) * grid + layout.col


@torch.no_grad()
def head_means(
    adapter: VLMAdapter, samples: Sequence[Sample], task: str, n: int, *, batch_size: int = 8, answer_mean: str = "text"
) -> HeadMeans:
    """Mean o_proj inputs of clean runs of the first `n` samples with `task`'s prompt, every layer."""
    if answer_mean not in ANSWER_MEANS:
        raise ValueError(f"answer_mean must be one of {list(ANSWER_MEANS)}, got {answer_mean!r}")
    ref = list(samples)[: int(n)]
    if not ref:
        raise ValueError("head_means needs at least one reference sample")
    prefix, image, text = _Aligned(), _Aligned(), _Aligned()
    grid = None
    for _, batch in prepared_batches(adapter, ref, task, batch_size):
        heads = capture_heads(adapter, batch.inputs)
        stacked = torch.stack([heads[i].float() for i in range(adapter.n_layers)])  # [L, B, T, D]
        mask = batch.inputs["attention_mask"].bool()
        T = batch.seq_len
        for row, layout in enumerate(batch.layouts):
            grid = int(layout.row.max()) + 1 if grid is None else grid
            first = int(torch.nonzero(mask[row])[0])  # left padding ends here
            img0, img1 = int(layout.positions.min()), int(layout.positions.max()) + 1
            x = stacked[:, row]
            dev = x.device
            prefix.add(x[:, first:img0], torch.arange(img0 - first, 0, -1, device=dev) - 1)
            image.add(x[:, torch.as_tensor(layout.positions, device=dev)],
                      torch.as_tensor(image_key(layout, grid), device=dev))
            text.add(x[:, img1:T], torch.arange(T - img1, 0, -1, device=dev) - 1)
    (p, ps, po), (i, is_, io), (t, ts, to) = prefix.means(), image.means(), text.means()
    if answer_mean == "text":
        tail = to
    else:  # every prompt position of every reference, weighted by its count
        total = prefix.counts.sum() + image.counts.sum() + text.counts.sum()
        tail = (prefix.sums.sum(1) + image.sums.sum(1) + text.sums.sum(1)) / total
    dtype = adapter.model.dtype
    cast = [v.to(dtype) for v in (p, i, t, po, io, to, tail)]
    return HeadMeans(cast[0], ps, cast[1], is_, cast[2], ts, cast[3], cast[4], cast[5], cast[6], grid)
