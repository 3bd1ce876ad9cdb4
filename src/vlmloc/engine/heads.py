"""Per-head interventions on the LM's attention outputs (the input of each layer's o_proj).

The o_proj input is [batch, seq, n_heads * head_dim], head-major: head h is the slice
h*head_dim:(h+1)*head_dim. Editing that slice patches (from a source run) or ablates (mean or
zero) one head's output, per batch row:

    edits = [[HeadEdit(layer=12, head=h, value=src[12][0, :, sl(h)])] for h in range(n_heads)]
    with edit_heads(adapter, edits):
        adapter.model(**inputs_expanded_to_n_heads_rows)

Layers below the edited one compute exactly the clean run, so `LayerInputs` + `run_from_layer`
skip them: the clean run's hidden states at the input of layer L are captured once, and every
edited row restarts there. With `start` > 0 only the positions from `start` on are recomputed,
reading the earlier positions' keys and values from the clean run's cache: valid when nothing
before `start` is edited (text-only patching; attention is causal).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from transformers import DynamicCache

from vlmloc.engine.hooks import Call, Hooks, cache_argument
from vlmloc.engine.knockout import _causal
from vlmloc.models.adapter import VLMAdapter


@dataclass(frozen=True)
class HeadEdit:
    """Set head `head` of layer `layer` to `value` at `positions` (None = every position).

    value: [head_dim] (the same vector everywhere) or [seq, head_dim] indexed by absolute
    position; positions at or beyond len(value) (tokens generated after the prompt) take `tail`
    ([head_dim]) when given, else keep the model's own output.
    """

    layer: int
    head: int
    value: torch.Tensor
    positions: np.ndarray | None = None
    tail: torch.Tensor | None = None


def head_slice(adapter: VLMAdapter, head: int) -> slice:
    return slice(head * adapter.head_dim, (head + 1) * adapter.head_dim)


@dataclass
class _Group:
    """Edits of one layer that share positions and value layout, applied as one indexed write."""

    rows: list[int]
    heads: list[int]
    values: list[torch.Tensor]
    tails: list[torch.Tensor]
    positions: np.ndarray | None
    stacked: tuple[torch.Tensor, ...] | None = None

    def tensors(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        if self.stacked is None:
            rows = torch.as_tensor(self.rows, device=device)
            heads = torch.as_tensor(self.heads, device=device)
            values = torch.stack(self.values).to(device=device, dtype=dtype)
            tails = torch.stack(self.tails).to(device=device, dtype=dtype) if self.tails else None
            where = None if self.positions is None else torch.as_tensor(self.positions, device=device)
            self.stacked = (rows, heads, values, tails, where)
        return self.stacked

    def apply(self, x4: torch.Tensor, pos: torch.Tensor) -> None:
        """x4: [batch, T, n_heads, head_dim] edited in place; pos: [T] absolute positions of the call."""
        rows, heads, values, tails, where = self.tensors(x4.device, x4.dtype)
        keep = torch.ones_like(pos, dtype=torch.bool) if where is None else torch.isin(pos, where)
        if values.dim() == 2:  # one vector per edit, broadcast over positions
            t = torch.nonzero(keep).flatten()
            x4[rows[:, None], t[None, :], heads[:, None]] = values[:, None, :].expand(-1, len(t), -1)
            return
        t = torch.nonzero(keep & (pos < values.shape[1])).flatten()
        x4[rows[:, None], t[None, :], heads[:, None]] = values[:, pos[t]]
        if tails is not None:
            t = torch.nonzero(keep & (pos >= values.shape[1])).flatten()
            x4[rows[:, None], t[None, :], heads[:, None]] = tails[:, None, :].expand(-1, len(t), -1)


def _groups(layer_edits: list[tuple[int, HeadEdit]]) -> list[_Group]:
    """Group one layer's edits by (positions, value shape, tail presence)."""
    groups: dict[tuple, _Group] = {}
    for row, e in layer_edits:
        pos_key = None if e.positions is None else np.asarray(e.positions, dtype=np.int64).tobytes()
        key = (pos_key, tuple(e.value.shape), e.tail is not None)
        g = groups.setdefault(key, _Group([], [], [], [], e.positions))
        g.rows.append(row)
        g.heads.append(e.head)
        g.values.append(e.value)
        if e.tail is not None:
            g.tails.append(e.tail)
    return list(groups.values())


