"""Integrated gradients of the model's answer with respect to each visual token's LM-input embedding.

For one image and prompt (a `Target`), f is the answer's log-probability:
- yes/no classification (no answer given): log P(yes) / (P(yes) + P(no)) at the next-token
  position, the margin the clean yes/no answer is read from;
- a given answer (the model's own greedy box for localization, its list of objects for list-mode
  classification): the answer's summed log-probability, teacher-forced.
The visual embeddings x (rows of inputs_embeds at the layout's positions) are interpolated from a
baseline b (zero, or the mean visual embedding) while every other position stays clean:
attribution_i = sum_d (x - b)_{i,d} * mean_alpha dF/dx_{i,d}(b + alpha (x - b)), midpoint rule
over `steps` alphas. Completeness (sum_i attribution_i ~= f(x) - f(b)) holds up to the quadrature
error.

Batching. `integrated_gradients_batch` lays the path points of all targets end to end (target by
target, alphas ascending) and evaluates them `batch_size` rows per forward/backward pass, so one
pass can carry points of several targets (samples, tasks): rows are left padded to the pass's
longest sequence, with position ids counting from each row's first real token, as the processor
pads a batch. Per target the gradients are summed pass by pass, as one target alone would sum
them; a pass holding a single target is exactly the unbatched computation.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from vlmloc.engine.hooks import Call, Hooks
from vlmloc.engine.readout import answer_logprobs, yes_no_margin
from vlmloc.models.adapter import VLMAdapter

log = logging.getLogger("vlmloc.engine")


@dataclass(frozen=True)
class Target:
    """What one attribution explains: `answer` teacher-forced after `prompt` (None: the yes/no margin).
    image: the image, or a function loading it (called when the target's first pass is built, so a
    long list of targets holds no images)."""

    image: Image.Image | Callable[[], Image.Image]
    prompt: str
    answer: str | None = None


@dataclass
class _Clean:
    """One target's clean run, unpadded: embeds [seq, hidden], positions [n_visual] (sequence
    positions of the visual tokens), position_ids [..., seq] (M-RoPE: [3, seq]), answer_ids [n] or None."""

    embeds: torch.Tensor
    positions: torch.Tensor
    position_ids: torch.Tensor
    answer_ids: torch.Tensor | None

    @property
    def seq_len(self) -> int:
        return int(self.embeds.shape[0])

    @property
    def keep(self) -> int:
        """Logit positions f reads: the ones predicting the answer, or the next token."""
        return 1 if self.answer_ids is None else int(self.answer_ids.numel()) + 1


class _Stop(Exception):
    """Raised by the LM-input hook once the embeddings are read: the LM itself need not run."""


def _clean_embeds(adapter: VLMAdapter, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """[batch, seq, hidden] inputs_embeds exactly as the LM receives them (image features scattered in).

    Only the vision tower, projector and embedding run: the hook stops the call at the LM's input.
    """
    seen: dict[str, torch.Tensor] = {}

    def grab(call: Call) -> None:
        seen["embeds"] = call.inputs_embeds.detach()
        raise _Stop

    try:
        with torch.no_grad(), Hooks().before(adapter.language_model, grab):
            adapter.model(**inputs, logits_to_keep=1)
    except _Stop:
        pass
    return seen["embeds"]


def _prepare(adapter: VLMAdapter, target: Target) -> _Clean:
    image = target.image if isinstance(target.image, Image.Image) else target.image()
    text = target.prompt if target.answer is None else target.prompt + target.answer
    batch = adapter.prepare([image], [text])
    answer_ids = None
    if target.answer is not None:
        n_prompt = adapter.prepare([image], [target.prompt]).seq_len
        answer_ids = batch.inputs["input_ids"][0, n_prompt:]
        if answer_ids.numel() == 0:
            raise ValueError("empty answer: nothing to attribute")
    embeds = _clean_embeds(adapter, batch.inputs)[0]
    pos = torch.as_tensor(batch.layouts[0].positions, device=embeds.device)
    # the batch axis is the second to last: [1, seq], or [3, 1, seq] for M-RoPE
    return _Clean(embeds, pos, batch.inputs["position_ids"].select(-2, 0), answer_ids)


def _answer_logprob(adapter: VLMAdapter, logits: torch.Tensor, answer_ids: torch.Tensor | None) -> torch.Tensor:
    """[rows] f for each row of logits [rows, seq, vocab] (classification if answer_ids is None)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    if answer_ids is None:
        return torch.nn.functional.logsigmoid(yes_no_margin(adapter, logp[:, -1]))
    return answer_logprobs(logp, answer_ids).sum(-1)


def _forward(adapter: VLMAdapter, groups: Sequence[tuple[_Clean, torch.Tensor]]) -> list[torch.Tensor]:
    """One pass over groups of (clean run, its visual rows [k, n_visual, hidden]) -> per group [k] f.

    Rows are left padded to the longest sequence; padding takes the pad token's embedding and the
    attention mask hides it, as in a processor-padded batch.
    """
    clean0 = groups[0][0]
    width = max(c.seq_len for c, _ in groups)
    n_rows = sum(int(r.shape[0]) for _, r in groups)
    dev, dtype = clean0.embeds.device, clean0.embeds.dtype
    pad_id = adapter.tokenizer.pad_token_id
    pad = adapter.model.get_input_embeddings()(torch.tensor([pad_id if pad_id is not None else 0], device=dev))
    embeds = pad.detach().to(dtype).expand(n_rows, width, -1).clone()
    mask = torch.zeros(n_rows, width, dtype=torch.long, device=dev)
    pids = clean0.position_ids
    position_ids = torch.zeros(*pids.shape[:-1], n_rows, width, dtype=pids.dtype, device=pids.device)
    row = 0
    for clean, rows in groups:
        k, off = int(rows.shape[0]), width - clean.seq_len
        embeds[row : row + k, off:] = clean.embeds
        embeds[row : row + k, off + clean.positions] = rows.to(dtype)
        mask[row : row + k, off:] = 1
        position_ids[..., row : row + k, off:] = clean.position_ids.unsqueeze(-2)
        row += k
    out = adapter.model(
        inputs_embeds=embeds,
        attention_mask=mask,
        position_ids=position_ids,
        # only the positions that predict the answers (they end every row)
        logits_to_keep=max(c.keep for c, _ in groups),
    )
    fs, row = [], 0
    for clean, rows in groups:
        k = int(rows.shape[0])
        fs.append(_answer_logprob(adapter, out.logits[row : row + k], clean.answer_ids))
        row += k
    return fs


