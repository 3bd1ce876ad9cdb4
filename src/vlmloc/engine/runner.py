"""Batched model runners: score a yes/no question from one forward pass, generate answers greedily.

Both take a PreparedBatch (left padded, position ids from the attention mask), so a batch of
rows gives the same numbers as each row alone, within float tolerance.
"""

from __future__ import annotations

import numpy as np
import torch

from vlmloc.models.adapter import PreparedBatch, VLMAdapter


@torch.no_grad()
def next_token_logprobs(adapter: VLMAdapter, batch: PreparedBatch) -> torch.Tensor:
    """[batch, vocab] float32 log-probabilities of the token after the prompt."""
    out = adapter.model(**batch.inputs, logits_to_keep=1)
    return torch.log_softmax(out.logits[:, -1].float(), dim=-1)


def yes_probability(adapter: VLMAdapter, logprobs: torch.Tensor) -> np.ndarray:
    """[batch] P(yes) / (P(yes) + P(no)), each summed over the configured answer words' first tokens."""
    lp_yes = torch.logsumexp(logprobs[:, adapter.yes_ids], dim=-1)
    lp_no = torch.logsumexp(logprobs[:, adapter.no_ids], dim=-1)
    return torch.sigmoid(lp_yes - lp_no).cpu().numpy()


@torch.no_grad()
def generate(adapter: VLMAdapter, batch: PreparedBatch, max_new_tokens: int) -> list[str]:
    """Greedy answers, one per row, decoded up to (not including) the first end-of-sequence token.

    Special tokens inside the answer (InternVL's <ref>/<box>) are kept: they are part of the box format.
    """
    tok = adapter.tokenizer
    eos = adapter.model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos]) | {tok.eos_token_id}
    eos_ids.discard(None)
    out = adapter.model.generate(
        **batch.inputs,
        max_new_tokens=int(max_new_tokens),
        do_sample=False,
        num_beams=1,
        pad_token_id=tok.pad_token_id,
        eos_token_id=sorted(eos_ids),
    )
    answers = []
    for row in out[:, batch.seq_len :].tolist():
        cut = next((i for i, t in enumerate(row) if t in eos_ids), len(row))
        kept = [t for t in row[:cut] if t != tok.pad_token_id]
        answers.append(tok.decode(kept, skip_special_tokens=False).strip())
    return answers
