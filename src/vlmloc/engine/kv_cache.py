"""A KV cache that grows in place: generation without copying the cache at every step.

transformers' DynamicCache appends each step's keys and values with `torch.cat`, so every decode
step copies every row's whole cache, in every layer, and the allocator hands out a new, slightly
larger block each time. At a few rows that is noise; at 160 rows of a 600-token prompt it is
~50 GB moved per step and it made decoding on one H200 several times slower than at 32 rows
(`scripts/profile_generate.py`). Here each layer writes into a buffer sized for the whole call
(prompt + generated tokens) and its `keys` / `values` are views of the filled part, so a step
writes one position and reads the cache once. What a layer holds is unchanged, so the model
computes the same numbers.

    cache = grow_in_place(DynamicCache(config=adapter.text_config), capacity=seq_len + new_tokens)
    model.generate(**inputs, past_key_values=cache, ...)   # under the cache keyword of this release
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import DynamicLayer


class InPlaceLayer(DynamicLayer):
    """A DynamicLayer whose keys and values [batch, kv_heads, seq, head_dim] are views of a buffer of
    `capacity` positions; an update writes in place (a buffer that fills up is doubled)."""

    capacity: int
    _buffers: tuple[torch.Tensor, torch.Tensor] | None

    @classmethod
    def adopt(cls, layer: DynamicLayer, capacity: int) -> InPlaceLayer:
        """Turn an existing DynamicLayer (empty or holding a prefix) into one; its state is kept."""
        layer.__class__ = cls
        layer.capacity, layer._buffers = int(capacity), None  # type: ignore[attr-defined]
        return layer  # type: ignore[return-value]

    def stored(self) -> int:
        """Positions this layer's own buffers hold (`get_seq_length` may count more: SharedPrefixLayer)."""
        return 0 if not self.is_initialized or self.keys is None or self.keys.numel() == 0 else int(self.keys.shape[-2])

    def _held(self) -> bool:
        """Whether `keys` is still the view of this layer's buffer (not replaced, e.g. by
        batch_select_indices, which indexes a copy)."""
        return self._buffers is not None and self.keys is not None and self.keys.numel() > 0 and \
            self.keys.data_ptr() == self._buffers[0].data_ptr() and self.keys.shape[0] == self._buffers[0].shape[0]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        filled = self.stored()
        end = filled + key_states.shape[-2]
        if not self._held() or end > self._buffers[0].shape[-2]:  # type: ignore[index]
            kept = (self.keys, self.values) if filled else (key_states, value_states)
            self._rebuffer(*kept, filled, max(self.capacity, end, 2 * filled))
        k, v = self._buffers  # type: ignore[misc]
        k[:, :, filled:end] = key_states
        v[:, :, filled:end] = value_states
        self.keys, self.values = k[:, :, :end], v[:, :, :end]
        return self.keys, self.values

    def _rebuffer(self, keys: torch.Tensor, values: torch.Tensor, filled: int, size: int) -> None:
        """New buffers of `size` positions, shaped as keys / values [batch, kv_heads, *, head_dim],
        holding their first `filled` positions."""
        k = keys.new_empty(keys.shape[0], keys.shape[1], size, keys.shape[3])
        v = values.new_empty(values.shape[0], values.shape[1], size, values.shape[3])
        if filled:
            k[:, :, :filled] = keys[:, :, :filled]
            v[:, :, :filled] = values[:, :, :filled]
        self._buffers = (k, v)
        self.keys, self.values = k[:, :, :filled], v[:, :, :filled]


def grow_in_place(cache: Any, capacity: int) -> Any:
    """`cache` (a DynamicCache, empty or holding a prefix) with each plain DynamicLayer turned into an
    InPlaceLayer of `capacity` positions; other layer kinds (sliding windows) are left as they are."""
    for layer in getattr(cache, "layers", ()):
        if type(layer) is DynamicLayer:
            InPlaceLayer.adopt(layer, capacity)
    return cache


class SharedPrefixLayer(InPlaceLayer):
    """The layer of a call whose rows share image prefixes: each prefix's keys and values
    [units, kv_heads, prefix_len, head_dim] are held once, row r's
    being unit `unit_of_row[r]`'s, and `keys` / `values` [rows, kv_heads, *, head_dim] hold only the
    rows' own positions after the prefix (the rest of the prompt, the answer), in place. Positions
    count from the prefix's start: `get_seq_length` is prefix_len + the rows' own positions, so masks,
    position ids and knockouts see the whole sequence. Only `engine.prefix_attention` can attend over
    such a layer: it reads each unit's prefix once for all of that unit's rows."""

    prefix_keys: torch.Tensor
    prefix_values: torch.Tensor
    unit_of_row: torch.Tensor  # [rows] long
    slot: torch.Tensor  # [rows] long: the row's rank among its unit's rows
    rows_per_unit: int  # the most rows of one unit

    @property
    def prefix_len(self) -> int:
        return int(self.prefix_keys.shape[-2])

    def get_seq_length(self) -> int:
        return self.prefix_len + self.stored()

    @classmethod
    def share(cls, layer: DynamicLayer, unit_of_row: torch.Tensor, slot: torch.Tensor, rows_per_unit: int,
              capacity: int) -> SharedPrefixLayer:
        """Turn a DynamicLayer holding one prefix per unit into one for rows `unit_of_row` ([rows] long,
        on the layer's device; `slot`, `rows_per_unit`: `share_rows`'s grouping) with room for
        `capacity` positions of their own."""
        keys, values = layer.keys, layer.values
        shared = cls.adopt(layer, capacity)
        shared.prefix_keys, shared.prefix_values = keys, values
        shared.unit_of_row, shared.slot, shared.rows_per_unit = unit_of_row, slot, rows_per_unit
        # the rows' own positions start empty; the first update sizes their buffers [rows, ...]
        shared.keys, shared.values = keys.new_empty(0), values.new_empty(0)
        return shared


def share_rows(cache: Any, unit_of_row: torch.Tensor, capacity: int) -> Any:
    """`cache` holding one prefix per unit, turned into a cache of rows `unit_of_row` ([rows] long; a
    unit may serve many rows: one sample under many conditions) with room for `capacity` positions
    of each row's own: each plain DynamicLayer becomes a SharedPrefixLayer, which holds the prefixes
    once instead of a copy per row; other layer kinds (sliding windows) get each row's copy."""
    # a row's rank among the rows of its unit: rows group per unit in one [units, rows_per_unit] grid;
    # the same for every layer, so computed once (one wait for the GPU per call, not one per layer)
    same = unit_of_row[:, None] == unit_of_row[None, :]
    slot, rows_per_unit = same.tril(-1).sum(1), int(same.sum(1).max())
    for layer in getattr(cache, "layers", ()):
        if type(layer) is DynamicLayer and layer.is_initialized and layer.keys.numel():
            SharedPrefixLayer.share(layer, unit_of_row, slot, rows_per_unit, capacity)
        else:
            layer.batch_select_indices(unit_of_row)
    return cache