@contextlib.contextmanager
def edit_heads(adapter: VLMAdapter, edits: Sequence[Sequence[HeadEdit]], offset: int = 0) -> Iterator[None]:
    """Install per-row head edits (o_proj pre-hooks) for the calls inside the block.

    offset: absolute position of the first token of the first call (run_from_layer with
    start > 0). Later calls (generation steps) continue from where the previous call ended,
    so per-position values and position sets stay aligned during generation. Edits of a layer
    are grouped and written with one indexed assignment per group, so the cost per call does
    not grow with the number of edited heads.
    """
    by_layer: dict[int, list[tuple[int, HeadEdit]]] = {}
    for row, row_edits in enumerate(edits):
        for e in row_edits:
            by_layer.setdefault(e.layer, []).append((row, e))
    n_heads, head_dim = adapter.n_heads, adapter.head_dim

    def make_hook(groups: list[_Group]):
        seen = [offset]

        def patch(call: Call) -> Call:
            x = call.hidden.clone()
            pos = torch.arange(seen[0], seen[0] + x.shape[1], device=x.device)
            seen[0] += x.shape[1]
            x4 = x.view(*x.shape[:2], n_heads, head_dim)
            for g in groups:
                g.apply(x4, pos)
            return call.replace(hidden=x)

        return patch

    hooks = Hooks()
    for layer, layer_edits in by_layer.items():
        hooks.before(adapter.o_proj(layer), make_hook(_groups(layer_edits)))
    with hooks:
        yield


@torch.no_grad()
def capture_heads(adapter: VLMAdapter, inputs: dict[str, torch.Tensor], layers: Sequence[int] | None = None) -> dict[int, torch.Tensor]:
    """o_proj inputs of a clean run: {layer: [batch, seq, n_heads * head_dim]}."""
    layers = range(adapter.n_layers) if layers is None else layers
    out: dict[int, torch.Tensor] = {}
    hooks = Hooks()
    for i in layers:
        hooks.before(adapter.o_proj(i), lambda call, i=i: out.__setitem__(i, call.hidden.detach().clone()))
    with hooks:
        adapter.model(**inputs, logits_to_keep=1)
    return out


@dataclass
class LayerInputs:
    """A clean run, kept so edited runs can restart at any layer.

    hidden: per layer L, the residual stream entering layer L [1, seq, hidden].
    layer_call: the call every decoder layer received, its hidden states left out (mask, rotary
        embeddings, cache, ...).
    cache: the run's KV cache (for restarts at start > 0).
    logits: [1, seq, vocab] of the clean run.
    heads: per layer L, its o_proj input [1, seq, n_heads * head_dim] (every head's output), so a
        restart at L can reuse L's attention instead of recomputing it.
    between: per layer L < last, what the decoder stack adds to the residual stream between layer L's
        output and layer L+1's input outside the layers [1, seq, hidden] (Qwen3-VL's DeepStack adds
        merged ViT features at the visual positions after its first layers), None where nothing is
        added (LLaVA, InternVL, Qwen2.5-VL: every entry None). The additions do not depend on the LM's
        state, so restarts add the clean run's.
    """

    hidden: list[torch.Tensor]
    layer_call: Call
    cache: Any
    logits: torch.Tensor
    seq_len: int = field(default=0)
    heads: list[torch.Tensor] | None = None
    between: list[torch.Tensor | None] | None = None


