"""Head ranking by mediation fraction (Fig. 5, 15): read a causal-mediation run's ``mf.parquet``
and rank each task's attention heads by their mean (or median, pooled) MF, then pick the heads an
ablation removes: the top k of a ranking, or as many random heads matched per layer (the control).

No model is needed: everything here works on the MF rows alone, so the head-ablation experiment
uses it to plan its conditions and the report uses it to list the top heads.

    ranks = rankings(load_mf(cma_dir), ["localization"], positions="all", by="mean", source=cma_dir / MF_FILE)
    top_heads(ranks["localization"], 10)          # [(layer, head), ...], highest MF first
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from vlmloc.results import TASKS
from vlmloc.seeds import row_rng

MF_FILE = "mf.parquet"
MF_COLUMNS = ("task", "layer", "head", "positions", "mf", "valid")
N_TOP_LISTED = 10  # heads of each ranking listed in run.json and the report

Head = tuple[int, int]  # (layer, head)


MF_STATISTICS = ("mean", "median", "pooled")


def mf_per_head(rows: pd.DataFrame, keys: tuple[str, ...] = ("task", "layer", "head")) -> pd.DataFrame:
    """Per head, over its valid rows: mean_mf, median_mf, pooled_mf and n (rows).

    pooled_mf = sum(P_base - P_patched) / sum(P_base - P_src): each pair weighted by its effect,
    so pairs whose denominator sits just above min_denominator cannot dominate as they can the mean.
    """
    valid = rows[rows["valid"].astype(bool) & rows["mf"].notna()]
    if {"p_base", "p_patched", "p_src"} <= set(valid.columns):
        valid = valid.assign(_num=valid["p_base"] - valid["p_patched"], _den=valid["p_base"] - valid["p_src"])
    else:
        valid = valid.assign(_num=np.nan, _den=np.nan)
    out = valid.groupby(list(keys), as_index=False).agg(
        mean_mf=("mf", "mean"), median_mf=("mf", "median"), _num=("_num", "sum"), _den=("_den", "sum"), n=("mf", "size"))
    out["pooled_mf"] = out["_num"] / out["_den"].where(out["_den"] != 0)
    return out[[*keys, "mean_mf", "median_mf", "pooled_mf", "n"]]


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


def check_same_model(cma_dir: str | Path, model_name: str) -> None:
    """Refuse a cma run (its run.json, when there is one) made with another model."""
    run_json = Path(cma_dir) / "run.json"
    if run_json.is_file():
        cma_model = (json.loads(run_json.read_text()).get("config") or {}).get("model", {}).get("name")
        if cma_model is not None and cma_model != model_name:
            raise ValueError(f"the cma run in {cma_dir} used model={cma_model}, this run model={model_name}")


def rank_heads(mf_df: pd.DataFrame, task: str, positions: str | None = "all", by: str = "mean") -> pd.DataFrame:
    """Heads of `task` ranked by an MF statistic over valid rows (NaN MF counts as invalid), highest first.

    by: mean (the paper's "mean MF"), median or pooled (`mf_per_head`). Columns layer, head,
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


def rankings(mf_df: pd.DataFrame, tasks: Iterable[str], positions: str, by: str, source: Path) -> dict[str, pd.DataFrame]:
    """`rank_heads` per task; a task without a single valid MF row (in `source`) is an error."""
    out = {}
    for task in tasks:
        ranking = rank_heads(mf_df, task, positions, by)
        if not (ranking["n"] > 0).any():
            raise ValueError(f"{source}: no valid MF row for task={task!r} positions={positions!r}")
        out[task] = ranking
    return out


def check_heads_fit(ranks: Mapping[str, pd.DataFrame], n_layers: int, n_heads: int, source: Path) -> None:
    """Every ranked head exists in a model of `n_layers` x `n_heads` (else the cma run was on another model)."""
    for task, r in ranks.items():
        if len(r) and (r["layer"].max() >= n_layers or r["head"].max() >= n_heads):
            raise ValueError(
                f"{source} ranks layer {r['layer'].max()} / head {r['head'].max()} for {task}, but the model has "
                f"{n_layers} layers x {n_heads} heads: was the cma run on another model?"
            )


def top_heads(ranking: pd.DataFrame, k: int) -> list[Head]:
    """The first `k` (layer, head) of a `rank_heads` frame."""
    return list(zip(ranking["layer"].iloc[:k].tolist(), ranking["head"].iloc[:k].tolist()))


def random_heads(heads: Sequence[Head], n_heads: int, seed: int, *keys: object) -> list[Head]:
    """As many heads per layer as `heads` has, drawn uniformly (without replacement) from the layer's `n_heads`.

    Each layer draws one random order of its heads (seeded by seed, keys and the layer) and takes
    its first c heads, so as the top-k set grows the random set grows with it: the k-set contains
    the (k-1)-set, and the control curve is monotone in what it removes, like the top-k curve.
    """
    # imported here: vlmloc.selection pulls in the model layer, and reports import this module
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
