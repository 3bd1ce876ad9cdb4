"""Causal mediation analysis per head (Fig. 4, 13, 14): MF for every pair x task x layer x head.

Writes mf.parquet (one row per sample x task x layer x head: p_src, p_base, p_patched,
denominator, mf, valid, the source answer and its IoU), excluded_pairs.parquet (pairs left out of
a task before patching: localization pairs whose source box misses, IoU below
experiment.localization_source_min_iou, since the source run must answer correctly), a summary
with the top-k heads per task with their layer and head indices, the overlap of the two tasks'
top-k sets, the critical-head threshold and count, the pairs excluded for a small denominator,
and layer x head heatmaps of mean MF per task.
"""

from __future__ import annotations

import logging

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from vlmloc import geometry
from vlmloc.runner import RunContext
from vlmloc.data.pairs import inpainted_sample, read_manifest
from vlmloc.data.sample import Sample
from vlmloc.engine.mediation import Target, head_mediation, mediation_fraction
from vlmloc.engine.runner import generate
from vlmloc.reports.tables import to_markdown
from vlmloc.results import atomic_write

log = logging.getLogger("vlmloc.experiments.cma")
MF_FILE = "mf.parquet"
MF_COLUMNS = ["sample_id", "image_id", "category", "task", "layer", "head", "positions", "p_src", "p_base",
              "p_patched", "denominator", "mf", "valid", "answer", "source_iou"]
# pairs left out of a task before any patching (localization: the source box missed), one row each
EXCLUDED_FILE = "excluded_pairs.parquet"
EXCLUDED_COLUMNS = ["sample_id", "image_id", "category", "task", "answer", "source_iou", "reason"]


def check_config(cfg) -> None:
    if str(cfg.data.kind) != "pairs":
        raise ValueError(f"experiment=cma needs source/base pairs: run experiment=make_pairs, then data=pairs data.pairs_dir=<its run dir> (got data={cfg.data.name})")
    if str(cfg.experiment.positions) not in ("all", "text"):
        raise ValueError("experiment.positions must be all or text")
    check_pairs_model(cfg)


def check_pairs_model(cfg) -> None:
    """The pairs were kept by one model's answers (recognized in the original, not in the inpainted
    image): analysing them with another model is refused, or only warned about with
    `experiment.other_model_pairs=warn`."""
    policy = str(cfg.experiment.other_model_pairs)
    if policy not in ("refuse", "warn"):
        raise ValueError(f"experiment.other_model_pairs must be refuse or warn (got {policy!r})")
    manifest = read_manifest(cfg.data.pairs_dir)
    names = sorted({str(m).split("@")[0] for m in manifest["model"].dropna()}) if "model" in manifest else []
    if not names or names == [str(cfg.model.name)]:
        return
    msg = (f"the pairs in {cfg.data.pairs_dir} were kept by the answers of model {', '.join(names)}, not model="
           f"{cfg.model.name}: they need not be pairs this model recognizes and then misses. Make pairs with this "
           f"model (experiment=make_pairs model={cfg.model.name}), or set experiment.other_model_pairs=warn")
    if policy == "refuse":
        raise ValueError(msg)
    log.warning(msg)


def _pair_rows(ctx: RunContext, sample: Sample, task: str) -> pd.DataFrame | dict:
    """The pair's MF rows for `task`, or (a dict) the record of why the pair is left out of it."""
    ad, exp = ctx.adapter, ctx.cfg.experiment
    source_image, base_image = sample.load_image(), inpainted_sample(sample).load_image()
    prompt = ad.prompt(task, sample.category)
    answer, target = "", Target(0)
    source_iou = np.nan
    if task == "localization":
        answer = generate(ad, ad.prepare([source_image], [prompt]), int(ad.cfg.localization.max_new_tokens))[0]
        box = ad.parse_box(answer, source_image.width, source_image.height)
        source_iou = geometry.box_iou(box, sample.box_xyxy)
        need = exp.localization_source_min_iou
        if need is not None and source_iou < float(need):
            # the source run must give the correct answer: no localization MF for this pair
            return {"sample_id": sample.sample_id, "image_id": int(sample.image_id), "category": sample.category,
                    "task": task, "answer": answer, "source_iou": source_iou,
                    "reason": f"source box missed (IoU {source_iou:.2f} < {float(need)})"}
        text = prompt + str(ad.cfg.classification.answer_prefix) + answer
        n_answer = ad.prepare([source_image], [text]).seq_len - ad.prepare([source_image], [prompt]).seq_len
        target, prompt = Target(n_answer, str(exp.localization_p)), text
        if n_answer == 0:
            raise ValueError(f"{sample.sample_id}: empty source answer")
    src, base = ad.prepare([source_image], [prompt]), ad.prepare([base_image], [prompt])
    p_src, p_base, patched = head_mediation(
        ad, src, base, target, layers=None if exp.layers is None else list(exp.layers),
        text_only=str(exp.positions) == "text", heads_per_pass=exp.heads_per_pass,
    )
    mf = mediation_fraction(p_src, p_base, patched, float(exp.min_denominator))
    layer, head = np.meshgrid(np.arange(ad.n_layers), np.arange(ad.n_heads), indexing="ij")
    keep = ~np.isnan(patched)
    return pd.DataFrame({
        "sample_id": sample.sample_id, "image_id": int(sample.image_id), "category": sample.category, "task": task,
        "layer": layer[keep], "head": head[keep], "positions": str(exp.positions), "p_src": p_src, "p_base": p_base,
        "p_patched": patched[keep], "denominator": p_base - p_src, "mf": mf[keep], "valid": ~np.isnan(mf[keep]),
        "answer": answer, "source_iou": source_iou,
    })


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


