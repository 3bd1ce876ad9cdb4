"""Mean head outputs over a reference set, for mean-ablation of attention heads.

Usage::

    means = head_means(adapter, samples, "localization", n=64)      # clean runs, that task's prompt
    value, tail = means.row_value(layer=12, seq_len=batch.seq_len)  # [seq_len, H*D], [H*D]
    sl = head_slice(adapter, head)
    edit = HeadEdit(12, head, value=value[:, sl], tail=tail[sl])

A head's output is its slice of the o_proj input ([batch, seq, n_heads * head_dim], head-major).
Prompts differ in length (category names, InternVL tile counts) and batches are left padded,
so the per-position mean is right-aligned: index -1 averages every reference prompt's last token,
-2 the one before, and so on, over the prompts long enough to have that position. A row of a
batch padded to seq_len takes the last seq_len entries (positions the reference prompts never
reach take the overall mean); tokens generated after the prompt take the overall mean (`tail`),
the mean over every prompt position of every reference sample. With one reference sample the
ablation therefore reproduces that sample's own run exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from vlmloc.data.sample import Sample
from vlmloc.engine.heads import capture_heads
from vlmloc.models.adapter import VLMAdapter


class HeadMeans(NamedTuple):
    """per_position: [n_layers, T_max, n_heads * head_dim], right-aligned to the sequence end.
    overall: [n_layers, n_heads * head_dim]. Both in the model's dtype, on its device."""

    per_position: torch.Tensor
    overall: torch.Tensor

    def row_value(self, layer: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(value [seq_len, H*D] indexed by absolute position of a row padded to seq_len, tail [H*D])."""
        per, tail = self.per_position[layer], self.overall[layer]
        if seq_len <= per.shape[0]:
            return per[per.shape[0] - seq_len :], tail
        front = tail.expand(seq_len - per.shape[0], -1)
        return torch.cat([front, per]), tail


@torch.no_grad()
def head_means(adapter: VLMAdapter, samples: Sequence[Sample], task: str, n: int, *, batch_size: int = 8) -> HeadMeans:
    """Mean o_proj inputs of clean runs of the first `n` samples with `task`'s prompt, every layer."""
    ref = list(samples)[: int(n)]
    if not ref:
        raise ValueError("head_means needs at least one reference sample")
    sums: torch.Tensor | None = None  # [n_layers, T, H*D] float32, right-aligned
    counts: torch.Tensor | None = None  # [T]
    for start in range(0, len(ref), batch_size):
        chunk = ref[start : start + batch_size]
        batch = adapter.prepare([s.load_image() for s in chunk], [adapter.prompt(task, s.category) for s in chunk])
        heads = capture_heads(adapter, batch.inputs)
        keep = batch.inputs["attention_mask"].to(torch.float32)  # [B, T]; left padding = 0
        batch_sum = torch.stack([torch.einsum("btd,bt->td", heads[i].float(), keep) for i in range(adapter.n_layers)])
        batch_count = keep.sum(0)
        sums, counts = _add_right_aligned(sums, counts, batch_sum, batch_count)
    assert sums is not None and counts is not None
    per_position = sums / counts.clamp(min=1)[None, :, None]
    overall = sums.sum(1) / counts.sum()
    dtype = adapter.model.dtype
    return HeadMeans(per_position.to(dtype), overall.to(dtype))


def _add_right_aligned(
    sums: torch.Tensor | None, counts: torch.Tensor | None, new_sum: torch.Tensor, new_count: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Add [L, T, D] / [T] into running right-aligned sums, growing them on the left when needed."""
    if sums is None or counts is None:
        return new_sum, new_count
    grow = new_sum.shape[1] - sums.shape[1]
    if grow > 0:
        sums = torch.cat([sums.new_zeros(sums.shape[0], grow, sums.shape[2]), sums], dim=1)
        counts = torch.cat([counts.new_zeros(grow), counts])
    t = new_sum.shape[1]
    sums[:, -t:] += new_sum
    counts[-t:] += new_count
    return sums, counts
