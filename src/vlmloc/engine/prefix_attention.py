"""Attention over a shared image prefix: each prefix's keys and values read once for all its rows.

A knockout call holds one sample under 77 conditions: 77 rows whose first ~600 positions (the
image prefix) are the same. Copied to every row, that prefix is what each decoding step reads
most (77 copies per sample, ~50 GB at 160 rows of LLaVA-7B) and what bounds the rows per call.
Held once per unit (`engine.kv_cache.SharedPrefixLayer`), the prefix needs an attention that
knows the rows share it: this one puts each unit's rows side by side as one block of queries, so
one matrix product per unit scores them all against its prefix, and the rows' own positions (the
rest of the prompt, the answer) are scored per row. One softmax over both, under the call's mask
[rows, 1, q, prefix + own] (padding, causality, knockouts: the mask covers the whole sequence, so
knockout hooks act as on any row), and the two weighted sums added. The numerics are SDPA's
kernels': operands in the model's dtype, products accumulated in float32, scores and softmax in
float32, the weights rounded to the values' dtype for their product; the output in the query's.

    with attend_shared_prefix(adapter, cache):   # cache from engine.prefix.share_image_prefix
        adapter.model.generate(..., cache)        # under the cache keyword of this release

Inside the block the language model's attention implementation is `NAME`, registered here with
transformers' attention and mask interfaces (SDPA's mask: bool, True = attend); a layer that
holds no shared prefix (or any call outside the block) runs transformers' SDPA unchanged. The
layer reaches the attention function as a keyword argument that a pre-hook on each `self_attn`
adds through the hook core (the attention modules pass their extra keywords on to the attention
function). `attend` has transformers' attention-function signature (module, query, key, value,
mask, dropout, scaling, **kwargs; the same in 5.17-5.25) and reads no other keyword. Only
full-attention layers are shared (`kv_cache.share_rows`), so no sliding window applies here.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from vlmloc.engine.hooks import Hooks
from vlmloc.engine.kv_cache import SharedPrefixLayer
from vlmloc.models.adapter import VLMAdapter

NAME = "vlmloc_shared_prefix"
KEYWORD = "shared_prefix"  # the keyword that carries a layer's SharedPrefixLayer to `attend`


def attend(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
           attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
           shared_prefix: SharedPrefixLayer | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: query [rows, heads, q, head_dim], key / value
    [rows, kv_heads, k, head_dim] -> ([rows, q, heads, head_dim], None). With `shared_prefix`, key /
    value hold the rows' own positions only and the layer holds the prefixes; else SDPA's."""
    if shared_prefix is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    return shared_prefix_attention(query, key, value, attention_mask, shared_prefix, scaling), None


def shared_prefix_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                            layer: SharedPrefixLayer, scaling: float | None = None) -> torch.Tensor:
    """[rows, q, heads, head_dim] attention of query [rows, heads, q, head_dim] over each row's unit's
    prefix (layer.prefix_keys / prefix_values [units, kv_heads, p, head_dim]) followed by its own
    positions key / value [rows, kv_heads, s, head_dim]; mask [rows, 1, q, p + s] bool (True =
    attend: SDPA's mask, which `NAME` is registered with) or None (causal: the queries are the last
    q positions)."""
    rows, heads, q, d = query.shape
    units, kv_heads, p, _ = layer.prefix_keys.shape
    s, m = key.shape[-2], layer.rows_per_unit
    g = heads // kv_heads  # query heads per key head (GQA): head h reads key head h // g
    unit, slot = layer.unit_of_row, layer.slot
    scale = scaling if scaling is not None else d ** -0.5
    grouped = query.reshape(rows, kv_heads, g * q, d)

    def by_unit(x: torch.Tensor) -> torch.Tensor:
        """[rows, kv_heads, g * q, n] -> [units, kv_heads, rows_per_unit * g * q, n], absent rows zero."""
        grid = x.new_zeros(units, m, *x.shape[1:])
        grid[unit, slot] = x
        return grid.transpose(1, 2).reshape(units, kv_heads, m * g * q, x.shape[-1])

    def by_row(x: torch.Tensor) -> torch.Tensor:
        """by_unit's inverse: [units, kv_heads, rows_per_unit * g * q, n] -> [rows, kv_heads, g * q, n]."""
        return x.view(units, kv_heads, m, g * q, x.shape[-1]).transpose(1, 2)[unit, slot]

    prefix_scores = by_row(_matmul32(by_unit(grouped), layer.prefix_keys.transpose(-1, -2)))
    own_scores = _matmul32(grouped, key.transpose(-1, -2))
    scores = torch.cat([prefix_scores, own_scores], -1).mul_(scale).view(rows, heads, q, p + s)
    if mask is None:
        k = torch.arange(p + s, device=query.device)
        mask = k[None, :] <= torch.arange(p + s - q, p + s, device=query.device)[:, None]
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)  # never -inf: no NaN rows
    # the weights in the values' dtype, as SDPA's kernels multiply them
    weights = torch.softmax(scores, dim=-1).to(value.dtype).view(rows, kv_heads, g * q, p + s)
    out = by_row(_matmul32(by_unit(weights[..., :p]), layer.prefix_values)) + _matmul32(weights[..., p:], value)
    return out.view(rows, heads, q, d).transpose(1, 2).to(query.dtype).contiguous()


def _matmul32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a [..., n, k] @ b [..., k, m] in float32: half-precision operands multiplied with float32
    accumulation and output where the GPU's batched product offers it (torch.bmm's out_dtype), so no
    float32 copy of the keys and values is made; else on float32 copies."""
    if a.dtype in (torch.bfloat16, torch.float16) and _bmm_to_float32(a.device):
        out = torch.bmm(a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:]), out_dtype=torch.float32)
        return out.view(*a.shape[:-1], b.shape[-1])
    return a.float() @ b.float()


@functools.cache
def _bmm_to_float32(device: torch.device) -> bool:
    """Whether torch.bmm multiplies half-precision operands into float32 on this device (CUDA, recent torch)."""
    one = torch.ones(1, 1, 1, dtype=torch.bfloat16, device=device)
    try:
        return torch.bmm(one, one, out_dtype=torch.float32).dtype == torch.float32
    except (TypeError, RuntimeError, NotImplementedError):
        return False


AttentionInterface.register(NAME, attend)
AttentionMaskInterface.register(NAME, sdpa_mask)


@contextlib.contextmanager
def attend_shared_prefix(adapter: VLMAdapter, cache: Any) -> Iterator[None]:
    """Calls inside the block attend over `cache`'s shared prefixes (its SharedPrefixLayers) with
    `attend`; a cache without one (or None) changes nothing."""
    layers = {i: layer for i, layer in enumerate(getattr(cache, "layers", ())) if isinstance(layer, SharedPrefixLayer)}
    if not layers:
        yield
        return
    config = adapter.text_config
    before = config._attn_implementation
    hooks = Hooks()
    for i, layer in layers.items():
        hooks.before(adapter.self_attn(i), lambda call, layer=layer: call.replace(**{KEYWORD: layer}))
    config._attn_implementation = NAME
    try:
        with hooks:
            yield
    finally:
        config._attn_implementation = before
