"""Reuse of the image prefix: compute it once, run many conditions on the suffix.

An intervention that touches only positions after the image (attention knockout with post-image
queries, text-only head patching) cannot change the prefix, attention being causal. So the
prefix (every position before `split`, the image included) runs once, its KV cache is repeated
for each condition row, and only the suffix (the prompt after the image, ~30 tokens) is
computed per condition:

    prefix = run_prefix(adapter, batch, split)           # one row
    with knockout(adapter, specs):                       # one spec per condition row
        logprobs = suffix_next_token_logprobs(adapter, batch, prefix, len(specs))
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache

from vlmloc.models.adapter import PreparedBatch, VLMAdapter


@dataclass
class Prefix:
    """The KV cache of positions [0, split) of one row."""

    cache: DynamicCache
    split: int


def first_post_image_position(batch: PreparedBatch, row: int = 0) -> int:
    return int(batch.layouts[row].positions.max()) + 1


@torch.no_grad()
def run_prefix(adapter: VLMAdapter, batch: PreparedBatch, split: int) -> Prefix:
    """Run positions [0, split) of the (single) row, image included, and keep the KV cache."""
    if batch.batch_size != 1:
        raise ValueError("run_prefix takes one row")
    if split <= first_post_image_position(batch) - 1:
        raise ValueError("the prefix must contain the whole image")
    inputs = {k: (v[:, :split] if k in ("input_ids", "attention_mask", "position_ids") else v) for k, v in batch.inputs.items()}
    cache = DynamicCache(config=adapter.text_config)
    adapter.model(**inputs, past_key_values=cache, use_cache=True, logits_to_keep=1)
    return Prefix(cache=cache, split=split)


def repeat_cache(prefix: Prefix, n: int) -> DynamicCache:
    """A fresh cache holding the prefix n times (one copy per condition row)."""
    cache = DynamicCache()
    for i, layer in enumerate(prefix.cache.layers):
        cache.update(layer.keys.expand(n, -1, -1, -1).contiguous(), layer.values.expand(n, -1, -1, -1).contiguous(), i)
    return cache


@torch.no_grad()
def suffix_next_token_logprobs(adapter: VLMAdapter, batch: PreparedBatch, prefix: Prefix, n: int) -> torch.Tensor:
    """[n, vocab] next-token log-probabilities of n copies of the row, computing only the suffix."""
    s = prefix.split
    ids = batch.inputs["input_ids"][:, s:].expand(n, -1)
    out = adapter.model(
        input_ids=ids,
        attention_mask=batch.inputs["attention_mask"].expand(n, -1),
        position_ids=batch.inputs["position_ids"][:, s:].expand(n, -1),
        past_key_values=repeat_cache(prefix, n),
        use_cache=True,
        logits_to_keep=1,
    )
    return torch.log_softmax(out.logits[:, -1].float(), dim=-1)
