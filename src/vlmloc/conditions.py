"""Conditions as data: what a paper condition does to one row, in layout terms, as frozen values.

A `Condition` is a name, the columns its result rows carry, the tasks it is measured on, and a
tuple of interventions. Interventions name their targets by role (the object's tokens padded by
p rings, as many random tokens drawn from the image, the top-k tokens of a named score, the
positions after the image, heads by layer and index) and their expensive inputs by name (the
mean visual embedding, head means, integrated-gradients and register scores): the runner
resolves those once per run (`Resources`) and `realize` turns a condition into the engine's
per-row edits for the row's own layout, so one batch carries many conditions.

    Condition("object_tokens:p=+1", (Replace(ObjectTokens(pad=1)),), {"strategy": "object", "pad": 1})
    Condition("knockout:object:layers=0-5", (BlockAttention(ObjectTokens(), layers=tuple(range(6))),))

Random draws are seeded by (seed, sample_id, *stream), so a sample draws the same tokens in any
batch, for every task, and on every rerun.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

import numpy as np
import torch

from vlmloc.data.sample import Sample
from vlmloc.engine.heads import HeadEdit, head_slice
from vlmloc.engine.knockout import Knockout, post_image_queries
from vlmloc.engine.token_edits import TokenEdit
from vlmloc.models.layout import VisualLayout
from vlmloc.seeds import row_rng
from vlmloc.selection import RANDOM_FROM, object_positions, object_tokens, random_positions, top_k_positions

Head = tuple[int, int]  # (layer, head)
ABLATIONS = ("mean", "zero")


# --------------------------------------------------------------------------- which tokens


@dataclass(frozen=True)
class ObjectTokens:
    """The object's tokens (any-pixel overlap) grown (+) or shrunk (-) by `pad` rings, optionally of one view."""

    pad: int = 0
    view: str | None = None


@dataclass(frozen=True)
class AllTokens:
    """Every visual token of the row, in layout order."""


@dataclass(frozen=True)
class RandomTokens:
    """As many tokens as `count_of` selects, drawn uniformly from `among` ("image": tokens covering
    the image; "all": every visual token), seeded by (seed, sample_id, *stream)."""

    seed: int
    stream: tuple[Any, ...]
    count_of: ObjectTokens = ObjectTokens()
    among: str = "image"

    def __post_init__(self) -> None:
        if self.among not in RANDOM_FROM:
            raise ValueError(f"random tokens are drawn from one of {list(RANDOM_FROM)}, got {self.among!r}")


@dataclass(frozen=True)
class TopScored:
    """The k tokens with the highest `score` (a resource: per sample x task [n_visual] in layout
    order), k = as many as `count_of` selects."""

    score: str
    count_of: ObjectTokens = ObjectTokens()


@dataclass(frozen=True)
class AboveMedian:
    """Tokens whose `score` (a resource: per sample [n_visual]) is >= factor x the row's median."""

    score: str
    factor: float


Selection = Union[ObjectTokens, AllTokens, RandomTokens, TopScored, AboveMedian]


# --------------------------------------------------------------------------- what is done to them


@dataclass(frozen=True)
class Replace:
    """Set the selected tokens at the LM input to the vector resource `by` ([hidden])."""

    tokens: Selection
    by: str = "mean_embedding"


@dataclass(frozen=True)
class Permute:
    """Permute the selected tokens among themselves at the LM input, each within its own tile
    (`within="tile"`) or across the image's tiles ("image"); seeded by (seed, sample_id, *stream)."""

    tokens: Selection
    seed: int
    stream: tuple[Any, ...]
    within: str = "image"

    def __post_init__(self) -> None:
        if self.within not in ("tile", "image"):
            raise ValueError(f"tokens are permuted within a tile or the image, got within={self.within!r}")


@dataclass(frozen=True)
class Extend:
    """Grow the object region by `pad` rings filled with copies of the object's own tokens: per
    view, each ring token takes a uniformly drawn object token of that view (with replacement)."""

    pad: int
    seed: int
    stream: tuple[Any, ...]

    def __post_init__(self) -> None:
        if self.pad < 1:
            raise ValueError(f"extension needs pad >= 1 (pad 0 is the clean model), got {self.pad}")


