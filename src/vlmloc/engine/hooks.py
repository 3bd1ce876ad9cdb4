"""The hook core: the one module that registers hooks on the model and reads transformers' keyword
arguments. Every intervention and capture in the engine goes through it.

Usage::

    def ablate(call: Call) -> Call | None:              # runs before the module's forward
        if call.inputs_embeds is None or not call.is_prefill:
            return None                                  # None: the call goes on unchanged
        return call.replace(inputs_embeds=edited(call.inputs_embeds))

    def keep(call: Call, output):                        # runs after it; return a value to replace the output
        seen["out"] = output

    with Hooks().before(adapter.language_model, ablate).after(adapter.projector, keep):
        adapter.model(**batch.inputs)                    # hooks are registered on entry, removed on exit

A `Call` is what a hook sees of one module call: its positional arguments and keyword arguments,
read by name here and nowhere else (`hidden`, `inputs_embeds`, `attention_mask`, `position_ids`,
`position_embeddings`, the KV cache whatever its keyword, whether the call is a prefill).

Version differences, in one place. transformers 5.17-5.23 pass the decoder's KV cache as
`past_key_values`; 5.24 renamed it `cache` (LlamaModel, Qwen3Model, their decoder layers and
attention, LlavaModel, InternVLModel, `@deprecate_kwarg("past_key_values", "5.40.0",
new_name="cache")`), so a hook reading the old name sees no cache there and would take every decode
step for a prefill. A call is read under either name (`CACHE_KEYWORDS`), a cache is written back
under the name the call carried, and a new call names it as the callee's signature does
(`cache_argument`). Neither range passes `cache_position` to the decoder layers.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

# The decoder's KV-cache keyword, newest name first (see the module docstring for the versions).
CACHE_KEYWORDS = ("cache", "past_key_values")


@dataclass(frozen=True)
class Call:
    """One module call as a pre-hook sees it. `replace` gives a changed copy; the hook returns it."""

    args: tuple
    kwargs: dict[str, Any]

    @property
    def hidden(self) -> torch.Tensor:
        """The module's main input: the first positional argument, else `hidden_states`
        ([batch, q_len, hidden] for decoder layers and attention, [batch, q_len, heads * head_dim] for o_proj)."""
        return self.args[0] if self.args else self.kwargs["hidden_states"]

    @property
    def inputs_embeds(self) -> torch.Tensor | None:
        """[batch, seq, hidden] the language model's input embeddings (image features scattered in)."""
        return self.kwargs.get("inputs_embeds")

    @property
    def attention_mask(self) -> torch.Tensor | None:
        """Decoder layers / attention: [batch, 1, q_len, k_len] (bool allow with sdpa, additive float with
        eager) or None (plain causal); the language model: the [batch, seq] padding mask."""
        return self.kwargs.get("attention_mask")

    @property
    def position_ids(self) -> torch.Tensor | None:
        return self.kwargs.get("position_ids")

    @property
    def position_embeddings(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(cos, sin), each [batch, q_len, head_dim]: the rotary embeddings a decoder layer receives."""
        return self.kwargs.get("position_embeddings")

    @property
    def cache_keyword(self) -> str | None:
        return next((k for k in CACHE_KEYWORDS if k in self.kwargs), None)

    @property
    def cache(self) -> Any:
        """The KV cache passed to this call, under whichever keyword this transformers uses; None if none."""
        key = self.cache_keyword
        return None if key is None else self.kwargs[key]

    def past_length(self, layer: int | None = None) -> int:
        """Tokens already in the cache (of `layer`, else of the first layer) before this call."""
        cache = self.cache
        if cache is None:
            return 0
        return int(cache.get_seq_length() if layer is None else cache.get_seq_length(layer))

    @property
    def is_prefill(self) -> bool:
        """True when the call computes the sequence from its start: no cache, or an empty one."""
        return self.past_length() == 0

    def replace(self, *, hidden: torch.Tensor | None = None, **changes: Any) -> Call:
        """A copy with some inputs changed: `hidden` (the main input), `cache` (written under the
        keyword the call carried, or the newest name), or any keyword argument by name."""
        args, kwargs = self.args, dict(self.kwargs)
        if hidden is not None:
            if args:
                args = (hidden, *args[1:])
            else:
                kwargs["hidden_states"] = hidden
        if "cache" in changes:
            kwargs[self.cache_keyword or CACHE_KEYWORDS[0]] = changes.pop("cache")
        kwargs.update(changes)
        return Call(args, kwargs)

    def shared(self) -> Call:
        """The keyword arguments alone, main input left out: what every decoder layer of one forward
        receives alike (mask, rotary embeddings, cache, ...)."""
        return Call((), {k: v for k, v in self.kwargs.items() if k != "hidden_states"})


def cache_argument(module: nn.Module, cache: Any) -> dict[str, Any]:
    """{keyword: cache} for calling `module` with a KV cache, named as its forward's signature names it."""
    params = inspect.signature(module.forward).parameters
    return {next((k for k in CACHE_KEYWORDS if k in params), CACHE_KEYWORDS[-1]): cache}


PreHook = Callable[[Call], "Call | None"]
PostHook = Callable[[Call, Any], Any]


@dataclass
class Hooks:
    """Hooks installed together and removed together: a context manager.

    before(module, fn): fn(call) runs before module's forward; a returned Call replaces its inputs.
    after(module, fn): fn(call, output) runs after it; a returned value (not None) replaces the output.
    """

    _specs: list[tuple[nn.Module, str, Callable]] = field(default_factory=list)
    _handles: list[Any] = field(default_factory=list)

    def before(self, module: nn.Module, fn: PreHook) -> Hooks:
        self._specs.append((module, "before", fn))
        return self

    def after(self, module: nn.Module, fn: PostHook) -> Hooks:
        self._specs.append((module, "after", fn))
        return self

    def __enter__(self) -> Hooks:
        try:
            for module, when, fn in self._specs:
                self._handles.append(_register(module, when, fn))
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def _register(module: nn.Module, when: str, fn: Callable) -> Any:
    if when == "before":

        def pre(_module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            out = fn(Call(args, kwargs))
            return None if out is None else (out.args, out.kwargs)

        return module.register_forward_pre_hook(pre, with_kwargs=True)

    def post(_module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        return fn(Call(args, kwargs), output)

    return module.register_forward_hook(post, with_kwargs=True)
