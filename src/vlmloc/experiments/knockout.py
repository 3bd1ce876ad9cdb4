"""Attention knockout (Fig. 3, 12): block attention from the positions after the image to the
object's tokens in a set of LM layers, and measure both tasks.

Conditions (besides the clean ``baseline``), for each key set in ``experiment.key_sets``:

- ``knockout:<keys>:layers=a-b``: windows of ``experiment.window`` consecutive layers
  (0-5, 6-11, ...; the last window is what remains);
- ``knockout:<keys>:layer=i``: every single layer (``experiment.include_single_layers``).

Query set ``post_image`` (the only one so far): every position after the image span, i.e. the
prompt after the image and every generated answer token (the hook maps queries through the KV
cache, so generated positions are blocked at every decoding step). Key sets: ``object`` (the
object's tokens, any-pixel overlap, p = 0) and ``random`` (as many visual tokens drawn uniformly,
seeded per sample: the same draw for every layer set; the control).

Paper: localization collapses when early-mid layers (LLaVA) or mid-late layers (InternVL) are
blocked; classification stays largely stable.

Outputs: ``results.parquet`` (extra columns ``keys``, ``layers``, ``layer_first``, ``layer_last``,
``knockout_keys``), ``fig3_knockout.md`` (condition x task accuracy and change from baseline),
``fig3_knockout.png`` (accuracy vs blocked layers, a line per task, random keys dashed).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from omegaconf import MISSING

import pandas as pd

from vlmloc.conditions import (
    BASELINE,
    BlockAttention,
    Condition,
    ObjectTokens,
    RandomTokens,
)
from vlmloc.models.loading import lm_shape
from vlmloc.reports import knockout as knockout_report
from vlmloc.results import TASKS
from vlmloc.runner import RunContext
from vlmloc.selection import RANDOM_FROM
from vlmloc.settings import at_least, load, one_of, register, subset_of
from vlmloc.paraphrases import Paraphrased

KEY_SETS = ("object", "random")
QUERY_SETS = ("post_image",)


# --------------------------------------------------------------------------- config


@register("knockout")
@dataclass(frozen=True)
class Settings(Paraphrased):
    """experiment.* of configs/experiment/knockout.yaml, typed and checked."""

    name: str = MISSING
    window: int = MISSING
    include_single_layers: bool = MISSING
    key_sets: tuple[str, ...] = MISSING
    query_set: str = MISSING
    tasks: tuple[str, ...] = MISSING
    random_from: str = MISSING

    def __post_init__(self) -> None:
        subset_of("experiment.key_sets", self.key_sets, KEY_SETS, distinct=True)
        one_of("experiment.query_set", self.query_set, QUERY_SETS)
        at_least("experiment.window", self.window, 1)
        subset_of("experiment.tasks", self.tasks, TASKS)
        one_of("experiment.random_from", self.random_from, RANDOM_FROM)


def settings(cfg: Any) -> Settings:
    return load(Settings, cfg)


def check_config(cfg: Any) -> None:
    """Fail fast, before data or model work: valid settings, an attention that can take the mask."""
    settings(cfg)
    attn = str(cfg.model.attn_implementation)
    if attn not in ("sdpa", "eager"):
        raise ValueError(
            f"attention knockout needs model.attn_implementation=sdpa or eager (got {attn!r}): "
            "flash-attention takes only a padding mask"
        )


# --------------------------------------------------------------------------- conditions


@dataclass(frozen=True)
class LayerSet:
    """Layers blocked together: a window (``layers=a-b``) or a single layer (``layer=i``)."""

    first: int
    last: int
    single: bool = False

    @property
    def label(self) -> str:
        return f"layer={self.first}" if self.single else f"layers={self.first}-{self.last}"

    @property
    def layers(self) -> range:
        return range(self.first, self.last + 1)


def layer_sets(n_layers: int, window: int, include_single_layers: bool) -> list[LayerSet]:
    """Windows of `window` consecutive layers (the last one is what remains), then single layers."""
    if window < 1:
        raise ValueError(f"experiment.window must be >= 1, got {window}")
    sets = [LayerSet(a, min(a + window, n_layers) - 1) for a in range(0, n_layers, window)]
    if include_single_layers:
        sets += [LayerSet(i, i, single=True) for i in range(n_layers)]
    return sets


def condition_name(keys: str, layer_set: LayerSet) -> str:
    return f"knockout:{keys}:{layer_set.label}"


def key_tokens(keys: str, seed: int, random_from: str = "image") -> ObjectTokens | RandomTokens:
    """The key set: the object's tokens, or as many random visual tokens (seeded per sample, from
    the image area or every token: `random_from`; the same draw for every layer set)."""
    if keys == "object":
        return ObjectTokens()
    if keys == "random":
        return RandomTokens(seed, ("knockout", "random"), among=random_from)
    raise ValueError(f"unknown knockout key set {keys!r}; expected one of {KEY_SETS}")


BASELINE_COLUMNS = {"keys": "none", "layers": "", "layer_first": -1, "layer_last": -1}


def conditions(n_layers: int, st: Settings, *, seed: int) -> list[Condition]:
    """baseline, then per key set: the layer windows, then the single layers."""
    conds = [Condition(BASELINE.name, columns=BASELINE_COLUMNS)]
    for keys in st.key_sets:
        for ls in layer_sets(n_layers, st.window, st.include_single_layers):
            block = BlockAttention(key_tokens(keys, seed, st.random_from), tuple(ls.layers), st.query_set)
            columns = {"keys": keys, "layers": ls.label.split("=")[1], "layer_first": ls.first, "layer_last": ls.last}
            conds.append(Condition(condition_name(keys, ls), (block,), columns))
    return conds


# --------------------------------------------------------------------------- run


def run(ctx: RunContext) -> None:
    cfg = ctx.cfg
    st = settings(cfg)
    n_layers, _ = lm_shape(cfg.model)
    conds = conditions(n_layers, st, seed=int(cfg.seed))
    ctx.run_conditions(conds, list(st.tasks))


def report(ctx: RunContext, results: pd.DataFrame) -> None:
    names = [c.name for c in conditions(lm_shape(ctx.cfg.model)[0], settings(ctx.cfg), seed=int(ctx.cfg.seed))]
    knockout_report.write(results, ctx.run_dir, ctx.cfg, names=names)