@dataclass(frozen=True)
class BlockAttention:
    """Attention knockout: queries after the image (prompt and generated answer) may not attend to
    the selected key tokens in `layers`."""

    keys: Selection
    layers: tuple[int, ...]
    queries: str = "post_image"

    def __post_init__(self) -> None:
        if self.queries != "post_image":
            raise ValueError(f"unknown knockout query set {self.queries!r}; expected post_image")


@dataclass(frozen=True)
class AblateHeads:
    """Ablate heads at every position, prompt and answer: "mean" (the resource `head_means`, per
    task and position role) or "zero". heads: per task, the (layer, head) pairs of that task."""

    heads: tuple[tuple[str, tuple[Head, ...]], ...]
    ablation: str = "mean"

    def __post_init__(self) -> None:
        if self.ablation not in ABLATIONS:
            raise ValueError(f"unknown ablation {self.ablation!r}; expected one of {ABLATIONS}")

    def of_task(self, task: str) -> tuple[Head, ...]:
        return dict(self.heads).get(task, ())


Intervention = Union[Replace, Permute, Extend, BlockAttention, AblateHeads]


@dataclass(frozen=True)
class Condition:
    """A named set of interventions applied per row; no intervention = the clean model.

    columns: recorded on every result row of the condition (e.g. strategy, pad).
    tasks: the tasks it is measured on (None = every task of the run).
    """

    name: str
    interventions: tuple[Intervention, ...] = ()
    columns: Mapping[str, Any] = field(default_factory=dict)
    tasks: tuple[str, ...] | None = None

    def measured_on(self, task: str) -> bool:
        return self.tasks is None or task in self.tasks

    @property
    def keeps_image_prefix(self) -> bool:
        """Whether every position up to the image's end computes as in the clean run (no
        intervention, or attention knockout of queries after the image; attention is causal), so
        the condition's rows may share the clean image prefix's keys and values."""
        return all(isinstance(iv, BlockAttention) and iv.queries == "post_image" for iv in self.interventions)

    @property
    def resources(self) -> set[str]:
        """Names of the resources its interventions read."""
        out = set()
        for iv in self.interventions:
            out |= {name for name in (getattr(iv, "by", None), getattr(_selection(iv), "score", None)) if name}
            if isinstance(iv, AblateHeads) and iv.ablation == "mean":
                out.add("head_means")
        return out


BASELINE = Condition("baseline")


def pending(conditions: Sequence[Condition], samples: Sequence[Sample], tasks: Sequence[str],
            done: Collection[tuple[str, str, str]]) -> list[tuple[str, str, str]]:
    """Keys (sample_id, task, condition) the conditions measure that `done` lacks."""
    return [(s.sample_id, t, c.name) for s in samples for t in tasks for c in conditions
            if c.measured_on(t) and (s.sample_id, t, c.name) not in done]


# --------------------------------------------------------------------------- from data to edits


class Resources:
    """Named inputs computed on first use and kept: name -> provider() (see `vlmloc.resources`)."""

    def __init__(self, providers: Mapping[str, Callable[[], Any]] | None = None, **values: Any) -> None:
        self._providers = dict(providers or {})
        self._values: dict[str, Any] = dict(values)

    def __getitem__(self, name: str) -> Any:
        if name not in self._values:
            if name not in self._providers:
                raise KeyError(f"no resource {name!r}; this run provides {sorted(set(self._providers) | set(self._values))}")
            self._values[name] = self._providers[name]()
        return self._values[name]

    def setdefault(self, name: str, value: Any) -> None:
        """Provide `name` = value unless it is already provided."""
        if name not in self._values and name not in self._providers:
            self._values[name] = value


@dataclass
class RowInterventions:
    """One row's engine edits: token edits at the LM input, a knockout, head edits."""

    edits: list[TokenEdit]
    knockout: Knockout
    heads: list[HeadEdit]


def _selection(iv: Intervention) -> Selection | None:
    return getattr(iv, "tokens", None) or getattr(iv, "keys", None)