def integrated_gradients_batch(
    adapter: VLMAdapter,
    targets: Sequence[Target],
    *,
    baseline: torch.Tensor | None = None,
    steps: int = 32,
    batch_size: int = 8,
    endpoints: bool = False,
    progress: bool = False,
) -> list[tuple[np.ndarray, float, float]]:
    """Per target: attribution per visual token [n_visual] (layout order), f(x) and f(baseline).

    Path points of all targets share passes of `batch_size` rows (module docstring); a target's
    clean run is computed when its first point enters a pass and dropped after its last one. A pass
    that runs out of GPU memory is split in two and retried, and later passes keep the smaller size
    (logged): the gradients are summed point by point, so the split changes nothing but rounding.
    endpoints: also evaluate f(x) and f(b) (one extra forward per target), else both are NaN.
    baseline: [hidden] vector for every visual token (None = zeros).
    """
    alphas = (torch.arange(steps, dtype=torch.float32) + 0.5) / steps
    points = [(t, j) for t in range(len(targets)) for j in range(steps)]
    clean: dict[int, _Clean] = {}
    ends: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # target -> (x, b), float32 [n_visual, hidden]
    grad_sum: dict[int, torch.Tensor] = {}
    results: dict[int, tuple[np.ndarray, float, float]] = {}  # target -> its result, set by finish()
    chunks = [points[i : i + batch_size] for i in range(0, len(points), batch_size)]

    def finish(t: int) -> None:
        x, b = ends.pop(t)
        attribution = ((x - b) * grad_sum.pop(t) / steps).sum(-1)
        f_x = f_b = float("nan")
        if endpoints:
            with torch.no_grad():
                f_x, f_b = _forward(adapter, [(clean[t], torch.stack([x, b]))])[0].tolist()
        del clean[t]
        results[t] = (attribution.cpu().numpy(), float(f_x), float(f_b))

    bar = tqdm(total=len(points), desc=f"integrated gradients ({steps} steps)", disable=not progress)
    while chunks:
        chunk = chunks.pop(0)
        order = list(dict.fromkeys(t for t, _ in chunk))
        for t in order:
            if t not in clean:
                clean[t] = _prepare(adapter, targets[t])
                x = clean[t].embeds[clean[t].positions].float()
                b = torch.zeros_like(x) if baseline is None else baseline.to(x.device).float().expand_as(x)
                ends[t], grad_sum[t] = (x, b), torch.zeros_like(x)
        try:
            grads = _path_gradients(adapter, chunk, order, clean, ends, alphas)
        except torch.cuda.OutOfMemoryError:
            if len(chunk) == 1:
                raise
            grads = None
        if grads is None:  # outside the except block: the failed pass's tensors are released by now
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            size = len(chunk) // 2
            rest = [point for c in chunks for point in c]
            log.warning("integrated gradients: out of GPU memory on %d path points per pass; retrying with %d "
                        "(set experiment.integrated_gradients.batch_size lower to avoid the retry)", len(chunk), size)
            chunks = [chunk[:size], chunk[size:]] + [rest[i : i + size] for i in range(0, len(rest), size)]
            continue
        for t, grad in zip(order, grads):
            grad_sum[t] += grad.float().sum(0)
            if (t, steps - 1) in chunk:
                finish(t)
        bar.update(len(chunk))
    bar.close()
    # every target's last point lies in some pass, so each is finished; a missing one fails here,
    # never a shorter list that would misalign the caller's targets
    return [results[t] for t in range(len(targets))]


def _path_gradients(adapter: VLMAdapter, chunk: Sequence[tuple[int, int]], order: Sequence[int],
                    clean: dict[int, _Clean], ends: dict[int, tuple[torch.Tensor, torch.Tensor]],
                    alphas: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """One forward/backward pass over the path points `chunk` ((target, alpha index) pairs) -> per
    target of `order` the gradients [k, n_visual, hidden] of f at its k points."""
    leaves = []
    for t in order:
        x, b = ends[t]
        a = alphas[[j for u, j in chunk if u == t]].to(x.device).view(-1, 1, 1)
        leaves.append((b + a * (x - b)).detach().requires_grad_(True))
    with torch.enable_grad():
        fs = _forward(adapter, [(clean[t], rows) for t, rows in zip(order, leaves)])
        return torch.autograd.grad(torch.cat(fs).sum(), leaves)


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
    """Attribution per visual token [n_visual] (layout order), f(x) and f(baseline) of one target.

    answer None scores the yes/no question; otherwise `answer` is teacher-forced after the prompt.
    baseline: [hidden] vector for every visual token (None = zeros).
    """
    (out,) = integrated_gradients_batch(adapter, [Target(image, prompt, answer)], baseline=baseline, steps=steps,
                                        batch_size=batch_size, endpoints=True)
    return out
