"""Attention over a shared prefix equals attention over each row's own copy of it."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, LlamaConfig

from vlmloc.engine.kv_cache import SharedPrefixLayer, share_rows
from vlmloc.engine.prefix_attention import shared_prefix_attention


def _reference(query, keys, values, allowed, scale):
    """Plain float64 attention: query [rows, heads, q, d] over keys / values [rows, kv_heads, k, d] (each
    key head repeated for its query heads), allowed [rows, 1, q, k] bool."""
    g = query.shape[1] // keys.shape[1]
    k = keys.double().repeat_interleave(g, dim=1)
    v = values.double().repeat_interleave(g, dim=1)
    scores = (query.double() @ k.transpose(-1, -2)) * scale
    weights = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    return (weights @ v).transpose(1, 2)  # [rows, q, heads, d]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("q_len", [1, 4])
def test_shared_prefix_attention_equals_each_row_attending_its_own_copy(q_len, dtype, tol):
    """Three units serving five rows unevenly (2, 1, 2; one unit's rows not adjacent), GQA (4 query
    heads on 2 key heads), padding and knocked-out keys in the mask, several queries per row; in
    float32 and in bfloat16 (the reference in float64 on the same rounded inputs)."""
    gen = torch.Generator().manual_seed(0)
    units, kv_heads, heads, d, p, s = 3, 2, 4, 8, 7, 5
    unit_of_row = torch.tensor([0, 2, 0, 1, 2])
    rows = len(unit_of_row)
    prefix_k, prefix_v = torch.randn(units, kv_heads, p, d, generator=gen), torch.randn(units, kv_heads, p, d, generator=gen)
    own_k, own_v = torch.randn(rows, kv_heads, s, d, generator=gen), torch.randn(rows, kv_heads, s, d, generator=gen)
    query = torch.randn(rows, heads, q_len, d, generator=gen)
    prefix_k, prefix_v, own_k, own_v, query = (t.to(dtype) for t in (prefix_k, prefix_v, own_k, own_v, query))

    config = LlamaConfig(num_hidden_layers=1, hidden_size=heads * d, num_attention_heads=heads, num_key_value_heads=kv_heads)
    cache = DynamicCache(config=config)
    cache.update(prefix_k, prefix_v, 0)
    share_rows(cache, unit_of_row, capacity=s)
    layer = cache.layers[0]
    got_k, got_v = cache.update(own_k, own_v, 0)
    assert isinstance(layer, SharedPrefixLayer) and layer.rows_per_unit == 2 and layer.slot.tolist() == [0, 0, 1, 0, 1]
    assert torch.equal(got_k, own_k) and cache.get_seq_length() == p + s

    # causal over the whole sequence; row 1's first own position is padding; row 3 blocks prefix keys 2-4
    k_pos = torch.arange(p + s)
    causal = (k_pos[None, :] <= torch.arange(p + s - q_len, p + s)[:, None]).expand(rows, 1, q_len, p + s)
    allowed = causal.clone()
    allowed[1, :, :, p] = False
    allowed[3, :, :, 2:5] = False
    scale = d ** -0.5
    copies_k = torch.cat([prefix_k[unit_of_row], own_k], 2)  # what each row's own copy of the prefix would hold
    copies_v = torch.cat([prefix_v[unit_of_row], own_v], 2)
    want = _reference(query, copies_k, copies_v, allowed, scale)
    got = shared_prefix_attention(query, got_k, got_v, allowed, layer, scale)
    assert got.shape == (rows, q_len, heads, d) and got.dtype == query.dtype
    assert (got.double() - want).abs().max() < tol
    # the mask is applied: with the causal mask alone rows 1 and 3 read other keys, the rest the same
    plain = shared_prefix_attention(query, got_k, got_v, causal, layer, scale)
    changed = [(plain[r].double() - want[r]).abs().max().item() > 10 * tol for r in range(rows)]
    assert changed == [False, True, False, True, False]
    # None = causal, the queries being the sequence's last q positions
    none = shared_prefix_attention(query, got_k, got_v, None, layer, scale)
    assert (none.double() - _reference(query, copies_k, copies_v, causal, scale)).abs().max() < tol