def top_heads(table: pd.DataFrame, task: str, k: int) -> pd.DataFrame:
    t = table[table["task"] == task].sort_values(["mean_mf", "layer", "head"], ascending=[False, True, True])
    return t.head(k).reset_index(drop=True)


def summarize_cma(ctx: RunContext, mf: pd.DataFrame, dropped: pd.DataFrame) -> str:
    exp = ctx.cfg.experiment
    table = mf_per_head(mf)
    k, thr = int(exp.top_k), float(exp.critical_mf)
    lines = [f"CMA | model={ctx.cfg.model.name} | pairs={mf['sample_id'].nunique()} | positions={exp.positions} | "
             f"critical: mean MF >= {thr}"]
    pairs = mf.groupby(["task", "sample_id"])["valid"].any().groupby("task")
    excluded = (pairs.size() - pairs.sum()).to_dict()
    if "localization" in ctx.cfg.tasks:
        missed = int((dropped["task"] == "localization").sum())
        lines.append(f"localization: {missed} pairs dropped before patching because the source box missed "
                     f"(IoU < {exp.localization_source_min_iou}: the source run must answer correctly)")
    tops = {}
    for task in sorted(mf["task"].unique()):
        top = top_heads(table, task, k)
        tops[task] = set(zip(top["layer"], top["head"]))
        n_crit = int((table[table["task"] == task]["mean_mf"] >= thr).sum())
        lines += ["", f"### {task}: top {k} heads ({n_crit} critical; {excluded.get(task, 0)} pairs excluded, |P_base - P_src| < {exp.min_denominator})",
                  to_markdown(top[["layer", "head", "mean_mf", "median_mf", "pooled_mf", "n"]], digits=3)]
    if len(tops) == 2:
        a, b = tops.values()
        shared = sorted(a & b)
        lines += ["", f"top-{k} overlap between tasks: {len(shared)} heads {shared}"]
    return "\n".join(lines)


def plot_heatmaps(ctx: RunContext, mf: pd.DataFrame, path) -> None:
    table = mf_per_head(mf)
    tasks = sorted(table["task"].unique())
    ad_layers, ad_heads = int(mf["layer"].max()) + 1, int(mf["head"].max()) + 1
    fig, axes = plt.subplots(1, max(len(tasks), 1), figsize=(5 * max(len(tasks), 1), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        grid = np.full((ad_layers, ad_heads), np.nan)
        t = table[table["task"] == task]
        grid[t["layer"], t["head"]] = t["mean_mf"]
        im = ax.imshow(grid, aspect="auto", cmap="RdBu_r", vmin=-1, vmax=1, origin="lower")
        ax.set(title=f"{task}: mean MF", xlabel="head", ylabel="layer")
        fig.colorbar(im, ax=ax)
    fig.suptitle(f"Causal mediation per head ({ctx.cfg.model.name})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _read(path, columns: list[str]) -> pd.DataFrame:
    return pd.read_parquet(path) if path.exists() else pd.DataFrame(columns=columns)


def run(ctx: RunContext) -> None:
    path, dropped_path = ctx.run_dir / MF_FILE, ctx.run_dir / EXCLUDED_FILE
    existing, dropped = _read(path, MF_COLUMNS), _read(dropped_path, EXCLUDED_COLUMNS)
    done = set(zip(existing["sample_id"], existing["task"])) | set(zip(dropped["sample_id"], dropped["task"]))
    todo = [(s, t) for s in ctx.samples for t in ctx.cfg.tasks if (s.sample_id, t) not in done]
    frames, left_out = ([existing] if len(existing) else []), dropped.to_dict("records")
    for sample, task in tqdm(todo, desc="cma pairs", disable=not todo):
        rows = _pair_rows(ctx, sample, task)
        if isinstance(rows, dict):
            left_out.append(rows)
            table = pd.DataFrame(left_out, columns=EXCLUDED_COLUMNS)
            atomic_write(dropped_path, lambda f: table.to_parquet(f, index=False))
            continue
        frames.append(rows)
        mf = pd.concat(frames, ignore_index=True)
        atomic_write(path, lambda f: mf.to_parquet(f, index=False))  # after every pair: resumable
    if todo:
        ctx.write_provenance(cma={"pairs": len(ctx.samples), "dropped": len(left_out)})
    else:
        log.info("all pairs already analysed in %s: nothing to do", ctx.run_dir)
    mf, dropped = _read(path, MF_COLUMNS), pd.DataFrame(left_out, columns=EXCLUDED_COLUMNS)
    text = summarize_cma(ctx, mf, dropped)
    (ctx.run_dir / "cma_summary.md").write_text(text + "\n")
    plot_heatmaps(ctx, mf, ctx.run_dir / "fig4_cma_heatmaps.png")
    print("\n" + text)
