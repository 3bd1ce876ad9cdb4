"""Head ablation (Fig. 5, 15): ablate the heads with the highest mean mediation fraction (MF)
cumulatively and measure both tasks, next to random heads matched per layer.

Input: a causal-mediation run (``experiment=cma``): ``<experiment.cma_dir>/mf.parquet``, one row
per sample x task x layer x head x positions with columns ``task``, ``layer``, ``head``,
``positions`` ("all" | "text"), ``mf`` and ``valid``. Heads are ranked per task by the mean of
``mf`` over the valid rows of ``positions == experiment.mf_positions`` (``rank_heads``); heads
without a valid row come last.

Conditions (besides the clean ``baseline``), for k on ``experiment.ks`` ("all" = every ranked
head; larger k are clipped):

- ``heads:top:k=K``: the K highest-ranked heads of the measured task's own ranking;
- ``heads:random:k=K``: random heads matched per layer to that top-K set (as many heads in each
  layer, drawn uniformly from the layer's heads, seeded by seed, task and layer, nested: the
  K-set contains every smaller set): the control a referee asked for;
- ``heads:cls_critical:k=K``: the classification ranking's top K, measured on localization only
  ("recognition, then localization").

Ablation (``experiment.ablation``): ``mean`` replaces a head's output by its mean over clean runs
of the first ``experiment.mean_samples`` samples with the measured task's prompt, per position
with the same role (chat prefix aligned on the image start, each visual token by view and place
in its tile, the text after the image aligned on the sequence end), generated tokens taking the
mean over the text positions after the image (``experiment.answer_mean=text``; ``prompt`` = over
every prompt position) (``vlmloc.engine.head_means``); ``zero`` sets it to 0. Every position is ablated, prompt and
generated answer.

Outputs: ``results.parquet`` (extra columns ``head_set``, ``k``, ``ranking``, ``heads_edited``),
``fig5_head_ablation.md`` (accuracy and change per condition, and the top heads of each ranking
with their layer and head indices), ``fig5_head_ablation.png`` (accuracy vs k, top vs random,
a panel per task, the classification-critical curve on the localization panel).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from omegaconf import OmegaConf

from vlmloc.runner import RunContext
from vlmloc.conditions import ABLATIONS, BASELINE, AblateHeads, Condition
from vlmloc.engine.head_means import ANSWER_MEANS
from vlmloc.models.loading import lm_shape
from vlmloc.experiments.cma import MF_STATISTICS, mf_per_head
from vlmloc.reports.tables import task_columns
from vlmloc.reports.tables import add_baseline_delta, summarize, to_markdown
from vlmloc.results import TASKS, atomic_write
from vlmloc.selection import row_rng

log = logging.getLogger("vlmloc.experiments.head_ablation")

MF_FILE = "mf.parquet"
MF_COLUMNS = ("task", "layer", "head", "positions", "mf", "valid")
HEAD_SETS = ("top", "random", "cls_critical")
TABLE_FILE = "fig5_head_ablation.md"
FIG_FILE = "fig5_head_ablation.png"
N_TOP_LISTED = 10

Head = tuple[int, int]  # (layer, head)


# --------------------------------------------------------------------------- MF input and ranking


def load_mf(cma_dir: str | Path) -> pd.DataFrame:
    """mf.parquet of a cma run, checked: the columns ranking needs, known tasks, integer heads."""
    path = Path(cma_dir) / MF_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"no {MF_FILE} in experiment.cma_dir={cma_dir}: point it at the run directory of "
            "`python -m vlmloc experiment=cma ...` (same model), which writes mf.parquet"
        )
    try:
        df = pd.read_parquet(path)
    except Exception as err:  # pyarrow raises several types for a damaged file
        raise ValueError(f"{path} is not a readable parquet file: {err}") from err
    missing = [c for c in MF_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"{path} lacks column(s) {missing}; a cma run's mf.parquet has {list(MF_COLUMNS)} (and more)")
    bad_tasks = sorted(set(df["task"].astype(str)) - set(TASKS))
    if bad_tasks:
        raise ValueError(f"{path}: unknown task value(s) {bad_tasks}; expected {list(TASKS)}")
    for col in ("layer", "head"):
        if not pd.api.types.is_integer_dtype(df[col]) or (df[col] < 0).any():
            raise ValueError(f"{path}: column {col!r} must hold integers >= 0, got dtype {df[col].dtype}")
    if not pd.api.types.is_bool_dtype(df["valid"]):
        raise ValueError(f"{path}: column 'valid' must be boolean, got dtype {df['valid'].dtype}")
    if not pd.api.types.is_numeric_dtype(df["mf"]):
        raise ValueError(f"{path}: column 'mf' must be numeric, got dtype {df['mf'].dtype}")
    return df


def rank_heads(mf_df: pd.DataFrame, task: str, positions: str | None = "all", by: str = "mean") -> pd.DataFrame:
    """Heads of `task` ranked by an MF statistic over valid rows (NaN MF counts as invalid), highest first.

    by: mean (the paper's "mean MF"), median or pooled (`cma.mf_per_head`). Columns layer, head,
    mean_mf, median_mf, pooled_mf, n (valid rows). Heads present in the frame without a valid row
    come last (NaN, n 0); ties break by (layer, head). positions: keep only rows of that patching
    variant (None = all rows).
    """
    if by not in MF_STATISTICS:
        raise ValueError(f"heads are ranked by one of {list(MF_STATISTICS)}, got {by!r}")
    sub = mf_df[mf_df["task"] == task]
    if positions is not None:
        sub = sub[sub["positions"] == positions]
    if not len(sub):
        have = sorted(map(tuple, mf_df[["task", "positions"]].drop_duplicates().astype(str).to_numpy().tolist()))
        raise ValueError(f"no MF rows for task={task!r} positions={positions!r}; the frame has (task, positions) {have}")
    stats = mf_per_head(sub, ("layer", "head"))
    heads = sub[["layer", "head"]].drop_duplicates()
    out = heads.merge(stats, on=["layer", "head"], how="left")
    out["n"] = out["n"].fillna(0).astype(int)
    out["layer"], out["head"] = out["layer"].astype(int), out["head"].astype(int)
    out = out.sort_values([f"{by}_mf", "layer", "head"], ascending=[False, True, True], na_position="last")
    return out[["layer", "head", "mean_mf", "median_mf", "pooled_mf", "n"]].reset_index(drop=True)


def top_heads(ranking: pd.DataFrame, k: int) -> list[Head]:
    return list(zip(ranking["layer"].iloc[:k].tolist(), ranking["head"].iloc[:k].tolist()))


def random_heads(heads: Sequence[Head], n_heads: int, seed: int, *keys: object) -> list[Head]:
    """As many heads per layer as `heads` has, drawn uniformly (without replacement) from the layer's `n_heads`.

    Each layer draws one random order of its heads (seeded by seed, keys and the layer) and takes
    its first c heads, so as the top-k set grows the random set grows with it: the k-set contains
    the (k-1)-set, and the control curve is monotone in what it removes, like the top-k curve.
    """
    counts = Counter(layer for layer, _ in heads)
    out: list[Head] = []
    for layer in sorted(counts):
        if counts[layer] > n_heads:
            raise ValueError(f"{counts[layer]} heads in layer {layer}, but a layer has {n_heads}")
        order = row_rng(seed, *keys, layer).permutation(n_heads)
        out += [(layer, int(h)) for h in np.sort(order[: counts[layer]])]
    return out


def k_values(ks: Sequence[Any], n_ranked: int) -> list[int]:
    """The k grid: "all" = n_ranked; values above n_ranked clipped; sorted, distinct."""
    return sorted({n_ranked if str(k) == "all" else min(int(k), n_ranked) for k in ks})


# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class Settings:
    """experiment.* checked and typed."""

    cma_dir: Path
    mf_positions: str
    ks: tuple[Any, ...]
    head_sets: tuple[str, ...]
    ablation: str
    mean_samples: int
    tasks: tuple[str, ...]
    rank_by: str = "mean"
    answer_mean: str = "text"

    @property
    def ranking_tasks(self) -> list[str]:
        """Tasks whose ranking the conditions use."""
        need = set(self.tasks) if {"top", "random"} & set(self.head_sets) else set()
        if "cls_critical" in self.head_sets:
            need.add("classification")
        return [t for t in TASKS if t in need]


def settings(cfg: Any) -> Settings:
    exp = cfg.experiment
    if OmegaConf.is_missing(exp, "cma_dir") or exp.cma_dir is None:
        raise ValueError(
            "experiment=head_ablation needs experiment.cma_dir=<run directory of experiment=cma>, "
            "the causal-mediation run whose mf.parquet ranks the heads"
        )
    ks = tuple(exp.ks)
    for k in ks:
        if str(k) != "all" and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise ValueError(f"experiment.ks holds integers >= 1 or 'all', got {list(ks)}")
    if not ks:
        raise ValueError("experiment.ks is empty")
    head_sets = tuple(str(h) for h in exp.head_sets)
    if not head_sets or any(h not in HEAD_SETS for h in head_sets) or len(set(head_sets)) != len(head_sets):
        raise ValueError(f"experiment.head_sets must be distinct values of {list(HEAD_SETS)}, got {list(head_sets)}")
    if str(exp.ablation) not in ABLATIONS:
        raise ValueError(f"experiment.ablation must be one of {list(ABLATIONS)}, got {exp.ablation!r}")
    if int(exp.mean_samples) < 1:
        raise ValueError(f"experiment.mean_samples must be >= 1, got {exp.mean_samples}")
    tasks = tuple(str(t) for t in exp.tasks)
    if not tasks or any(t not in TASKS for t in tasks):
        raise ValueError(f"experiment.tasks must be a non-empty subset of {list(TASKS)}, got {list(tasks)}")
    if head_sets == ("cls_critical",) and "localization" not in tasks:
        raise ValueError("head_sets=[cls_critical] is measured on localization: add localization to experiment.tasks")
    if str(exp.rank_by) not in MF_STATISTICS:
        raise ValueError(f"experiment.rank_by must be one of {list(MF_STATISTICS)}, got {exp.rank_by!r}")
    if str(exp.answer_mean) not in ANSWER_MEANS:
        raise ValueError(f"experiment.answer_mean must be one of {list(ANSWER_MEANS)}, got {exp.answer_mean!r}")
    return Settings(Path(str(exp.cma_dir)), str(exp.mf_positions), ks, head_sets, str(exp.ablation), int(exp.mean_samples), tasks,
                    str(exp.rank_by), str(exp.answer_mean))


def rankings(mf: pd.DataFrame, st: Settings) -> dict[str, pd.DataFrame]:
    out = {}
    for task in st.ranking_tasks:
        ranking = rank_heads(mf, task, st.mf_positions, st.rank_by)
        if not (ranking["n"] > 0).any():
            raise ValueError(f"{st.cma_dir / MF_FILE}: no valid MF row for task={task!r} positions={st.mf_positions!r}")
        out[task] = ranking
    return out


def check_config(cfg: Any) -> None:
    """Fail fast, before data or model work: settings, the cma run's mf.parquet, the same model."""
    st = settings(cfg)
    rankings(load_mf(st.cma_dir), st)
    run_json = st.cma_dir / "run.json"
    if run_json.is_file():
        cma_model = (json.loads(run_json.read_text()).get("config") or {}).get("model", {}).get("name")
        if cma_model is not None and cma_model != str(cfg.model.name):
            raise ValueError(f"the cma run in {st.cma_dir} used model={cma_model}, this run model={cfg.model.name}")


# --------------------------------------------------------------------------- conditions


def condition_name(head_set: str, k: int) -> str:
    return f"heads:{head_set}:k={k}"


@dataclass(frozen=True)
class Plan:
    """The rankings and k grid that decide which heads each condition ablates (no model needed)."""

    ranks: Mapping[str, pd.DataFrame]
    st: Settings

    @property
    def ks(self) -> list[int]:
        return k_values(self.st.ks, max(len(r) for r in self.ranks.values()))

    def heads(self, head_set: str, k: int, task: str, n_heads: int, seed: int) -> list[Head]:
        if head_set == "top":
            return top_heads(self.ranks[task], k)
        if head_set == "random":
            return random_heads(top_heads(self.ranks[task], k), n_heads, seed, "heads_random", task)
        if head_set == "cls_critical":
            return top_heads(self.ranks["classification"], k)
        raise ValueError(f"unknown head set {head_set!r}; expected one of {HEAD_SETS}")


def conditions(plan: Plan, n_heads: int, *, seed: int) -> list[Condition]:
    """baseline, then per head set and k: the heads of each measured task, ablated by `ablation`."""
    conds = [Condition(BASELINE.name, columns={"head_set": "none", "k": 0, "ranking": ""})]
    for head_set in plan.st.head_sets:
        tasks = tuple(t for t in plan.st.tasks if t == "localization") if head_set == "cls_critical" else plan.st.tasks
        for k in plan.ks:
            heads = tuple((t, tuple(plan.heads(head_set, k, t, n_heads, seed))) for t in tasks)
            columns = {"head_set": head_set, "k": k, "ranking": "classification" if head_set == "cls_critical" else "task"}
            conds.append(Condition(condition_name(head_set, k), (AblateHeads(heads, plan.st.ablation),), columns, tasks))
    return conds


def check_heads_fit(ranks: Mapping[str, pd.DataFrame], n_layers: int, n_heads: int, source: Path) -> None:
    for task, r in ranks.items():
        if len(r) and (r["layer"].max() >= n_layers or r["head"].max() >= n_heads):
            raise ValueError(
                f"{source} ranks layer {r['layer'].max()} / head {r['head'].max()} for {task}, but the model has "
                f"{n_layers} layers x {n_heads} heads: was the cma run on another model?"
            )


# --------------------------------------------------------------------------- run


def run(ctx: RunContext) -> None:
    cfg = ctx.cfg
    st = settings(cfg)
    plan = Plan(rankings(load_mf(st.cma_dir), st), st)
    n_layers, n_heads = lm_shape(cfg.model)
    check_heads_fit(plan.ranks, n_layers, n_heads, st.cma_dir / MF_FILE)
    conds = conditions(plan, n_heads, seed=int(cfg.seed))

    def provenance() -> dict:
        return {"head_ablation": {
            "cma_dir": str(st.cma_dir),
            "mean_samples": min(st.mean_samples, len(ctx.samples)) if st.ablation == "mean" else 0,
            "top_heads": {t: [list(h) for h in top_heads(r, N_TOP_LISTED)] for t, r in plan.ranks.items()},
        }}

    results = ctx.run_conditions(conds, list(st.tasks), provenance=provenance)
    report(results, ctx.run_dir, plan=plan, names=[c.name for c in conds], cfg=cfg)


# --------------------------------------------------------------------------- table and figure


def ablation_table(results: pd.DataFrame, names: Sequence[str]) -> pd.DataFrame:
    """One row per condition: head set, k, n, accuracy per task and change from baseline (points)."""
    df = results[results["condition"].isin(list(names))]
    summary = add_baseline_delta(summarize(df)).set_index(["condition", "task"])
    first = df.drop_duplicates("condition").set_index("condition")
    rows = []
    for cond in names:
        if cond not in first.index:
            continue
        row: dict[str, Any] = {"condition": cond, "head_set": first.loc[cond, "head_set"], "k": int(first.loc[cond, "k"]), "n": None}
        row.update(task_columns(summary, cond))
        rows.append(row)
    return pd.DataFrame(rows)


def ranking_markdown(ranks: Mapping[str, pd.DataFrame], n: int = N_TOP_LISTED) -> str:
    parts = []
    for task, r in ranks.items():
        top = r.head(n).copy()
        top.insert(0, "rank", range(1, len(top) + 1))
        parts += [f"### Top {len(top)} heads by mean MF: {task}", "", to_markdown(top, digits=3), ""]
    return "\n".join(parts)


def plot_head_ablation(table: pd.DataFrame, path: Path, title: str = "") -> None:
    """Accuracy vs k per task panel: top heads solid, random heads (matched per layer) dashed,
    classification-critical heads on the localization panel dash-dotted, baseline dotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(t, s) for t, s in (("localization", "loc"), ("classification", "cls")) if s in table and table[s].notna().any()]
    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(5.2 * max(len(panels), 1), 3.8), squeeze=False)
    styles = {"top": ("-", "tab:red", "top heads (own ranking)"), "random": ("--", "0.45", "random heads, matched per layer"),
              "cls_critical": ("-.", "tab:purple", "classification-critical heads")}
    base = table[table["condition"] == BASELINE.name]
    for ax, (task, short) in zip(axes[0], panels):
        if len(base) and pd.notna(base[short].iloc[0]):
            ax.axhline(float(base[short].iloc[0]), color="k", linestyle=":", linewidth=1, label="no ablation")
        for head_set, (style, color, label) in styles.items():
            sub = table[(table["head_set"] == head_set) & table[short].notna()].sort_values("k")
            if len(sub):
                ax.plot(sub["k"], sub[short], style, marker="o", markersize=3, color=color, label=label)
        ks = sorted(set(table.loc[table["head_set"] != "none", "k"].astype(int)))
        ax.set_xscale("log")
        ax.set_xticks(ks, [str(k) for k in ks], fontsize=7)
        ax.minorticks_off()
        ax.set_ylim(-2, 102)
        ax.set_xlabel("heads ablated (k, cumulative by mean MF)")
        ax.set_ylabel("accuracy (%)")
        ax.set_title(task)
        ax.legend(fontsize=7, loc="lower left")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)


def report(results: pd.DataFrame, run_dir: Path, *, plan: Plan, names: Sequence[str], cfg: Any) -> str:
    """The markdown (table + rankings) and the figure from the stored rows; returns (and prints) the markdown."""
    run_dir = Path(run_dir)
    st = plan.st
    table = ablation_table(results, names)
    text = "\n".join([
        "# Head ablation (Fig. 5)",
        "",
        f"model={cfg.model.name} | data={cfg.data.name} | {run_dir} | cma_dir={st.cma_dir}",
        "",
        f"Heads ranked per task by {st.rank_by} MF over valid rows (positions={st.mf_positions}); the top k ablated together "
        f"({st.ablation} ablation, every position). random: as many heads per layer as the top-k set, drawn uniformly "
        "(control). cls_critical: the classification ranking's top k, measured on localization. loc: mean over "
        "IoU 0.5/0.7/0.9 of the hit rates (%); cls: % yes; deltas in points vs baseline.",
        "",
        to_markdown(table),
        "",
        ranking_markdown(plan.ranks),
    ])
    atomic_write(run_dir / TABLE_FILE, lambda f: f.write(text.encode("utf-8")))
    if len(table):
        plot_head_ablation(table, run_dir / FIG_FILE, f"Head ablation: model={cfg.model.name}, data={cfg.data.name}, n={table['n'].max()}")
    print(f"\n{text}")
    return text
