"""Attention knockout: block attention from a set of query positions to a set of key positions in
chosen LM layers, per batch row.

Usage::

    specs = [Knockout(queries=post_image, keys=object_pos, layers=range(0, 6)), Knockout.none()]
    with knockout(adapter, specs):
        adapter.model(**batch.inputs)

A forward pre-hook on each affected layer's self_attn rewrites its `attention_mask`: with sdpa
the mask is bool (True = attend) or None (then the causal mask is built here); with eager it is
additive float and blocked pairs get finfo.min (never -inf, which turns a fully masked row into
NaN). A query row whose every key would be blocked raises instead of passing silently.
Positions are absolute sequence positions of the (padded) row; with a KV cache the hook maps
the current queries to positions past_len .. past_len + q_len - 1.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from vlmloc.engine.hooks import Call, Hooks
from vlmloc.models.adapter import VLMAdapter


@dataclass(frozen=True)
class Knockout:
    """One row's knockout: queries x keys (absolute positions) blocked in `layers`."""

    queries: np.ndarray
    keys: np.ndarray
    layers: frozenset[int]

    @classmethod
    def make(cls, queries: Iterable[int], keys: Iterable[int], layers: Iterable[int]) -> Knockout:
        return cls(np.asarray(list(queries), dtype=np.int64), np.asarray(list(keys), dtype=np.int64), frozenset(int(x) for x in layers))

    @classmethod
    def none(cls) -> Knockout:
        return cls.make([], [], [])

    @property
    def empty(self) -> bool:
        return not self.layers or len(self.queries) == 0 or len(self.keys) == 0


def post_image_queries(layout_positions: np.ndarray, seq_len: int, extra: int = 0) -> np.ndarray:
    """Every position after the image span (the prompt after the image and `extra` generated tokens)."""
    return np.arange(int(layout_positions.max()) + 1, seq_len + extra, dtype=np.int64)


def _position_masks(specs: Sequence[Knockout], length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(query mask, key mask), each [batch, length] bool, built with one scatter each on `device`."""

    def scatter(field: str) -> torch.Tensor:
        rows = [np.full(len(getattr(s, field)), i) for i, s in enumerate(specs)]
        cols = [getattr(s, field) for s in specs]
        r = torch.as_tensor(np.concatenate(rows) if rows else np.zeros(0, np.int64), device=device)
        c = torch.as_tensor(np.concatenate(cols) if cols else np.zeros(0, np.int64), device=device)
        keep = c < length
        m = torch.zeros(len(specs), length, dtype=torch.bool, device=device)
        m[r[keep], c[keep]] = True
        return m

    return scatter("queries"), scatter("keys")


def _block_matrix(active: torch.Tensor, masks: tuple[torch.Tensor, torch.Tensor], q_len: int, k_len: int) -> torch.Tensor:
    """[batch, 1, q_len, k_len] bool, True = blocked, for the current queries (positions k_len - q_len
    .. k_len - 1): the layer is active for the row & query mask & key mask. active: [batch] bool;
    masks: (query, key) position masks [batch, >= k_len]."""
    qmask, kmask = masks
    past = k_len - q_len
    return active[:, None, None, None] & qmask[:, None, past:k_len, None] & kmask[:, None, None, :k_len]


def _causal(batch: int, q_len: int, k_len: int, device: torch.device) -> torch.Tensor:
    past = k_len - q_len
    q = torch.arange(q_len, device=device)[:, None] + past
    k = torch.arange(k_len, device=device)[None, :]
    return (k <= q).view(1, 1, q_len, k_len).expand(batch, 1, q_len, k_len)


def apply_block(mask: torch.Tensor | None, block: torch.Tensor, check: bool = True) -> torch.Tensor:
    """Combine an attention mask (bool allow / float additive / None = causal) with a block matrix.

    Raises when the knockout leaves a query row that could attend to something with nothing
    (check=False skips the test, which waits for the GPU, where it cannot fail).
    """
    b, _, q_len, k_len = block.shape
    if mask is None:
        mask = _causal(b, q_len, k_len, block.device)
    mask = mask.expand(b, 1, q_len, k_len)
    floor = torch.finfo(mask.dtype).min / 2 if mask.dtype.is_floating_point else None
    allowed = mask if floor is None else mask > floor
    after = allowed & ~block
    if check and (allowed.any(-1) & ~after.any(-1)).any():
        raise ValueError("attention knockout would block every key of some query row; shrink the key set")
    return after if floor is None else mask.masked_fill(block, torch.finfo(mask.dtype).min)


@contextlib.contextmanager
def knockout(adapter: VLMAdapter, specs: Sequence[Knockout]) -> Iterator[None]:
    """Install per-row knockouts for the calls inside the block.

    Everything the hooks need is decided on the host or built once on the device (which rows each
    layer blocks, the position masks), so a decoding step costs a few tensor operations per
    blocked layer and never waits for the GPU: a wait per layer and step would serialise the host's
    kernel launches with the GPU's work.
    """
    layers = sorted(set().union(*(s.layers for s in specs if not s.empty))) if specs else []
    # the last position any spec names: masks built this long cover every call of the block
    last = max((int(max(s.queries.max(), s.keys.max())) for s in specs if not s.empty), default=-1)
    last_key = max((int(s.keys.max()) for s in specs if not s.empty), default=-1)
    built: dict = {}  # "masks" -> (query, key) [batch, length]; layer -> [batch] bool active rows

    def masks(k_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        have = built.get("masks")
        if have is None or have[0].shape[1] < k_len or have[0].device != device:
            built["masks"] = _position_masks(specs, max(k_len, last + 1), device)
        return built["masks"]

    def make_hook(layer: int):
        def block_keys(call: Call) -> Call | None:
            hidden, mask = call.hidden, call.attention_mask
            q_len = hidden.shape[1]
            # the layer's own cache length: earlier layers were already updated in this forward
            k_len = call.past_length(layer) + q_len if mask is None else mask.shape[-1]
            if layer not in built:
                built[layer] = torch.tensor([layer in s.layers and not s.empty for s in specs], device=hidden.device)
            block = _block_matrix(built[layer], masks(k_len, hidden.device), q_len, k_len)
            # one query alone always keeps its own key unless a spec blocks it: then nothing to test
            check = q_len > 1 or last_key >= k_len - q_len
            return call.replace(attention_mask=apply_block(mask, block, check))

        return block_keys

    hooks = Hooks()
    for layer in layers:
        hooks.before(adapter.self_attn(layer), make_hook(layer))
    with hooks:
        yield
