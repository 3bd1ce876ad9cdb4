"""Causal mediation per attention head for one source/base pair.

Source run: the original image (the model answers correctly). Base run: the inpainted image.
Patched run: the base run with one head's output (its o_proj input slice) taken from the source
run, at every position or only at the text positions after the image. For each head,

    MF = (P_base - P_patched) / (P_base - P_src)

with P the probability of the correct answer: classification, P(yes) / (P(yes) + P(no));
localization, the probability of the source run's box answer under teacher forcing (per-token
geometric mean by default, or the full product). One batch row per head, so a whole layer is one
pass; every patched row restarts at its layer from the base run's captured layer input, and with
text-only patching recomputes only the positions after the image. The patched layer's attention
is not recomputed (its input is the base run's, so its heads' outputs are the base run's, edited).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from vlmloc.engine.heads import HeadEdit, capture_heads, capture_layer_inputs, edit_heads, head_slice, run_from_layer
from vlmloc.engine.prefix import first_post_image_position
from vlmloc.engine.readout import answer_logprobs, yes_no_margin
from vlmloc.models.adapter import PreparedBatch, VLMAdapter


@dataclass(frozen=True)
class Target:
    """What P measures. answer_len 0: the yes/no question; else the last answer_len tokens are the answer."""

    answer_len: int = 0
    reduce: str = "geometric_mean"  # or "product"


def answer_probability(adapter: VLMAdapter, logits: torch.Tensor, input_ids: torch.Tensor, target: Target) -> torch.Tensor:
    """[rows] P from logits [rows, t, vocab] that end at the sequence end; input_ids [seq] of the row."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    if target.answer_len == 0:
        return torch.sigmoid(yes_no_margin(adapter, logp[:, -1]))
    n = target.answer_len
    lp = answer_logprobs(logp, input_ids[-n:])
    # summed and exponentiated in float64: a product over a long answer (35 tokens at log P -3
    # each is e^-105) is 0 in float32, which would make every such pair's MF undefined
    total = lp.double().sum(-1)
    return torch.exp(total / n if target.reduce == "geometric_mean" else total)


@torch.no_grad()
def head_mediation(
    adapter: VLMAdapter,
    source: PreparedBatch,
    base: PreparedBatch,
    target: Target,
    *,
    layers: list[int] | None = None,
    text_only: bool = False,
    heads_per_pass: int | None = None,
) -> tuple[float, float, np.ndarray]:
    """(P_src, P_base, P_patched [n_layers, n_heads]) for one pair (each batch holds one row)."""
    if source.seq_len != base.seq_len:
        raise ValueError(f"source and base sequences differ in length ({source.seq_len} vs {base.seq_len})")
    layers = list(range(adapter.n_layers)) if layers is None else list(layers)
    ids = base.inputs["input_ids"][0]
    src_heads = capture_heads(adapter, source.inputs, layers)
    src_logits = adapter.model(**source.inputs).logits
    p_src = float(answer_probability(adapter, src_logits, source.inputs["input_ids"][0], target)[0])
    clean = capture_layer_inputs(adapter, base.inputs)
    p_base = float(answer_probability(adapter, clean.logits, ids, target)[0])
    start = first_post_image_position(base) if text_only else 0
    if text_only and target.answer_len >= base.seq_len - start:
        raise ValueError("the answer must lie after the image")
    positions = np.arange(start, base.seq_len) if text_only else None
    n_heads = adapter.n_heads
    step = heads_per_pass or n_heads
    patched = np.full((adapter.n_layers, n_heads), np.nan)
    for layer in layers:
        for h0 in range(0, n_heads, step):
            heads = range(h0, min(h0 + step, n_heads))
            edits = [[HeadEdit(layer, h, src_heads[layer][0, :, head_slice(adapter, h)], positions)] for h in heads]
            with edit_heads(adapter, edits, offset=start):
                logits = run_from_layer(adapter, clean, layer, len(edits), start=start,
                                        keep_last=target.answer_len + 1, reuse_attention=True)
            patched[layer, h0 : h0 + len(edits)] = answer_probability(adapter, logits, ids, target).cpu().numpy()
    return p_src, p_base, patched


def mediation_fraction(p_src: float, p_base: float, p_patched: np.ndarray, min_denominator: float) -> np.ndarray:
    """MF per head; NaN where |P_base - P_src| < min_denominator (reported, not divided)."""
    denom = p_base - p_src
    if abs(denom) < min_denominator:
        return np.full_like(p_patched, np.nan)
    return (p_base - p_patched) / denom
