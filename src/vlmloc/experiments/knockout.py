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

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from vlmloc.runner import RunContext
from vlmloc.conditions import BASELINE, BlockAttention, Condition, ObjectTokens, RandomTokens
from vlmloc.reports.tables import task_columns
from vlmloc.models.loading import lm_shape
from vlmloc.reports.tables import add_baseline_delta, summarize, to_markdown
from vlmloc.results import atomic_write
from vlmloc.selection import RANDOM_FROM

log = logging.getLogger("vlmloc.experiments.knockout")

KEY_SETS = ("object", "random")
QUERY_SETS = ("post_image",)
TABLE_FILE = "fig3_knockout.md"
FIG_FILE = "fig3_knockout.png"
TASK_COLORS = {"localization": "tab:blue", "classification": "tab:orange"}


# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class Settings:
    """experiment.* checked and typed."""

    window: int
    include_single_layers: bool
    key_sets: tuple[str, ...]
    query_set: str
    tasks: tuple[str, ...]
    random_from: str = "image"


def settings(cfg: Any) -> Settings:
    exp = cfg.experiment
    keys = tuple(str(k) for k in exp.key_sets)
    if not keys or any(k not in KEY_SETS for k in keys) or len(set(keys)) != len(keys):
        raise ValueError(f"experiment.key_sets must be distinct values of {list(KEY_SETS)}, got {list(keys)}")
    if str(exp.query_set) not in QUERY_SETS:
        raise ValueError(f"experiment.query_set must be one of {list(QUERY_SETS)}, got {exp.query_set!r}")
    if int(exp.window) < 1:
        raise ValueError(f"experiment.window must be >= 1, got {exp.window}")
    tasks = tuple(str(t) for t in exp.tasks)
    if not tasks or any(t not in TASK_COLORS for t in tasks):
        raise ValueError(f"experiment.tasks must be a non-empty subset of {list(TASK_COLORS)}, got {list(tasks)}")
    if str(exp.random_from) not in RANDOM_FROM:
        raise ValueError(f"experiment.random_from must be one of {list(RANDOM_FROM)}, got {exp.random_from!r}")
    return Settings(int(exp.window), bool(exp.include_single_layers), keys, str(exp.query_set), tasks, str(exp.random_from))


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
    results = ctx.run_conditions(conds, list(st.tasks))
    report(results, ctx.run_dir, names=[c.name for c in conds], cfg=cfg)


# --------------------------------------------------------------------------- table and figure


def knockout_table(results: pd.DataFrame, names: Sequence[str]) -> pd.DataFrame:
    """One row per condition (in `names` order): keys, layers, n, accuracy per task and its change
    from the baseline (points), mean number of key tokens blocked."""
    df = results[results["condition"].isin(list(names))]
    summary = add_baseline_delta(summarize(df)).set_index(["condition", "task"])
    first = df.drop_duplicates("condition").set_index("condition")
    n_keys = df.groupby("condition")["knockout_keys"].mean() if "knockout_keys" in df else pd.Series(dtype=float)
    rows = []
    for cond in names:
        if cond not in first.index:
            continue
        row: dict[str, Any] = {
            "condition": cond,
            "keys": first.loc[cond, "keys"] if "keys" in first else None,
            "layers": first.loc[cond, "layers"] if "layers" in first else None,
            "key_tokens": n_keys.get(cond),
            "n": None,
        }
        row.update(task_columns(summary, cond))
        rows.append(row)
    return pd.DataFrame(rows)


def plot_knockout(tables: Mapping[str, pd.DataFrame], path: Path, title: str = "") -> None:
    """Accuracy vs blocked layers; one row of panels per model (windows | single layers), a colour per
    task, object keys solid, random keys dashed, the clean baseline dotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.lines
    import matplotlib.pyplot as plt

    models = list(tables)
    fig, axes = plt.subplots(len(models), 2, figsize=(11, 3.4 * len(models)), squeeze=False, gridspec_kw={"width_ratios": [1, 2]})
    for row, model in enumerate(models):
        tab = tables[model]
        base = tab[tab["condition"] == BASELINE.name]
        windows = tab[tab["layers"].astype(str).str.contains("-")]
        singles = tab[tab["condition"].str.contains(":layer=", regex=False)]
        for ax, part, what in ((axes[row][0], windows, "windows"), (axes[row][1], singles, "single layers")):
            labels = list(dict.fromkeys(part["layers"].astype(str)))
            xs = {lab: i for i, lab in enumerate(labels)}
            for task, short in (("localization", "loc"), ("classification", "cls")):
                if short not in tab:
                    continue
                color = TASK_COLORS[task]
                if len(base) and pd.notna(base[short].iloc[0]):
                    ax.axhline(float(base[short].iloc[0]), color=color, linestyle=":", linewidth=1)
                for keys, style in (("object", "-"), ("random", "--")):
                    sub = part[part["keys"] == keys]
                    if len(sub) and sub[short].notna().any():
                        ax.plot([xs[str(v)] for v in sub["layers"]], sub[short], style, marker="o", markersize=3,
                                color=color, label=f"{task}, {keys} keys")
            ax.set_xticks(range(len(labels)), labels, rotation=90 if len(labels) > 12 else 0, fontsize=7)
            ax.set_ylim(-2, 102)
            ax.set_xlabel(f"blocked layers ({what})")
            ax.set_ylabel("accuracy (%)")
            ax.set_title(f"{model}: {what}", fontsize=9)
    legend = {}
    for ax in axes.flat:
        legend.update(zip(*reversed(ax.get_legend_handles_labels())))
    labels, handles = list(legend), list(legend.values())
    handles.append(matplotlib.lines.Line2D([], [], color="0.3", linestyle=":", linewidth=1))
    labels.append("no knockout (per task colour)")
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=3, fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120, bbox_inches="tight"))
    plt.close(fig)


def report(results: pd.DataFrame, run_dir: Path, *, names: Sequence[str], cfg: Any) -> str:
    """The markdown table and the figure from the stored rows; returns (and prints) the markdown."""
    run_dir = Path(run_dir)
    table = knockout_table(results, names)
    head = f"model={cfg.model.name} | data={cfg.data.name} | {run_dir}"
    text = "\n".join([
        "# Attention knockout (Fig. 3)",
        "",
        head,
        "",
        f"Attention from every position after the image (prompt and generated answer) to the key tokens is "
        f"blocked in the listed layers (windows of {int(cfg.experiment.window)}, then single layers). keys: object = "
        "the object's tokens; random = as many random visual tokens (control). key_tokens: mean keys blocked per "
        "row. loc: mean over IoU 0.5/0.7/0.9 of the hit rates (%); cls: % yes; deltas in points vs baseline.",
        "",
        to_markdown(table),
        "",
    ])
    atomic_write(run_dir / TABLE_FILE, lambda f: f.write(text.encode("utf-8")))
    if len(table):
        plot_knockout({str(cfg.model.name): table}, run_dir / FIG_FILE, f"Attention knockout: data={cfg.data.name}, n={table['n'].max()}")
    print(f"\n{text}")
    return text
