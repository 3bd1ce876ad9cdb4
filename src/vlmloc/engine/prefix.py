"""Reuse of the image prefix: compute it once, run many conditions on the suffix.

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

from dataclasses import dataclass

import torch

from vlmloc.engine.heads import LayerInputs, capture_layer_inputs, run_from_layer
from vlmloc.models.adapter import PreparedBatch, VLMAdapter


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
