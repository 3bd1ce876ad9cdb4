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

    def _held(self) -> bool:
        """Whether `keys` is still the view of this layer's buffer (not replaced, e.g. by
        batch_select_indices, which indexes a copy)."""
        return self._buffers is not None and self.keys is not None and self.keys.numel() > 0 and \
            self.keys.data_ptr() == self._buffers[0].data_ptr() and self.keys.shape[0] == self._buffers[0].shape[0]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        filled = self.get_seq_length()
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


def rows_in_place(cache: Any, index: torch.Tensor, capacity: int) -> Any:
    """`cache` holding rows `index` of its rows (a row may repeat: one sample's prefix for many
    condition rows), each plain DynamicLayer turned into an InPlaceLayer of `capacity` positions.
    Layer by layer, the selected rows are written straight into the new buffer, so the expanded
    cache exists once (batch_select_indices followed by a first update would hold it twice)."""
    for layer in getattr(cache, "layers", ()):
        if type(layer) is not DynamicLayer:
            layer.batch_select_indices(index)
            continue
        k, v = layer.keys, layer.values
        InPlaceLayer.adopt(layer, capacity)
        if not layer.is_initialized or k.numel() == 0:
            continue
        filled = k.shape[-2]
        layer._rebuffer(k[index], v[index], filled, max(capacity, filled))
    return cache
