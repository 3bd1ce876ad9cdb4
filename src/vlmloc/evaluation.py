"""Evaluate classification and localization on samples, in batches, under one or more conditions.

Classification, by `model.classification.mode`:
- list (the real models' default, the paper's "listing objects"): generate the answer to the
  list prompt; correct when it names the queried category or one of its forms
  (`vlmloc.category_names`, the sample's own synonyms added); the raw answer is kept.
- yes_no: one forward pass per batch; P(yes) vs P(no) from the next-token distribution; correct
  when the object is present (always, for these samples) and yes wins.
- open: generate an answer to the yes/no question; correct when it names the category or
  starts with a yes word.
Localization: greedy generation, the family's box parser, IoU with the ground-truth box; hits at
IoU >= 0.5 / 0.7 / 0.9; an unparseable answer is a miss (IoU 0) kept with its raw text.

A condition (`vlmloc.conditions`: plain data) is realized per batch row into up to three kinds of
engine edit, installed together for the row's forward pass or generate call: token edits at the
LM input, attention knockout, and head-output edits.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from tqdm.auto import tqdm

from vlmloc import geometry
from vlmloc.category_names import load_names, names_category
from vlmloc.conditions import BASELINE, AblateHeads, BlockAttention, Condition, Resources, realize
from vlmloc.data.sample import Sample
from vlmloc.engine.heads import HeadEdit, edit_heads
from vlmloc.engine.knockout import Knockout, knockout
from vlmloc.engine.prefix import share_image_prefix
from vlmloc.engine.readout import generate, next_token_logprobs, yes_probability
from vlmloc.engine.shared_images import vision_once_per_image
from vlmloc.engine.token_edits import TokenEdit, edit_lm_input
from vlmloc.models.adapter import PreparedBatch, VLMAdapter
from vlmloc.prefetch import Ahead

log = logging.getLogger("vlmloc.evaluation")
IOU_THRESHOLDS = (0.5, 0.7, 0.9)


def length_order(adapter: VLMAdapter, items: Sequence[tuple[Sample, Condition]], task: str,
                 mode: str | None = None) -> list[int]:
    """Indices of items sorted by prompt length (visual tokens first), so batches pad little.

    Items of the same sample stay together, so a batch loads each image once.
    """

    def key(i: int) -> tuple[int, int, str, int]:
        s = items[i][0]
        return (adapter.n_visual_tokens(s.width, s.height), len(adapter.prompt(task, s.category, mode)), s.sample_id, i)

    return sorted(range(len(items)), key=key)


def max_new_tokens(adapter: VLMAdapter, task: str, mode: str | None = None) -> int:
    """Tokens the task's call may generate after the prompt (0: one forward pass, yes/no scoring).
    mode: a classification mode other than the model's."""
    if task == "classification":
        mode = mode or adapter.classification_mode
        if mode == "list":
            return int(adapter.cfg.classification.list_max_new_tokens)
        return int(adapter.cfg.classification.max_new_tokens) if mode == "open" else 0
    if task == "localization":
        return int(adapter.cfg.localization.max_new_tokens)
    raise ValueError(f"unknown task {task!r}")


@contextlib.contextmanager
def intervene(
    adapter: VLMAdapter,
    edits: Sequence[Sequence[TokenEdit]],
    knockouts: Sequence[Knockout],
    heads: Sequence[Sequence[HeadEdit]],
) -> Iterator[None]:
    """Install per-row token edits, knockouts and head edits for one forward pass or generate call.

    The vision encoder runs once per distinct image of the batch (`vision_once_per_image`): rows of
    one sample under different conditions share it, and no intervention acts before the LM input.
    """
    with contextlib.ExitStack() as stack:
        stack.enter_context(vision_once_per_image(adapter))
        stack.enter_context(edit_lm_input(adapter, edits))
        stack.enter_context(knockout(adapter, knockouts))
        stack.enter_context(edit_heads(adapter, heads))
        yield


def _batches(order: list[int], batch_size: int, cost: Sequence[int] | None = None,
             batch_tokens: int | None = None, group: Sequence[Any] | None = None) -> Iterator[list[int]]:
    """Consecutive runs of `order` of at most `batch_size` rows and, with `batch_tokens`, at most
    that many padded tokens (rows x the longest row's `cost`: prompt plus generated tokens); with
    `group`, a run never mixes items of different groups."""
    batch: list[int] = []
    longest = 0
    for i in order:
        c = cost[i] if cost is not None else 0
        over = batch_tokens is not None and (len(batch) + 1) * max(longest, c) > batch_tokens
        other = group is not None and bool(batch) and group[i] != group[batch[-1]]
        if batch and (len(batch) >= batch_size or over or other):
            yield batch
            batch, longest = [], 0
        batch.append(i)
        longest = max(longest, c)
    if batch:
        yield batch


