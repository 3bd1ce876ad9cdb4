"""Position probes (paper Fig. 2 and 11): where is each visual token's grid position linearly decodable?

For every stage of the model (each vision-encoder layer, the projector output, each LLM layer) a
linear classifier is trained to predict each visual token's position on its grid from the
token's activation, on training images, and scored on held-out images:

    python -m vlmloc experiment=position_probe model=llava7b data=imagenet data.root=/data/imagenet \
        batch_size=16 experiment.num_workers=8
    python -m vlmloc experiment=position_probe                    # tiny LLaVA over the synthetic scenes, CPU

Grids: every stage is probed on its own grid, per tile. LLaVA-1.5: 24x24 everywhere (ViT patches
are the LM's tokens). InternVL: the ViT layers on the 32x32 patch grid of each 448 px tile (before
pixel shuffle), the projector and LLM on the 16x16 token grid of each tile; one probe per stage
serves all tiles, and accuracy is reported over all tokens ("all") and per view (global
thumbnail / local crops).

Activations come from one forward per batch (`vlmloc.engine.capture`); the question after the
image does not matter, since visual tokens never attend to later tokens (causal attention).

Training paths (`experiment.probe.*`, see configs/experiment/position_probe.yaml):
- torch, epoch_mode=rerun (the paper-scale path, what epoch_mode=auto picks there): each epoch
  re-runs the model over the training images and updates all stages' probes on each batch as it
  arrives. Memory: one batch of activations plus the probes. Measured for LLaVA-1.5-7B at batch
  16 on an H200 (random weights, same shapes): 25.5 GB peak, 21.5 ms per image and epoch, so the
  paper's 50k x 10 epochs + 10k test images take about 3 h (details in `vlmloc.probes`).
- torch, epoch_mode=cache (what epoch_mode=auto picks when the cache fits in `max_cache_gb`:
  small runs; LLaVA-7B needs ~0.18 GB per image, so real runs rerun): the first epoch's captured
  training tokens (optionally subsampled, `token_rate`) stay in CPU memory and later epochs read
  them back in a new batch order, so epochs cost no forwards. Refused before any forward if the
  cache could exceed `max_cache_gb`.
- sklearn: all training tokens cached once, then lbfgs logistic regression per probe. Chosen by
  `trainer=auto` only for small problems (`vlmloc.probes.choose_trainer`).

Outputs in the run directory: probe_accuracy.parquet (one row per stage x target x view),
per_position.parquet (per grid cell), fig2_position_probe.png, fig11_heatmaps.png, summary.md,
run.json. A rerun with the same config finds them and only redraws the figures.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from omegaconf import DictConfig, OmegaConf

from vlmloc.runner import RunContext
from vlmloc.data.images import ImageSplit, load_image_split, open_rgb
from vlmloc.engine.capture import LLM, PROJECTOR, VISION, Stage, capture, model_stages, stage_tokens
from vlmloc.models.adapter import VLMAdapter
from vlmloc.probes import (
    PositionScores,
    ProbeSpec,
    SklearnProbes,
    TorchProbes,
    choose_trainer,
    epoch_lr,
    n_classes,
    position_grid,
    probe_targets,
)
from vlmloc.provenance import provenance, write_run_json
from vlmloc.reports.tables import to_markdown
from vlmloc.results import atomic_write

log = logging.getLogger("vlmloc.experiments.position_probe")

# A changed config (its `fingerprint`) retrains the probes and replaces the results: see `run`.
RECOMPUTES_CHANGED_CONFIG = True

ACCURACY_FILE = "probe_accuracy.parquet"
PER_POSITION_FILE = "per_position.parquet"
FIG2_FILE = "fig2_position_probe.png"
FIG11_FILE = "fig11_heatmaps.png"
ACCURACY_COLUMNS = ("stage", "stage_index", "kind", "view", "target", "accuracy", "chance",
                    "n_train_tokens", "n_test_tokens")

# One batch of one stage: x [n, dim] (model dtype, model device), pos [n] flat grid position
# r * grid + c (long, CPU), view [n] str.
StageBatch = tuple[torch.Tensor, torch.Tensor, np.ndarray]
EPOCH_MODES = ("auto", "rerun", "cache")


# --------------------------------------------------------------------------- stages


def resolve_stages(specs: Sequence[str] | None, stages: Sequence[Stage]) -> list[Stage]:
    """Stage selectors -> stages in model order. A selector is a stage name ("llm.12"), a kind
    ("vision", "projector", "llm"), or a kind with an alias index: "last", "mid" or a negative
    number ("vision.last", "llm.mid" = layer N // 2, "llm.-2"). None = every stage."""
    if specs is None:
        return list(stages)
    by_name = {s.name: s for s in stages}
    chosen: set[str] = set()
    for spec in specs:
        spec = str(spec)
        if spec in by_name:
            chosen.add(spec)
            continue
        kind, _, idx = spec.partition(".")
        of_kind = [s for s in stages if s.kind == kind]
        if not of_kind:
            raise ValueError(f"unknown stage {spec!r}; stages are {stages[0].name} .. {stages[-1].name}, "
                             f"kinds {VISION}, {PROJECTOR}, {LLM}")
        if idx == "":
            chosen.update(s.name for s in of_kind)
            continue
        pick = {"last": len(of_kind) - 1, "mid": len(of_kind) // 2, "first": 0}.get(idx)
        if pick is None:
            try:
                pick = int(idx) % len(of_kind) if int(idx) < 0 else int(idx)
            except ValueError:
                pick = -1
        if not 0 <= pick < len(of_kind):
            raise ValueError(f"unknown stage {spec!r}: {kind} has layers 0..{len(of_kind) - 1}")
        chosen.add(of_kind[pick].name)
    return [s for s in stages if s.name in chosen]


# --------------------------------------------------------------------------- activations


class _Images(torch.utils.data.Dataset):
    def __init__(self, paths: Sequence[Path]) -> None:
        self.paths = list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        return open_rgb(self.paths[i])


def probe_prompt(adapter: VLMAdapter, question: str) -> str:
    """The family's chat template with the image and a neutral question."""
    return str(adapter.cfg.prompts.template).format(image=adapter.image_placeholder, question=question)


def stage_batches(
    adapter: VLMAdapter,
    paths: Sequence[Path],
    stages: Sequence[Stage],
    *,
    batch_size: int,
    prompt: str,
    num_workers: int = 0,
    views: Sequence[str] | None = None,
) -> Iterator[dict[str, StageBatch]]:
    """Per batch of images: {stage: (x [n, dim], pos [n], view [n])}, restricted to `views` if given.

    Images are decoded in `num_workers` DataLoader workers (JPEG decoding would otherwise sit on
    the GPU's critical path); the processor and the forward run here.
    """
    loader = torch.utils.data.DataLoader(
        _Images(paths), batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=list
    )
    for images in loader:
        batch = adapter.prepare(images, [prompt] * len(images))
        acts = capture(adapter, batch, stages)
        out = {}
        for s in stages:
            meta = stage_tokens(s, batch.layouts)
            x, pos, view = acts[s.name], torch.as_tensor(meta.row * s.grid + meta.col), meta.view
            if views is not None:
                keep = torch.as_tensor(np.flatnonzero(np.isin(view, list(views))))
                x, pos, view = x[_on_device(keep, x.device)], pos[keep], view[keep.numpy()]
            out[s.name] = (x, pos, view)
        yield out


def subsample(batch: Mapping[str, StageBatch], rate: float, gen: torch.Generator) -> dict[str, StageBatch]:
    """Keep round(rate * n) random tokens of every stage (rate 1: all, unchanged)."""
    if rate >= 1.0:
        return dict(batch)
    out = {}
    for name, (x, pos, view) in batch.items():
        k = max(1, round(rate * len(pos)))
        idx = torch.randperm(len(pos), generator=gen)[:k].sort().values
        out[name] = (x[_on_device(idx, x.device)], pos[idx], view[idx.numpy()])
    return out


def _on_device(idx: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU index on `device` without waiting for the GPU queue (pinned, non-blocking copy)."""
    if device.type != "cuda":
        return idx
    return idx.pin_memory().to(device, non_blocking=True)


# --------------------------------------------------------------------------- memory


def memory_bound(
    adapter: VLMAdapter, stages: Sequence[Stage], batch_size: int, targets: Sequence[str]
) -> dict[str, float]:
    """Bytes the streaming path holds beyond the model: one batch of activations (model dtype,
    InternVL counted at its maximum tile count) and the probes (fp32 weights, gradients, 2 Adam moments)."""
    tiles = int(adapter.cfg.get("max_tiles", 0)) + 1 if adapter.family == "internvl" else 1
    act_bytes = torch.finfo(adapter.model.dtype).bits // 8
    dims = {s.name: _stage_dim(adapter, s) for s in stages}
    acts = sum(batch_size * tiles * s.grid**2 * dims[s.name] * act_bytes for s in stages)
    params = sum((dims[s.name] + 1) * n_classes(t, s.grid) for s in stages for t in targets)
    return {"activations_per_batch_bytes": float(acts), "probe_state_bytes": float(params * 4 * 4),
            "tiles_per_image_max": tiles, "batch_size": batch_size}


def _stage_dim(adapter: VLMAdapter, stage: Stage) -> int:
    cfg = adapter.model.config
    return int(cfg.vision_config.hidden_size if stage.kind == VISION else cfg.text_config.hidden_size)


# --------------------------------------------------------------------------- training and scoring


@dataclass
class ProbeRun:
    """What `probe_positions` returns."""

    accuracy: pd.DataFrame  # ACCURACY_COLUMNS + trainer, grid, n_classes
    per_position: pd.DataFrame  # stage, stage_index, kind, target, view, row, col, n, correct, accuracy
    trainer: str
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ProbePlan:
    """How a run trains, decided from the config and sizes before any forward pass."""

    trainer: str  # "torch" | "sklearn"
    epoch_mode: str  # "rerun" | "cache" (torch) or "full_batch" (sklearn)
    cache_gb: float  # upper bound of the CPU memory a cache of all training tokens would take


def plan_training(adapter: VLMAdapter, n_train: int, specs: Sequence[ProbeSpec], probe: Mapping[str, Any]) -> ProbePlan:
    """Apply the `auto` rules (trainer, epoch_mode) to upper bounds of the training set's size;
    refuse a cache that would exceed `max_cache_gb`."""
    rate = float(probe.get("token_rate", 1.0))
    if not 0.0 < rate <= 1.0:
        raise ValueError(f"probe.token_rate must be in (0, 1], got {rate}")
    epoch_mode = str(probe.get("epoch_mode", "auto"))
    if epoch_mode not in EPOCH_MODES:
        raise ValueError(f"probe.epoch_mode must be one of {EPOCH_MODES}, got {epoch_mode!r}")
    # InternVL's token count depends on each image's tiling: count the maximum tiles.
    tiles = int(adapter.cfg.get("max_tiles", 0)) + 1 if adapter.family == "internvl" else 1
    tokens = {s.stage: n_train * tiles * s.grid**2 * rate for s in specs}
    sk = probe.get("sklearn") or {}
    trainer = choose_trainer(
        str(probe["trainer"]), int(max(tokens.values())), max(n_classes(t, s.grid) for s in specs for t in s.targets),
        max_tokens=int(sk.get("max_tokens", 4000)), max_class_count=int(sk.get("max_classes", 32)),
    )
    act_bytes = torch.finfo(adapter.model.dtype).bits // 8
    cache_gb = sum(tokens[s.stage] * s.dim * act_bytes for s in specs) / 1e9
    max_cache_gb = float(probe.get("max_cache_gb", 8))
    if epoch_mode == "auto":
        epoch_mode = "cache" if cache_gb <= max_cache_gb else "rerun"
    if trainer == "sklearn":
        epoch_mode = "full_batch"
    if epoch_mode != "rerun" and cache_gb > max_cache_gb:
        raise ValueError(
            f"caching the training tokens would take up to {cache_gb:.1f} GB > probe.max_cache_gb={max_cache_gb}: "
            "use probe.trainer=torch probe.epoch_mode=rerun, or a lower probe.token_rate"
        )
    return ProbePlan(trainer, epoch_mode, cache_gb)


def _on_cpu(batch: Mapping[str, StageBatch]) -> dict[str, StageBatch]:
    return {k: (x.cpu(), p, v) for k, (x, p, v) in batch.items()}


def probe_positions(
    adapter: VLMAdapter,
    train: Sequence[Path],
    test: Sequence[Path],
    stages: Sequence[Stage],
    probe: Mapping[str, Any],
    *,
    batch_size: int,
    prompt: str,
    seed: int = 0,
    num_workers: int = 0,
) -> ProbeRun:
    """Train every stage's probes on `train` images and score them on `test` images.

    `probe` is the `experiment.probe` config (a mapping): target, trainer, epochs, epoch_mode,
    token_rate, views, lr, lr_ref_dim, lr_schedule, weight_decay, minibatch_tokens, standardize,
    bf16_matmul, max_cache_gb, sklearn.*.
    """
    targets = probe_targets(str(probe["target"]))
    specs = [ProbeSpec(s.name, _stage_dim(adapter, s), s.grid, targets) for s in stages]
    views = list(probe["views"]) if probe.get("views") else None
    rate, epochs = float(probe.get("token_rate", 1.0)), int(probe["epochs"])
    plan = plan_training(adapter, len(train), specs, probe)
    log.info("position probes: %d stages, targets %s, trainer %s (%s), %d train / %d test images, "
             "token cache bound %.2f GB", len(stages), ",".join(targets), plan.trainer, plan.epoch_mode,
             len(train), len(test), plan.cache_gb)
    gen = torch.Generator().manual_seed(int(seed))
    timing = {"forward_s": 0.0, "probe_s": 0.0, "n_forward_images": 0}

    def batches(paths: Sequence[Path]) -> Iterator[dict[str, StageBatch]]:
        """Captured batches of `paths`, timing the forward passes (image loading included)."""
        it = stage_batches(adapter, paths, stages, batch_size=batch_size, prompt=prompt,
                           num_workers=num_workers, views=views)
        while True:
            t0 = time.perf_counter()
            b = next(it, None)
            timing["forward_s"] += time.perf_counter() - t0
            if b is None:
                timing["n_forward_images"] += len(paths)
                return
            yield b

    n_train_tokens: dict[str, int] = {s.name: 0 for s in stages}
    model: TorchProbes | SklearnProbes
    if plan.trainer == "torch":
        model = TorchProbes(
            specs, lr=float(probe["lr"]), lr_ref_dim=probe.get("lr_ref_dim"),
            weight_decay=float(probe.get("weight_decay", 0.0)), minibatch=int(probe["minibatch_tokens"]),
            standardize=bool(probe.get("standardize", True)), device=adapter.device, seed=seed,
            bf16_matmul=bool(probe.get("bf16_matmul", False)),
        )
        cache: list[dict[str, StageBatch]] = []
        for epoch in range(epochs):
            model.set_lr(epoch_lr(float(probe["lr"]), epoch, epochs, str(probe.get("lr_schedule", "constant"))))
            rng = np.random.default_rng([int(seed), epoch])
            if epoch == 0 or plan.epoch_mode == "rerun":
                source: Iterator[dict[str, StageBatch]] = (
                    subsample(b, rate, gen) for b in batches([train[i] for i in rng.permutation(len(train))]))
            else:  # cache: epoch 1's (subsampled) tokens, batches in a new order
                source = (cache[i] for i in rng.permutation(len(cache)))
            losses = []
            for b in source:
                t0 = time.perf_counter()
                losses.append(torch.stack(list(model.fit({k: (x, p) for k, (x, p, _) in b.items()}).values())).mean())
                timing["probe_s"] += time.perf_counter() - t0
                if epoch == 0:
                    for name, (_, pos, _) in b.items():
                        n_train_tokens[name] += len(pos)
                    if plan.epoch_mode == "cache":
                        cache.append(_on_cpu(b))
            log.info("epoch %d/%d: mean probe loss %.4f (%.0f s forward, %.0f s probes so far)",
                     epoch + 1, epochs, float(torch.stack(losses).mean()) if losses else float("nan"),
                     timing["forward_s"], timing["probe_s"])
        del cache
    else:
        cached = [_on_cpu(subsample(b, rate, gen)) for b in batches(list(train))]
        data = {s.name: (torch.cat([c[s.name][0] for c in cached]), torch.cat([c[s.name][1] for c in cached]))
                for s in stages}
        del cached
        n_train_tokens = {k: len(v[1]) for k, v in data.items()}
        t0 = time.perf_counter()
        sk = probe.get("sklearn") or {}
        model = SklearnProbes(specs, C=float(sk.get("C", 1.0)), max_iter=int(sk.get("max_iter", 300)),
                              standardize=bool(probe.get("standardize", True)))
        model.fit(data)
        timing["probe_s"] += time.perf_counter() - t0
        del data

    scores = PositionScores(specs)
    for b in batches(list(test)):
        t0 = time.perf_counter()
        for name, (x, pos, view) in b.items():
            scores.add_predictions(name, view, pos.numpy(), model.predict(name, x))
        timing["probe_s"] += time.perf_counter() - t0
    return ProbeRun(
        accuracy=_accuracy_frame(scores, stages, n_train_tokens, plan.trainer),
        per_position=_per_position_frame(scores, stages),
        trainer=plan.trainer,
        info={"trainer": plan.trainer, "epoch_mode": plan.epoch_mode,
              "epochs": epochs if plan.trainer == "torch" else None, "token_rate": rate, "targets": list(targets), "views": views, "cache_bound_gb": plan.cache_gb,
              "timing": timing},
    )


def _stage_columns(df: pd.DataFrame, stages: Sequence[Stage]) -> pd.DataFrame:
    info = pd.DataFrame({"stage": [s.name for s in stages], "stage_index": [s.index for s in stages],
                         "kind": [s.kind for s in stages], "grid": [s.grid for s in stages]})
    return df.merge(info, on="stage", how="left")


def _accuracy_frame(
    scores: PositionScores, stages: Sequence[Stage], n_train: Mapping[str, int], trainer: str
) -> pd.DataFrame:
    df = _stage_columns(scores.accuracy(), stages)
    df["n_classes"] = [g * g if t in ("position", "row_col") else g for t, g in zip(df["target"], df["grid"])]
    df["chance"] = 1.0 / df["n_classes"]
    df["n_train_tokens"] = df["stage"].map(n_train).astype("int64")
    df["trainer"] = trainer
    cols = list(ACCURACY_COLUMNS) + ["grid", "n_classes", "trainer"]
    return df[cols].sort_values(["stage_index", "target", "view"], kind="stable").reset_index(drop=True)


def _per_position_frame(scores: PositionScores, stages: Sequence[Stage]) -> pd.DataFrame:
    df = _stage_columns(scores.per_position(), stages)
    cols = ["stage", "stage_index", "kind", "target", "view", "row", "col", "n", "correct", "accuracy"]
    return df[cols].sort_values(["stage_index", "target", "view", "row", "col"], kind="stable").reset_index(drop=True)


# --------------------------------------------------------------------------- figures and tables


def _main_target(df: pd.DataFrame) -> str:
    return "position" if "position" in set(df["target"]) else "row_col"


def plot_accuracy(acc: pd.DataFrame, title: str = ""):
    """Fig. 2: accuracy per stage (x in model order), chance per stage, vision / projector / LLM marked."""
    from matplotlib.figure import Figure

    stages = acc.drop_duplicates("stage").sort_values("stage_index")
    n = len(stages)
    fig = Figure(figsize=(max(6.0, 0.16 * n + 2.5), 3.8), layout="constrained")
    ax = fig.add_subplot()
    styles = {"all": "-", "global": "--", "local": ":"}
    for (target, view), d in acc.sort_values("stage_index").groupby(["target", "view"], sort=False):
        main = target == _main_target(acc)
        ax.plot(d["stage_index"], d["accuracy"], styles.get(view, "-."), marker="o", ms=3 if main else 2,
                lw=1.6 if main else 0.9, label=f"{target}" + ("" if view == "all" else f" ({view})"))
    chance = acc[acc.target == _main_target(acc)].drop_duplicates("stage").sort_values("stage_index")
    ax.step(chance["stage_index"], chance["chance"], where="mid", color="grey", ls="--", lw=0.9, label="chance")
    for kind, colour in ((VISION, "tab:blue"), (PROJECTOR, "tab:orange"), (LLM, "tab:green")):
        idx = stages.loc[stages.kind == kind, "stage_index"]
        if len(idx):
            ax.axvspan(idx.min() - 0.5, idx.max() + 0.5, color=colour, alpha=0.08, lw=0)
            label = {VISION: "vision encoder", PROJECTOR: "proj.", LLM: "LLM"}[kind]
            ax.text((idx.min() + idx.max()) / 2, 1.04, label, ha="center", va="bottom", fontsize=8,
                    transform=ax.get_xaxis_transform())
    labels = ["P" if k == PROJECTOR else s.split(".")[1] for s, k in zip(stages["stage"], stages["kind"])]
    step = max(1, n // 40)
    ticks = [i for i in range(n) if i % step == 0 or stages["kind"].iloc[i] == PROJECTOR]
    ax.set_xticks(stages["stage_index"].iloc[ticks], [labels[i] for i in ticks], fontsize=7)
    ax.set_xlim(stages["stage_index"].min() - 0.7, stages["stage_index"].max() + 0.7)
    ax.set_ylim(0, 1.0)
    ax.set_xlabel("stage (vision layer | projector | LLM layer)")
    ax.set_ylabel("test accuracy")
    ax.legend(fontsize=7, loc="upper right", ncols=2)
    if title:
        fig.suptitle(title, fontsize=9)
    return fig


def plot_heatmaps(per_position: pd.DataFrame, stage_names: Sequence[str], title: str = ""):
    """Fig. 11: per-position accuracy grids (cell [r, c] = token at row r, column c), one column
    per stage, one row per view ("all", then global / local where a stage saw both)."""
    from matplotlib.figure import Figure

    target = _main_target(per_position)
    views = ["all"] + sorted(set(per_position["view"]) - {"all"})
    fig = Figure(figsize=(2.6 * len(stage_names) + 0.8, 2.6 * len(views) + 0.4), layout="constrained")
    axes = fig.subplots(len(views), len(stage_names), squeeze=False)
    im = None
    for i, view in enumerate(views):
        for j, stage in enumerate(stage_names):
            ax = axes[i][j]
            try:
                grid = position_grid(per_position, stage, target, view)
            except KeyError:
                ax.set_axis_off()
                continue
            im = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="viridis", interpolation="nearest")
            name = stage if view == "all" else f"{stage} ({view})"
            ax.set_title(f"{name}\nacc {np.nanmean(grid):.2f}", fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
    if im is not None:
        fig.colorbar(im, ax=axes, shrink=0.8, label=f"{target} accuracy")
    if title:
        fig.suptitle(title, fontsize=9)
    return fig


def summary_table(acc: pd.DataFrame) -> str:
    """Markdown: one row per stage, one accuracy column per target (and view where there are several)."""
    views = sorted(set(acc["view"]))
    key = acc["target"] if views == ["all"] else acc["target"] + "/" + acc["view"]
    wide = acc.assign(col=key).pivot_table(
        index=["stage_index", "stage", "kind"], columns="col", values="accuracy", sort=False)
    chance = acc[acc.target == _main_target(acc)].drop_duplicates("stage").set_index("stage")["chance"]
    wide = wide.reset_index().sort_values("stage_index")
    wide["chance"] = wide["stage"].map(chance)
    return to_markdown(wide.drop(columns="stage_index").reset_index(drop=True), digits=3)


def _save_figure(fig: Any, path: Path) -> None:
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=130))


def _write_parquet(df: pd.DataFrame, path: Path) -> None:
    table = pa.Table.from_pandas(df, preserve_index=False)
    atomic_write(path, lambda f: pq.write_table(table, f))


def write_outputs(
    run_dir: Path, acc: pd.DataFrame, per_position: pd.DataFrame, heatmap_stages: Sequence[str], title: str
) -> str:
    """Figures and summary.md from the two frames; returns the markdown table."""
    _save_figure(plot_accuracy(acc, title), run_dir / FIG2_FILE)
    _save_figure(plot_heatmaps(per_position, heatmap_stages, title), run_dir / FIG11_FILE)
    table = summary_table(acc)
    atomic_write(run_dir / "summary.md", lambda f: f.write((table + "\n").encode()))
    return table


# --------------------------------------------------------------------------- the experiment


def _image_split(ctx: RunContext) -> ImageSplit:
    # Listing ImageNet takes a while: list once per run (check_inputs and run share it).
    split = ctx.__dict__.get("_position_probe_split")
    if split is None:
        split = load_image_split(ctx.cfg.data)
        ctx.__dict__["_position_probe_split"] = split
    return split


def check_inputs(ctx: RunContext) -> None:
    """Fail fast: the image folder is there and holds enough images; weights are findable."""
    split = _image_split(ctx)
    log.info("position probes: %d train / %d test images of %d in %s", len(split.train), len(split.test),
             split.n_available, split.folder)
    if ctx.cfg.model.path is not None:
        from vlmloc.models.loading import check_weights

        check_weights(ctx.cfg.model)


def fingerprint(cfg: DictConfig) -> str:
    """Hash of everything that changes the numbers: experiment, model, data, seed, batch size."""
    parts = {k: OmegaConf.to_container(cfg[k], resolve=True) for k in ("experiment", "model", "data")}
    parts |= {"seed": int(cfg.seed), "batch_size": int(cfg.batch_size)}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _finished(run_dir: Path, fp: str) -> bool:
    try:
        info = json.loads((run_dir / "run.json").read_text())
    except (OSError, ValueError):
        return False
    done = (run_dir / ACCURACY_FILE).exists() and (run_dir / PER_POSITION_FILE).exists()
    return done and info.get("position_probe", {}).get("fingerprint") == fp


def _write_provenance(ctx: RunContext, split: ImageSplit, extra: Mapping[str, Any]) -> None:
    ad = ctx.adapter
    cfg = ctx.cfg
    model_info = {
        "name": str(cfg.model.name),
        "family": ad.family,
        "model_id": str(cfg.model.path) if cfg.model.path is not None else f"tiny:{cfg.model.name}",
        "revision": getattr(ad.model.config, "_commit_hash", None) or cfg.model.revision,
        "n_layers": ad.n_layers,
        "n_heads": ad.n_heads,
        "head_dim": ad.head_dim,
    }
    info = provenance(cfg, model_info=model_info, seed=int(cfg.seed), device=str(ad.device), dtype=str(ad.model.dtype),
                      attn_implementation=str(ad.model.config._attn_implementation), started=ctx.started)
    info["data"] = split.describe()
    info["position_probe"] = dict(extra)
    write_run_json(ctx.run_dir, info)


def run(ctx: RunContext) -> None:
    cfg = ctx.cfg
    exp = cfg.experiment
    split = _image_split(ctx)
    title = f"position probes | model={cfg.model.name} | data={cfg.data.name}"
    fp = fingerprint(cfg)
    if _finished(ctx.run_dir, fp):
        log.info("position probes already done in %s: nothing to do (figures redrawn)", ctx.run_dir)
        acc = pd.read_parquet(ctx.run_dir / ACCURACY_FILE)
        per_pos = pd.read_parquet(ctx.run_dir / PER_POSITION_FILE)
        heat = list(json.loads((ctx.run_dir / "run.json").read_text())["position_probe"]["heatmap_stages"])
    else:
        adapter = ctx.adapter
        every = model_stages(adapter)
        stages = resolve_stages(None if exp.stages is None else list(exp.stages), every)
        heat = [s.name for s in resolve_stages(list(exp.heatmap_stages), every) if s in stages]
        probe = OmegaConf.to_container(exp.probe, resolve=True)
        bound = memory_bound(adapter, stages, int(cfg.batch_size), probe_targets(str(probe["target"])))
        log.info("streaming memory bound: %.2f GB of activations per batch + %.2f GB of probe state",
                 bound["activations_per_batch_bytes"] / 1e9, bound["probe_state_bytes"] / 1e9)
        result = probe_positions(
            adapter, split.train, split.test, stages, probe, batch_size=int(cfg.batch_size),
            prompt=probe_prompt(adapter, str(exp.question)), seed=int(cfg.seed), num_workers=int(exp.num_workers),
        )
        acc, per_pos = result.accuracy, result.per_position
        _write_parquet(acc, ctx.run_dir / ACCURACY_FILE)
        _write_parquet(per_pos, ctx.run_dir / PER_POSITION_FILE)
        _write_provenance(ctx, split, {**result.info, "fingerprint": fp, "heatmap_stages": heat,
                                       "stages": [s.name for s in stages], "memory_bound": bound})
    table = write_outputs(ctx.run_dir, acc, per_pos, heat, title)
    print(f"\n{exp.name} | model={cfg.model.name} | data={cfg.data.name} | {ctx.run_dir}\n{table}")