@torch.no_grad()
def capture_layer_inputs(adapter: VLMAdapter, inputs: dict[str, torch.Tensor]) -> LayerInputs:
    """Run one row clean, keeping each decoder layer's input and the shared layer kwargs."""
    if inputs["input_ids"].shape[0] != 1:
        raise ValueError("capture_layer_inputs takes one row")
    hidden: list[torch.Tensor] = [None] * adapter.n_layers  # type: ignore[list-item]
    heads: list[torch.Tensor] = [None] * adapter.n_layers  # type: ignore[list-item]
    first: list[Call] = []

    def keep_input(i: int):
        def hook(call: Call) -> None:
            hidden[i] = call.hidden.detach()
            if i == 0:
                first.append(call.shared())

        return hook

    outputs: list[torch.Tensor] = [None] * adapter.n_layers  # type: ignore[list-item]

    def keep_output(i: int):
        def hook(_call: Call, output: Any) -> None:
            outputs[i] = (output[0] if isinstance(output, tuple) else output).detach()

        return hook

    # only a family whose stack adds visual features between layers (the family table's
    # lm_visual_features: Qwen3-VL's DeepStack) needs the layers' outputs kept and compared
    adds = adapter.facts.lm_visual_features is not None
    hooks = Hooks()
    for i, layer in enumerate(adapter.layers):
        hooks.before(layer, keep_input(i))
        if adds:
            hooks.after(layer, keep_output(i))
        hooks.before(adapter.o_proj(i), lambda call, i=i: heads.__setitem__(i, call.hidden.detach()))
    cache = DynamicCache(config=adapter.text_config)
    with hooks:
        out = adapter.model(**inputs, **cache_argument(adapter.model, cache), use_cache=True)
    between: list[torch.Tensor | None] = [] if adds else [None] * (adapter.n_layers - 1)
    for i in range(adapter.n_layers - 1 if adds else 0):
        # the same tensor when the stack only chains its layers: no subtraction, nothing added
        a, b = hidden[i + 1], outputs[i]
        same = (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()) or torch.equal(a, b)
        between.append(None if same else hidden[i + 1] - outputs[i])
    return LayerInputs(hidden=hidden, layer_call=first[0], cache=cache, logits=out.logits.detach(),
                       seq_len=inputs["input_ids"].shape[1], heads=heads, between=between)


class PrefilledKV:
    """A KV cache for `n` rows that share a computed prefix: one preallocated buffer per layer.

    The prefix keys/values are copied into each row once; every attention call then writes the
    new positions in place and reads the buffer up to them, instead of concatenating the whole
    prefix onto the new keys at every layer (which dominated restarts on GPU). It implements
    what a decoder layer's attention uses of a cache (`update`, `get_seq_length`).
    """

    def __init__(self, clean_cache: Any, layers: range, n: int, start: int, total: int) -> None:
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.filled = {i: start for i in layers}
        for i in layers:
            k, v = clean_cache.layers[i].keys, clean_cache.layers[i].values
            self.keys[i] = k.new_empty(n, k.shape[1], total, k.shape[3])
            self.values[i] = v.new_empty(n, v.shape[1], total, v.shape[3])
            self.keys[i][:, :, :start] = k[:, :, :start]
            self.values[i][:, :, :start] = v[:, :, :start]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any):
        a = self.filled[layer_idx]
        b = a + key_states.shape[2]
        self.keys[layer_idx][:, :, a:b] = key_states
        self.values[layer_idx][:, :, a:b] = value_states
        self.filled[layer_idx] = b
        return self.keys[layer_idx][:, :, :b], self.values[layer_idx][:, :, :b]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.filled.get(layer_idx, 0)


def _expand(x: Any, n: int) -> Any:
    if isinstance(x, torch.Tensor):
        return x.expand(n, *x.shape[1:]) if x.shape[0] == 1 else x
    if isinstance(x, tuple):
        return tuple(_expand(v, n) for v in x)
    return x


PRE_NORM_PARTS = {"input_layernorm", "self_attn", "post_attention_layernorm", "mlp"}


def _is_pre_norm(layer: torch.nn.Module) -> bool:
    """Llama/Qwen's decoder layer: h + attn(norm(h)), then h + mlp(norm(h)), and nothing else."""
    return {name for name, _ in layer.named_children()} == PRE_NORM_PARTS


