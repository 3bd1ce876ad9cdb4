"""Edits of the visual tokens at the LLM input (after the projector, before the first LM layer).

Usage::

    edits = [
        [TokenEdit.replace(positions, mean_embedding)],      # row 0: ablate with the mean
        [TokenEdit.copy(dst=positions, src=positions[perm])], # row 1: shuffle
        [],                                                   # row 2: clean
    ]
    with edit_lm_input(adapter, edits):
        adapter.model(**batch.inputs)          # or generate(...): edits apply at prefill only

Every edit is given per batch row, so one forward pass carries as many conditions as rows.
Two kinds cover the token-level experiments: `replace` (set positions to one vector: ablation)
and `copy` (positions take the embeddings found at other positions of the same clean row:
shuffle, object extension). Copies read the unedited embeddings, so a permutation is a true
permutation whatever the order of its entries.

Where visual features also enter the LM after its first layers (Qwen3-VL's DeepStack, the family
table's `lm_visual_features`), the same edits apply to those features, so a token edited at the
input is edited everywhere its image content enters: copies move them along with the token, and
a replaced token gets no later addition (zero), its image content gone.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from vlmloc.engine.hooks import Call, Hooks
from vlmloc.models.adapter import VLMAdapter


@dataclass(frozen=True)
class TokenEdit:
    """One edit of one row. dst: [k] sequence positions. Either src: [k] positions or value: [hidden]."""

    dst: np.ndarray
    src: np.ndarray | None = None
    value: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if (self.src is None) == (self.value is None):
            raise ValueError("a TokenEdit needs exactly one of src (copy) or value (replace)")
        if self.src is not None and len(self.src) != len(self.dst):
            raise ValueError(f"copy edit with {len(self.dst)} destinations but {len(self.src)} sources")

    @classmethod
    def replace(cls, dst: Sequence[int] | np.ndarray, value: torch.Tensor) -> TokenEdit:
        return cls(dst=np.asarray(dst, dtype=np.int64), value=value)

    @classmethod
    def copy(cls, dst: Sequence[int] | np.ndarray, src: Sequence[int] | np.ndarray) -> TokenEdit:
        return cls(dst=np.asarray(dst, dtype=np.int64), src=np.asarray(src, dtype=np.int64))

    @property
    def n(self) -> int:
        return len(self.dst)


def apply_edits(embeds: torch.Tensor, edits: Sequence[Sequence[TokenEdit]]) -> torch.Tensor:
    """[batch, seq, hidden] -> edited copy. edits[i] lists the edits of row i (applied in order)."""
    if len(edits) != embeds.shape[0]:
        raise ValueError(f"{len(edits)} rows of edits for a batch of {embeds.shape[0]}")
    clean = embeds
    out = embeds.clone()
    for row, row_edits in enumerate(edits):
        for edit in row_edits:
            if edit.n == 0:
                continue
            dst = torch.as_tensor(edit.dst, device=embeds.device)
            if edit.src is not None:
                out[row, dst] = clean[row, torch.as_tensor(edit.src, device=embeds.device)]
            else:
                out[row, dst] = edit.value.to(device=embeds.device, dtype=embeds.dtype)
    return out


@contextlib.contextmanager
def edit_lm_input(adapter: VLMAdapter, edits: Sequence[Sequence[TokenEdit]]) -> Iterator[None]:
    """Install per-row edits on the LM input for the calls inside the block (prefill only).

    A hook before the language model rewrites `inputs_embeds` at the prefill (an empty KV cache);
    decoding steps then attend to the cached, edited prefix and pass through untouched.
    """
    if not any(len(row) for row in edits):
        yield
        return

    side = adapter.facts.lm_visual_features

    def edit(call: Call) -> Call | None:
        if call.inputs_embeds is None or not call.is_prefill:
            return None
        changes: dict = {"inputs_embeds": apply_edits(call.inputs_embeds, edits)}
        if side is not None and call.kwargs.get(side[0]) is not None:
            feats, mask = call.kwargs[side[0]], call.kwargs[side[1]]
            changes[side[0]] = [edit_visual_features(f, mask, edits) for f in feats]
        return call.replace(**changes)

    with Hooks().before(adapter.language_model, edit):
        yield


def edit_visual_features(features: torch.Tensor, mask: torch.Tensor, edits: Sequence[Sequence[TokenEdit]]) -> torch.Tensor:
    """[n_visual, hidden] features of the True positions of mask [batch, seq] (row-major) -> edited copy:
    copies as at the LM input, replaced positions set to zero."""
    b, t = mask.shape
    dense = features.new_zeros(b, t, features.shape[-1])
    dense[mask] = features
    zero = features.new_zeros(features.shape[-1])
    side = [[e if e.src is not None else TokenEdit.replace(e.dst, zero) for e in row] for row in edits]
    return apply_edits(dense, side)[mask]