def row_tokens(adapter: VLMAdapter, sample: Sample, task: str, mode: str | None = None) -> int:
    """Tokens one row's call holds: its visual tokens, its prompt's text tokens and what it may generate."""
    text = adapter.prompt(task, sample.category, mode).replace(adapter.image_placeholder, "")
    return (adapter.n_visual_tokens(sample.width, sample.height) + len(adapter.tokenizer(text).input_ids)
            + max_new_tokens(adapter, task, mode))


def evaluate(
    adapter: VLMAdapter,
    samples: Sequence[Sample],
    tasks: Sequence[str],
    *,
    batch_size: int,
    conditions: Sequence[Condition] = (BASELINE,),
    skip: Collection[tuple[str, str, str]] = frozenset(),
    progress: bool = True,
    sink: Callable[[pd.DataFrame], Any] | None = None,
    flush_seconds: float = 0.0,
    resources: Resources | None = None,
    classification_mode: str | None = None,
    batch_tokens: int | None = None,
    share_prefix: bool = False,
    prefetch: bool = False,
) -> pd.DataFrame:
    """One row per sample x task x condition measured on the task (results schema), minus keys in `skip`.

    classification_mode: list | yes_no | open instead of the model's `classification.mode`
    (make_pairs' filter asks CMA's yes/no question).

    batch_tokens: a call holds at most `batch_size` rows and at most this many padded tokens
    (rows x (prompt + generated tokens)); None = `batch_size` alone. A call that runs out of GPU
    memory is split in two and retried, and later calls of the task keep the smaller size (logged).

    resources: the named inputs the conditions read (`Condition.resources`); "adapter" and
    "new_tokens" are always provided here.

    sink: called with the rows finished since its last call, at least every `flush_seconds`
    (0 = after every batch) and when a task ends, so a killed run keeps what it computed
    (`ResultStore.add` as the sink). The return value holds every row either way.

    share_prefix: where the family allows it (`Family.image_prefix_cache`) and a task has several
    conditions that all keep the image prefix (`Condition.keeps_image_prefix`: the baseline,
    knockouts of queries after the image), the rows of one sample share one computation of the
    image prefix's keys and values (`engine.prefix.share_image_prefix`); a call then holds rows
    with as many visual tokens.

    prefetch: while the model runs a call, a worker thread loads and processes the next call's
    images and prompts (`vlmloc.prefetch`, on the adapter's `thread_copy`); the same inputs, made
    earlier. False: each call's inputs are made when it starts.

    Rows of different conditions share batches: one forward pass carries many conditions.
    Row order: task, then sample, then condition, as given. Extra columns: n_visual, n_edited,
    frac_edited (token edits); knockout_keys (key positions blocked) when a condition knocks out
    attention; heads_edited (distinct (layer, head) pairs) when a condition edits heads.
    """
    with_knockout = any(isinstance(iv, BlockAttention) for c in conditions for iv in c.interventions)
    with_heads = any(isinstance(iv, AblateHeads) for c in conditions for iv in c.interventions)
    named = resources if resources is not None else Resources()
    named.setdefault("adapter", adapter)
    mode = classification_mode
    named.setdefault("new_tokens", {t: max_new_tokens(adapter, t, mode) for t in ("classification", "localization")})
    frames = []
    for task in tasks:
        items = [
            (s, c) for s in samples for c in conditions
            if c.measured_on(task) and (s.sample_id, task, c.name) not in skip
        ]
        if not items:
            continue
        rows: dict[int, dict[str, Any]] = {}
        unsent: list[int] = []
        last_flush = t0 = time.monotonic()
        order = length_order(adapter, items, task, mode)
        cost = [row_tokens(adapter, s, task, mode) for s, _ in items] if batch_tokens is not None else None
        task_conditions = [c for c in conditions if c.measured_on(task)]
        shared = (share_prefix and adapter.facts.image_prefix_cache and len(task_conditions) > 1
                  and all(c.keeps_image_prefix for c in task_conditions))
        group = [adapter.n_visual_tokens(s.width, s.height) for s, _ in items] if shared else None
        bar = tqdm(total=len(order), desc=task, disable=not progress, leave=False)
        tokens, queue = batch_tokens, [tuple(b) for b in _batches(order, batch_size, cost, batch_tokens, group)]
        host = adapter.thread_copy() if prefetch else adapter
        with Ahead(lambda idx: _encode_rows(host, items, idx, task, mode, shared), enabled=prefetch) as ahead:
            while queue:
                idx = queue.pop(0)
                call = ahead.get(idx, then=queue[0] if queue else None)
                try:
                    rows.update(_run_rows(adapter, items, idx, call, task, mode, named, with_knockout, with_heads))
                except torch.cuda.OutOfMemoryError:
                    if len(idx) == 1:
                        raise
                    torch.cuda.empty_cache()
                    size = len(idx) // 2
                    rest = [i for b in queue for i in b]
                    log.warning("%s: out of GPU memory on %d rows; retrying them in halves and running the rest of "
                                "the task %d rows per call (set batch_size or batch_tokens lower to avoid the retry)",
                                task, len(idx), size)
                    tokens = None if tokens is None else max(1, tokens * size // len(idx))
                    queue = [idx[:size], idx[size:]] + [tuple(b) for b in _batches(rest, size, cost, tokens, group)]
                    continue
                bar.update(len(idx))
                unsent += list(idx)
                if sink is not None and time.monotonic() - last_flush >= flush_seconds:
                    sink(pd.DataFrame([rows[i] for i in sorted(unsent)]))
                    unsent, last_flush = [], time.monotonic()
        bar.close()
        log.info("%s: %d rows (%d conditions) in %.1f s", task, len(items), len({c.name for _, c in items}),
                 time.monotonic() - t0)
        if sink is not None and unsent:
            sink(pd.DataFrame([rows[i] for i in sorted(unsent)]))
        frames.append(pd.DataFrame([rows[i] for i in range(len(items))]))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


@dataclass
class HostCall:
    """A call's inputs made on the host (`_encode_rows`), before the call: `batch` holds its rows or,
    with `unit_of_row`, its distinct units (image and prompt) for a shared prefix, row r being unit
    unit_of_row[r]."""

    batch: PreparedBatch
    unit_of_row: list[int] | None = None


def _encode_rows(adapter: VLMAdapter, items: Sequence[tuple[Sample, Condition]], idx: Sequence[int], task: str,
                 mode: str | None, shared: bool) -> HostCall:
    """The host's work for the rows items[idx]: each distinct image loaded once (a call holds one
    sample under many conditions), prompts, the processor (`VLMAdapter.encode`)."""
    chunk = [items[i] for i in idx]
    images = {s.sample_id: s.load_image() for s in {s.sample_id: s for s, _ in chunk}.values()}
    texts = [adapter.prompt(task, s.category, mode) for s, _ in chunk]
    if not shared:
        return HostCall(adapter.encode([images[s.sample_id] for s, _ in chunk], texts))
    keys = [(s.sample_id, t) for (s, _), t in zip(chunk, texts)]
    units = {key: u for u, key in enumerate(dict.fromkeys(keys))}  # distinct (image, prompt), in order
    return HostCall(adapter.encode([images[sid] for sid, _ in units], [t for _, t in units]),
                    [units[key] for key in keys])


def _run_rows(adapter: VLMAdapter, items: Sequence[tuple[Sample, Condition]], idx: Sequence[int], host: HostCall,
              task: str, mode: str | None, named: Resources, with_knockout: bool, with_heads: bool
              ) -> dict[int, dict[str, Any]]:
    """The rows of items[idx]: one forward pass or generate call with each row's interventions
    (with `host.unit_of_row`: after one clean computation of each unit's image prefix)."""
    chunk = [items[i] for i in idx]
    cache = None
    if host.unit_of_row is not None:
        prefix = share_image_prefix(adapter, host.batch, host.unit_of_row, max_new_tokens(adapter, task, mode))
        batch, cache = prefix.batch, prefix.cache
    else:
        batch = host.batch.to(adapter.device)
    realized = [realize(c, s, lay, task, batch.seq_len, named) for (s, c), lay in zip(chunk, batch.layouts)]
    edits = [r.edits for r in realized]
    kos = [r.knockout for r in realized]
    heads = [r.heads for r in realized]
    with intervene(adapter, edits, kos, heads):
        results = _run_task(adapter, batch, [s for s, _ in chunk], task, mode, cache)
    rows = {}
    for i, (sample, cond), res, layout, row_edits, ko, row_heads in zip(idx, chunk, results, batch.layouts, edits, kos, heads):
        n_edited = sum(e.n for e in row_edits)
        rows[i] = {
            **_base_row(sample, task, cond.name),
            **res,
            "n_visual": layout.n_visual,
            "n_edited": n_edited,
            "frac_edited": n_edited / layout.n_visual,
            **({"knockout_keys": 0 if ko.empty else len(ko.keys)} if with_knockout else {}),
            **({"heads_edited": len({(e.layer, e.head) for e in row_heads})} if with_heads else {}),
            **dict(cond.columns),
        }
    return rows


def _base_row(sample: Sample, task: str, condition: str) -> dict[str, Any]:
    return {
        "sample_id": sample.sample_id,
        "image_id": int(sample.image_id),
        "ann_id": int(sample.ann_id),
        "category": sample.category,
        "task": task,
        "condition": condition,
        "width": int(sample.width),
        "height": int(sample.height),
        "area_frac": float(sample.area) / float(sample.width * sample.height),
        "gt_box": [float(v) for v in sample.box_xyxy],
    }


def _run_task(adapter: VLMAdapter, batch: PreparedBatch, chunk: Sequence[Sample], task: str,
              mode: str | None = None, cache: Any = None) -> list[dict[str, Any]]:
    new_tokens = max_new_tokens(adapter, task, mode)
    if task == "classification":
        mode = mode or adapter.classification_mode
        if mode == "yes_no":
            p_yes = yes_probability(adapter, next_token_logprobs(adapter, batch, cache))
            return [classification_outcome(float(p)) for p in p_yes]
        answers = generate(adapter, batch, new_tokens, cache)
        outcome = list_classification_outcome if mode == "list" else open_classification_outcome
        return [outcome(adapter, a, s) for a, s in zip(answers, chunk)]
    answers = generate(adapter, batch, new_tokens, cache)
    return [localization_outcome(adapter, a, s) for a, s in zip(answers, chunk)]


def classification_outcome(p_yes: float) -> dict[str, Any]:
    """Yes/no scoring: the object is present, so the answer is correct when yes wins."""
    return {
        "answer": "yes" if p_yes > 0.5 else "no",
        "p_yes": p_yes,
        "correct": bool(p_yes > 0.5),
        "pred_box": None,
        "iou": math.nan,
        "hit_50": None,
        "hit_70": None,
        "hit_90": None,
    }


def _names(adapter: VLMAdapter, answer: str, sample: Sample) -> bool:
    """Whether the answer names the sample's category: its forms in `classification.names_file`,
    plus the sample's own synonyms."""
    table = load_names(str(adapter.cfg.classification.names_file))
    return names_category(answer, sample.category, table, sample.meta.get("synonyms", []))


def list_classification_outcome(adapter: VLMAdapter, answer: str, sample: Sample) -> dict[str, Any]:
    """List answers: correct when the list names the category; the raw answer is kept."""
    out = classification_outcome(math.nan)
    out.update(answer=answer, correct=_names(adapter, answer, sample))
    return out


def open_classification_outcome(adapter: VLMAdapter, answer: str, sample: Sample) -> dict[str, Any]:
    """Open answers: correct when the answer names the category (or a synonym) or starts with yes."""
    yes = any(answer.strip().lower().startswith(str(w).lower()) for w in adapter.cfg.classification.yes_words)
    out = classification_outcome(math.nan)
    out.update(answer=answer, correct=bool(_names(adapter, answer, sample) or yes))
    return out


def localization_outcome(adapter: VLMAdapter, answer: str, sample: Sample) -> dict[str, Any]:
    """Parse the family's box answer, score IoU and the three hit thresholds."""
    pred = adapter.parse_box(answer, sample.width, sample.height)
    iou = geometry.box_iou(pred, sample.box_xyxy)
    hit = geometry.hits(iou, IOU_THRESHOLDS)
    return {
        "answer": answer,
        "p_yes": math.nan,
        "pred_box": None if pred is None else [float(v) for v in pred],
        "iou": float(iou),
        "hit_50": hit[0.5],
        "hit_70": hit[0.7],
        "hit_90": hit[0.9],
        "correct": hit[0.5],
    }