def _pre_norm_layer(
    layer: torch.nn.Module, h: torch.Tensor, kw: dict[str, Any], heads: torch.Tensor | None, keep: int | None
) -> torch.Tensor:
    """One pre-norm decoder layer, written out so that parts of it can be skipped.

    heads: the layer's o_proj input to use instead of computing attention (its edits still apply:
    they are hooks on o_proj). keep: run the MLP only for the last `keep` positions (all
    positions still feed attention's keys and values).
    """
    if heads is None:
        a = layer.self_attn(hidden_states=layer.input_layernorm(h), **kw)[0]
    else:
        a = layer.self_attn.o_proj(heads)
    h = h + a
    if keep is not None:
        h = h[:, -keep:]
    return h + layer.mlp(layer.post_attention_layernorm(h))


def _add_between(clean: LayerInputs, layer: int, h: torch.Tensor, start: int) -> torch.Tensor:
    """h [rows, q, hidden] after `layer` plus the clean run's addition before the next layer (its last q
    positions of those from `start` on), if the stack adds anything there."""
    add = clean.between[layer] if clean.between is not None and layer < len(clean.between) else None
    if add is None:
        return h
    return h + add[:, start:][:, -h.shape[1] :]


@torch.no_grad()
def run_from_layer(
    adapter: VLMAdapter,
    clean: LayerInputs,
    layer: int,
    n_rows: int,
    *,
    start: int = 0,
    keep_last: int | None = None,
    reuse_attention: bool = False,
) -> torch.Tensor:
    """Logits [n_rows, seq - start, vocab] of `n_rows` copies of the clean row restarted at `layer`.

    Edits installed with edit_heads(..., offset=start) act on the recomputed positions. With
    start > 0, positions < start keep the clean run's keys/values (read from its cache).
    keep_last: only the last positions' logits [n_rows, keep_last, vocab]; the last layer's MLP
    and the vocabulary projection then run for those positions only.
    reuse_attention: take layer `layer`'s attention output from the clean run (`clean.heads`)
    instead of recomputing it, which is exact when only head edits (o_proj hooks) act on that
    layer: its input is the clean run's. Not with a knockout at `layer`.
    """
    call = clean.layer_call
    h = clean.hidden[layer][:, start:].expand(n_rows, -1, -1)
    mask = call.attention_mask
    if reuse_attention and clean.heads is None:
        raise ValueError("reuse_attention needs LayerInputs.heads (capture_layer_inputs records them)")
    if start > 0:
        # layers below `layer` are never run again, so only the others get a cache
        first_cached = layer + 1 if reuse_attention else layer
        q_len = clean.seq_len - start
        cos, sin = call.position_embeddings
        call = call.replace(
            cache=PrefilledKV(clean.cache, range(first_cached, adapter.n_layers), n_rows, start, clean.seq_len),
            attention_mask=_causal(n_rows, q_len, clean.seq_len, h.device) if mask is None else mask[:, :, start:, : clean.seq_len],
            position_embeddings=(cos[:, start:], sin[:, start:]),
        )
        if call.position_ids is not None:
            call = call.replace(position_ids=call.position_ids[:, start:])
    else:
        call = call.replace(cache=None)
    call = call.replace(use_cache=start > 0)
    kw = {k: _expand(v, n_rows) for k, v in call.kwargs.items()}
    last = adapter.n_layers - 1
    for i in range(layer, adapter.n_layers):
        mod = adapter.layers[i]
        heads = clean.heads[i][:, start:].expand(n_rows, -1, -1) if reuse_attention and i == layer else None
        keep = keep_last if i == last and keep_last is not None and keep_last < h.shape[1] else None
        if (heads is not None or keep is not None) and _is_pre_norm(mod):
            h = _add_between(clean, i, _pre_norm_layer(mod, h, kw, heads, keep), start)
            continue
        if heads is not None:
            raise ValueError(f"reuse_attention: layer {i} is not a plain pre-norm decoder layer ({type(mod).__name__})")
        h = mod(h, **kw)
        h = h[0] if isinstance(h, tuple) else h
        h = _add_between(clean, i, h, start)
    if keep_last is not None:
        h = h[:, -keep_last:]
    return adapter.model.lm_head(adapter.language_model.norm(h))
