"""Readouts: what is read from the model's output. The yes/no margin of the next token, the
log-probability of a teacher-forced answer, the greedy answer.

The batched ones take a PreparedBatch (left padded, position ids from the attention mask), so a
batch of rows gives the same numbers as each row alone, within float tolerance. The pure ones
(`yes_no_margin`, `answer_logprobs`) are shared by evaluation, mediation and attribution.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from transformers import DynamicCache

from vlmloc.engine.hooks import cache_argument
from vlmloc.engine.kv_cache import grow_in_place
from vlmloc.engine.prefix_attention import attend_shared_prefix
from vlmloc.models.adapter import PreparedBatch, VLMAdapter


@torch.no_grad()
def next_token_logprobs(adapter: VLMAdapter, batch: PreparedBatch, cache: Any = None) -> torch.Tensor:
    """[batch, vocab] float32 log-probabilities of the token after the prompt.

    cache: a KV cache holding the first tokens of every row (`engine.prefix.share_image_prefix`):
    only the positions after it are computed."""
    if cache is None:
        out = adapter.model(**batch.inputs, logits_to_keep=1)
    else:
        done = cache.get_seq_length()
        inputs = {k: (v if k == "attention_mask" else v[..., done:]) for k, v in batch.inputs.items()}
        with attend_shared_prefix(adapter, cache):
            out = adapter.model(**inputs, **cache_argument(adapter.model, cache), use_cache=True, logits_to_keep=1)
    return torch.log_softmax(out.logits[:, -1].float(), dim=-1)


def yes_no_margin(adapter: VLMAdapter, logprobs: torch.Tensor) -> torch.Tensor:
    """[rows] log P(yes) - log P(no) from next-token log-probabilities [rows, vocab], each side
    summed over the configured answer words' first tokens; sigmoid of it is P(yes) / (P(yes) + P(no))."""
    return torch.logsumexp(logprobs[:, adapter.yes_ids], dim=-1) - torch.logsumexp(logprobs[:, adapter.no_ids], dim=-1)


def answer_logprobs(logprobs: torch.Tensor, answer_ids: torch.Tensor) -> torch.Tensor:
    """[rows, n] log-probability of each of the n answer tokens that end the sequence, from
    log-probabilities [rows, t, vocab] (t > n) that end at the sequence end."""
    n = answer_ids.shape[0]
    # logits at t predict token t + 1: the answer's tokens are predicted by the n positions before them
    pred = logprobs[:, -n - 1 : -1]
    return pred.gather(-1, answer_ids.to(pred.device).view(1, n, 1).expand(pred.shape[0], n, 1)).squeeze(-1)


def yes_probability(adapter: VLMAdapter, logprobs: torch.Tensor) -> np.ndarray:
    """[batch] P(yes) / (P(yes) + P(no)) from next-token log-probabilities [batch, vocab]."""
    return torch.sigmoid(yes_no_margin(adapter, logprobs)).cpu().numpy()


@torch.no_grad()
def generate(adapter: VLMAdapter, batch: PreparedBatch, max_new_tokens: int, cache: Any = None) -> list[str]:
    """Greedy answers, one per row, decoded up to (not including) the first end-of-sequence token.

    Special tokens inside the answer (InternVL's <ref>/<box>) are kept: they are part of the box format.
    cache: a KV cache holding the first tokens of every row (`engine.prefix.share_image_prefix`):
    generation computes only the positions after it. Either way the cache grows in place
    (`engine.kv_cache`): no copy of it per decoding step.
    """
    cache = grow_in_place(DynamicCache(config=adapter.text_config) if cache is None else cache,
                          batch.seq_len + int(max_new_tokens))
    tok = adapter.tokenizer
    eos = adapter.model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos]) | {tok.eos_token_id}
    eos_ids.discard(None)
    with attend_shared_prefix(adapter, cache):
        out = adapter.model.generate(
            **batch.inputs,
            max_new_tokens=int(max_new_tokens),
            do_sample=False,
            num_beams=1,
            pad_token_id=tok.pad_token_id,
            eos_token_id=sorted(eos_ids),
            **cache_argument(adapter.model, cache),
        )
    answers = []
    for row in out[:, batch.seq_len :].tolist():
        cut = next((i for i, t in enumerate(row) if t in eos_ids), len(row))
        kept = [t for t in row[:cut] if t != tok.pad_token_id]
        answers.append(tok.decode(kept, skip_special_tokens=False).strip())
    return answers
