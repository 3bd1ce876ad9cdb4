"""Integrated gradients of the model's answer with respect to each visual token's LM-input embedding.

For one image and prompt, f is the answer's log-probability:
- yes/no classification (no answer given): log P(yes) / (P(yes) + P(no)) at the next-token
  position, the margin the clean yes/no answer is read from;
- a given answer (the model's own greedy box for localization, its list of objects for list-mode
  classification): the answer's summed log-probability, teacher-forced.
The visual embeddings x (rows of inputs_embeds at the layout's positions) are interpolated from a
baseline b (zero, or the mean visual embedding) while every other position stays clean:
attribution_i = sum_d (x - b)_{i,d} * mean_alpha dF/dx_{i,d}(b + alpha (x - b)), midpoint rule
over `steps` alphas, evaluated `batch_size` alphas per forward/backward pass. Completeness
(sum_i attribution_i ~= f(x) - f(b)) holds up to the quadrature error.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from vlmloc.engine.hooks import Call, Hooks
from vlmloc.engine.readout import answer_logprobs, yes_no_margin
from vlmloc.models.adapter import VLMAdapter


def _clean_embeds(adapter: VLMAdapter, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """[1, seq, hidden] inputs_embeds exactly as the LM receives them (image features scattered in)."""
    seen: dict[str, torch.Tensor] = {}

    def grab(call: Call) -> None:
        seen["embeds"] = call.inputs_embeds.detach()

    with torch.no_grad(), Hooks().before(adapter.language_model, grab):
        adapter.model(**inputs, logits_to_keep=1)
    return seen["embeds"]


def _answer_logprob(adapter: VLMAdapter, logits: torch.Tensor, answer_ids: torch.Tensor | None) -> torch.Tensor:
    """[rows] f for each row of logits [rows, seq, vocab] (classification if answer_ids is None)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    if answer_ids is None:
        return torch.nn.functional.logsigmoid(yes_no_margin(adapter, logp[:, -1]))
    return answer_logprobs(logp, answer_ids).sum(-1)


def integrated_gradients(
    adapter: VLMAdapter,
    image: Image.Image,
    prompt: str,
    *,
    answer: str | None = None,
    baseline: torch.Tensor | None = None,
    steps: int = 32,
    batch_size: int = 8,
) -> tuple[np.ndarray, float, float]:
    """Attribution per visual token [n_visual] (layout order), f(x) and f(baseline).

    answer None scores the yes/no question; otherwise `answer` is teacher-forced after the prompt.
    baseline: [hidden] vector for every visual token (None = zeros).
    """
    text = prompt if answer is None else prompt + answer
    batch = adapter.prepare([image], [text])
    layout = batch.layouts[0]
    answer_ids = None
    if answer is not None:
        n_prompt = adapter.prepare([image], [prompt]).seq_len
        answer_ids = batch.inputs["input_ids"][0, n_prompt:]
        if answer_ids.numel() == 0:
            raise ValueError("empty answer: nothing to attribute")
    embeds = _clean_embeds(adapter, batch.inputs)
    pos = torch.as_tensor(layout.positions, device=embeds.device)
    x = embeds[0, pos].float()
    b = torch.zeros_like(x) if baseline is None else baseline.to(x.device).float().expand_as(x)
    mask = batch.inputs["attention_mask"]
    position_ids = batch.inputs["position_ids"]
    alphas = (torch.arange(steps, dtype=torch.float32) + 0.5) / steps
    grad_sum = torch.zeros_like(x)

    def forward(rows: torch.Tensor) -> torch.Tensor:
        """[rows, n_visual, hidden] visual embeddings -> [rows] f."""
        e = embeds.expand(rows.shape[0], -1, -1).clone()
        e[:, pos] = rows.to(embeds.dtype)
        out = adapter.model(
            inputs_embeds=e,
            attention_mask=mask.expand(rows.shape[0], -1),
            # batch is the second to last axis: [batch, seq], or [3, batch, seq] for M-RoPE
            position_ids=position_ids.expand(*position_ids.shape[:-2], rows.shape[0], -1),
            # only the positions that predict the answer (t > n: it ends the sequence)
            logits_to_keep=1 if answer_ids is None else answer_ids.numel() + 1,
        )
        return _answer_logprob(adapter, out.logits, answer_ids)

    with torch.enable_grad():
        for chunk in torch.split(alphas, batch_size):
            a = chunk.to(x.device).view(-1, 1, 1)
            rows = (b + a * (x - b)).detach().requires_grad_(True)
            f = forward(rows)
            (grad,) = torch.autograd.grad(f.sum(), rows)
            grad_sum += grad.float().sum(0)
    attribution = ((x - b) * grad_sum / steps).sum(-1)
    with torch.no_grad():
        f_x, f_b = forward(torch.stack([x, b])).tolist()
    return attribution.cpu().numpy(), float(f_x), float(f_b)
