"""Reuse of the image prefix: compute it once, run many conditions on the suffix.

Two uses. Generation (`share_image_prefix`): the rows of a call that share an image and a prompt
(one sample under many conditions) get its prefix's keys and values from one forward pass, and
`generate` computes only the rest of the prompt and the answer of each row. Restarts
(`run_prefix`, below) for next-token readouts from one row:

An intervention that touches only positions after the image (attention knockout with post-image
queries, text-only head patching) cannot change the prefix, attention being causal. So the
row runs clean once (its KV cache and layer inputs are kept), and for each condition row only
the suffix (the prompt after the image, ~30-50 tokens) is recomputed, reading the prefix's keys
and values from a buffer filled once per row:

    prefix = run_prefix(adapter, batch, split)           # one row
    with knockout(adapter, specs):                       # one spec per condition row
        logprobs = suffix_next_token_logprobs(adapter, batch, prefix, len(specs))
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache

from vlmloc.engine.heads import LayerInputs, capture_layer_inputs, run_from_layer
from vlmloc.engine.hooks import cache_argument
from vlmloc.engine.kv_cache import share_rows
from vlmloc.models.adapter import PreparedBatch, VLMAdapter

SEQUENCE_INPUTS = ("input_ids", "attention_mask", "position_ids")


@dataclass
class SharedPrefix:
    """A call's rows with their image prefix computed: `batch` holds every row's token ids as
    [prefix][padding][rest of the prompt] (no pixel values: the image is in the cache), and `cache`
    the prefix's keys and values for every row, `split` tokens long."""

    batch: PreparedBatch
    cache: Any
    split: int


@torch.no_grad()
def share_image_prefix(adapter: VLMAdapter, units: PreparedBatch, unit_of_row: Sequence[int],
                       new_tokens: int = 0) -> SharedPrefix:
    """Rows given as units (distinct image and prompt, one row of `units` each: `adapter.prepare`'s
    output, or `adapter.encode`'s on the host) and, per row, its unit.

    One forward pass computes each unit's prefix (its tokens up to the image's end) once; the cache
    holds it once per unit for all the unit's rows (`engine.kv_cache.SharedPrefixLayer`; calls on it
    attend under `engine.prefix_attention.attend_shared_prefix`, which the readouts enter), and
    each row's own positions grow in place with room for the rest of the prompt and `new_tokens`
    generated tokens. The padding sits between the prefix and the rest of the prompt, masked out,
    so every row's prefix ends at the same position `split`; position ids count real tokens only,
    so each row computes what it would alone, left padded. Units must have equally long prefixes
    (as many visual tokens).
    """
    units = units.to(adapter.device)
    n_units = units.batch_size
    mask = units.inputs["attention_mask"].bool()
    ids = [units.inputs["input_ids"][u][mask[u]] for u in range(n_units)]
    pads = [int((~mask[u]).sum()) for u in range(n_units)]
    ends = {int(lay.positions.max()) + 1 - pad for lay, pad in zip(units.layouts, pads)}
    if len(ends) != 1:
        raise ValueError(f"units of one shared-prefix call must have equally long image prefixes, got {sorted(ends)}")
    split = ends.pop()
    prefix_inputs = {k: v for k, v in units.inputs.items() if k not in SEQUENCE_INPUTS}
    prefix_ids = torch.stack([row[:split] for row in ids])
    prefix_inputs.update(input_ids=prefix_ids, attention_mask=torch.ones_like(prefix_ids))
    prefix_inputs["position_ids"] = adapter.position_ids(prefix_inputs)
    cache = DynamicCache(config=adapter.text_config)
    adapter.model(**prefix_inputs, **cache_argument(adapter.model, cache), use_cache=True, logits_to_keep=1)
    longest = max(len(row) for row in ids)
    share_rows(cache, torch.as_tensor(list(unit_of_row), device=prefix_ids.device), longest - split + int(new_tokens))

    pad_id = adapter.tokenizer.pad_token_id
    rows_ids, rows_mask, layouts = [], [], []
    for u in unit_of_row:
        row, gap = ids[u], longest - len(ids[u])
        rows_ids.append(torch.cat([row[:split], row.new_full((gap,), pad_id), row[split:]]))
        rows_mask.append(torch.cat([torch.ones(split), torch.zeros(gap), torch.ones(len(row) - split)]))
        lay = units.layouts[u]
        layouts.append(dataclasses.replace(lay, positions=lay.positions - pads[u]))
    inputs = {"input_ids": torch.stack(rows_ids), "attention_mask": torch.stack(rows_mask).to(mask.device, torch.long)}
    inputs["position_ids"] = adapter.position_ids(inputs)
    return SharedPrefix(batch=PreparedBatch(inputs=inputs, layouts=layouts), cache=cache, split=split)


@dataclass
class Prefix:
    """A clean run of one row, kept so conditions can recompute only positions >= split."""

    clean: LayerInputs
    split: int


def first_post_image_position(batch: PreparedBatch, row: int = 0) -> int:
    return int(batch.layouts[row].positions.max()) + 1


def run_prefix(adapter: VLMAdapter, batch: PreparedBatch, split: int) -> Prefix:
    """Run the (single) row clean once, keeping its KV cache and layer inputs."""
    if batch.batch_size != 1:
        raise ValueError("run_prefix takes one row")
    if split <= first_post_image_position(batch) - 1:
        raise ValueError("the prefix must contain the whole image")
    return Prefix(clean=capture_layer_inputs(adapter, batch.inputs), split=split)


@torch.no_grad()
def suffix_next_token_logprobs(adapter: VLMAdapter, batch: PreparedBatch, prefix: Prefix, n: int) -> torch.Tensor:
    """[n, vocab] next-token log-probabilities of n copies of the row, computing only positions >= split.

    Interventions installed around the call (knockout, head edits with offset=split) act on the
    recomputed positions; the prefix's keys and values come from the clean run.
    """
    logits = run_from_layer(adapter, prefix.clean, 0, n, start=prefix.split, keep_last=1)
    return torch.log_softmax(logits[:, -1].float(), dim=-1)