def select(sel: Selection, sample: Sample, layout: VisualLayout, task: str, res: Resources) -> np.ndarray:
    """Sequence positions ([k] int64, ascending) of the selected tokens in this row."""
    if isinstance(sel, ObjectTokens):
        return object_positions(layout, sample, sel.pad, sel.view)
    if isinstance(sel, AllTokens):
        return layout.positions
    if isinstance(sel, RandomTokens):
        k = len(select(sel.count_of, sample, layout, task, res))
        return random_positions(layout, k, row_rng(sel.seed, sample.sample_id, *sel.stream), sample, sel.among)
    if isinstance(sel, TopScored):
        k = len(select(sel.count_of, sample, layout, task, res))
        return top_k_positions(layout, res[sel.score][(sample.sample_id, task)], k)
    if isinstance(sel, AboveMedian):
        sc = res[sel.score][sample.sample_id]
        return layout.positions[sc >= sel.factor * np.median(sc)]
    raise TypeError(f"unknown token selection {sel!r}")


def _permutation(iv: Permute, sample: Sample, layout: VisualLayout, task: str, res: Resources) -> TokenEdit:
    rng = row_rng(iv.seed, sample.sample_id, *iv.stream)
    if isinstance(iv.tokens, AllTokens) and iv.within == "image":  # one draw over the whole layout
        return TokenEdit.copy(dst=layout.positions, src=layout.positions[rng.permutation(layout.n_visual)])
    dst = select(iv.tokens, sample, layout, task, res)
    order = np.argsort(layout.positions)
    index = order[np.searchsorted(layout.positions[order], dst)]  # each position's place in the layout
    groups = layout.tile[index] if iv.within == "tile" else np.zeros(len(dst), dtype=np.int64)
    src = np.empty_like(dst)
    for g in np.unique(groups):
        idx = np.flatnonzero(groups == g)
        src[idx] = dst[idx][rng.permutation(len(idx))]
    return TokenEdit.copy(dst=dst, src=src)


def _extension(iv: Extend, sample: Sample, layout: VisualLayout) -> list[TokenEdit]:
    """One copy edit per view, views in sorted name order (the draws depend only on the rng); a view
    without object tokens (e.g. an object outside LLaVA's centre crop) gets no ring."""
    rng = row_rng(iv.seed, sample.sample_id, *iv.stream)
    obj = object_tokens(layout, sample, 0)
    ring = object_tokens(layout, sample, iv.pad) & ~obj
    edits = []
    for view in sorted(layout.grids):
        in_view = layout.in_view(view)
        dst, pool = layout.positions[ring & in_view], layout.positions[obj & in_view]
        if len(dst) and len(pool):
            edits.append(TokenEdit.copy(dst=dst, src=rng.choice(pool, size=len(dst), replace=True)))
    return edits


def _head_edits(iv: AblateHeads, layout: VisualLayout, task: str, seq_len: int, res: Resources) -> list[HeadEdit]:
    adapter = res["adapter"]
    heads = iv.of_task(task)
    if iv.ablation == "zero":
        zero = torch.zeros(adapter.head_dim, dtype=adapter.model.dtype, device=adapter.device)
        return [HeadEdit(layer, head, zero) for layer, head in heads]
    means = res["head_means"][task]
    out = []
    for layer, head in heads:
        value, tail = means.row_value(layer, layout, seq_len)
        sl = head_slice(adapter, head)
        out.append(HeadEdit(layer, head, value[:, sl], tail=tail[sl]))
    return out


def realize(cond: Condition, sample: Sample, layout: VisualLayout, task: str, seq_len: int, res: Resources) -> RowInterventions:
    """The engine edits of `cond` for one row. seq_len: the batch's padded prompt length (the first
    generated token's position); res: the run's resources, "adapter" and "new_tokens" (task -> the
    tokens its call may generate) among them."""
    out = RowInterventions([], Knockout.none(), [])
    for iv in cond.interventions:
        if isinstance(iv, Replace):
            dst = select(iv.tokens, sample, layout, task, res)
            if len(dst):  # e.g. an object outside LLaVA's centre crop has no tokens
                out.edits.append(TokenEdit.replace(dst, res[iv.by]))
        elif isinstance(iv, Permute):
            out.edits.append(_permutation(iv, sample, layout, task, res))
        elif isinstance(iv, Extend):
            out.edits += _extension(iv, sample, layout)
        elif isinstance(iv, BlockAttention):
            queries = post_image_queries(layout.positions, seq_len, extra=int(res["new_tokens"][task]))
            out.knockout = Knockout.make(queries, select(iv.keys, sample, layout, task, res), iv.layers)
        elif isinstance(iv, AblateHeads):
            out.heads += _head_edits(iv, layout, task, seq_len, res)
        else:
            raise TypeError(f"unknown intervention {iv!r}")
    return out
