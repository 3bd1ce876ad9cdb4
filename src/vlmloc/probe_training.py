"""Training and scoring position probes on a model's stages, from images to result frames.

Each batch of images gets one forward (`vlmloc.engine.capture`) that yields every probed stage's
visual tokens with their grid positions (`stage_batches`); the probes of `vlmloc.probes` learn
from those batches and are then scored on the test images' batches (`probe_positions`):

    stages, heat = select_stages(adapter, ["vision.last", "projector", "llm"], ["llm.mid"])
    run = probe_positions(adapter, split.train, split.test, stages, probe_cfg, batch_size=16,
                          prompt=probe_prompt(adapter, "Describe the image."))
    run.accuracy, run.per_position                 # the experiment's two result frames

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

Grids. A probe's classes are the cells of one grid per stage, the same for every image: LLaVA's
24x24 and InternVL's 16x16 tiles are fixed by their processors. Dynamic-resolution families
(Qwen2.5-VL, Qwen3-VL; `Family.dynamic_resolution`) give each image its own grid, so a label
(row, col) would name different parts of different images and the class set would depend on the
image. They are probed on one configured grid instead (`experiment.image_grid`, `grid_images`):
every image is fitted to a square of tokens_per_side x (patch x merge) px before the processor,
which keeps that size, so every image has tokens_per_side^2 LM tokens and (merge x
tokens_per_side)^2 ViT patches, each labelled by its (row, col) on that grid:

    transform = grid_images(adapter, settings.image_grid)       # None for fixed-grid families
    stages, heat = select_stages(adapter, None, ["llm.mid"], settings.image_grid.tokens_per_side)
    run = probe_positions(..., transform=transform)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from omegaconf import MISSING
from PIL import Image

from vlmloc.data.images import SQUARE_FITS, ImageFiles, fit_square
from vlmloc.engine.capture import LLM, PROJECTOR, VISION, Stage, capture, model_stages, stage_tokens, token_pixels
from vlmloc.errors import ConfigError
from vlmloc.models.adapter import VLMAdapter
from vlmloc.models.layout import GLOBAL, LOCAL
from vlmloc.probes import (
    TARGETS,
    TRAINERS,
    LinearProbe,
    PositionScores,
    ProbeSpec,
    SklearnProbes,
    TorchProbes,
    average_probes,
    choose_trainer,
    epoch_lr,
    n_classes,
    probe_targets,
)
from vlmloc.settings import above, at_least, one_of, subset_of

log = logging.getLogger("vlmloc.probe_training")

ACCURACY_COLUMNS = ("stage", "stage_index", "kind", "view", "target", "accuracy", "chance",
                    "n_train_tokens", "n_test_tokens")

# One batch of one stage: x [n, dim] (model dtype, model device), pos [n] flat grid position
# r * grid + c (long, CPU), view [n] str.
StageBatch = tuple[torch.Tensor, torch.Tensor, np.ndarray]
EPOCH_MODES = ("auto", "rerun", "cache")
LR_SCHEDULES = ("cosine", "constant")
VIEWS = (GLOBAL, LOCAL)


# --------------------------------------------------------------------------- probe images


@dataclass(frozen=True)
class ImageGridSettings:
    """experiment.image_grid: the one grid every probe image of a dynamic-resolution family is fitted to."""

    tokens_per_side: int = MISSING  # LM tokens per side (ViT patches: merge_size times more)
    fit: str = MISSING  # crop | pad: how a non-square image becomes a square (`vlmloc.data.images.fit_square`)

    def __post_init__(self) -> None:
        at_least("experiment.image_grid.tokens_per_side", self.tokens_per_side, 1)
        one_of("experiment.image_grid.fit", self.fit, SQUARE_FITS)


def grid_images(adapter: VLMAdapter, grid: ImageGridSettings) -> Callable[[Image.Image], Image.Image] | None:
    """image -> image fitted to the probe grid, for a dynamic-resolution family; None for families
    whose processor fixes the grid (LLaVA, InternVL: their own preprocessing is kept).

    The square is tokens_per_side x (patch x merge) px (16 tokens: 448 px for Qwen2.5-VL, 512 px for
    Qwen3-VL); `pad` fills with the image processor's mean colour. Raises ConfigError when the
    model's pixel budget (model.min_pixels / max_pixels) would resize that square, so no forward
    runs on images whose grid is not the probe's.
    """
    if not adapter.facts.dynamic_resolution:
        return None
    g, side = int(grid.tokens_per_side), int(grid.tokens_per_side) * token_pixels(adapter)
    if adapter.n_visual_tokens(side, side) != g * g:
        raise ConfigError(
            f"experiment.image_grid.tokens_per_side={g} fits every probe image to {side}x{side} px ({g * g} tokens), "
            f"which model.min_pixels={adapter.cfg.get('min_pixels')} / max_pixels={adapter.cfg.get('max_pixels')} "
            f"would resize ({adapter.n_visual_tokens(side, side)} tokens): pick a grid whose square lies within the "
            "pixel budget, or widen the budget")
    mean = getattr(adapter.processor.image_processor, "image_mean", None) or (0.0, 0.0, 0.0)
    fill = tuple(int(255 * float(m)) for m in mean)  # truncated, as LLaVA's image processor pads
    return partial(fit_square, side=side, fit=str(grid.fit), fill=fill)


# --------------------------------------------------------------------------- settings and stages


@dataclass(frozen=True)
class SklearnSettings:
    """experiment.probe.sklearn: the full-batch reference trainer and when `trainer=auto` picks it."""

    C: float = MISSING  # inverse L2 strength
    max_iter: int = MISSING  # lbfgs iterations
    max_tokens: int = MISSING  # auto: sklearn only up to this many training tokens per stage ...
    max_classes: int = MISSING  # ... and this many classes per probe

    def __post_init__(self) -> None:
        above("experiment.probe.sklearn.C", self.C, 0.0)
        at_least("experiment.probe.sklearn.max_iter", self.max_iter, 1)
        at_least("experiment.probe.sklearn.max_tokens", self.max_tokens, 0)
        at_least("experiment.probe.sklearn.max_classes", self.max_classes, 0)


@dataclass(frozen=True)
class ProbeSettings:
    """experiment.probe: the probes and how they train (read by `vlmloc.probe_training`)."""

    target: str = MISSING  # position | row_col
    trainer: str = MISSING  # auto | torch | sklearn
    epochs: int = MISSING  # passes over the training images (torch trainer)
    epoch_mode: str = MISSING  # auto | rerun | cache
    token_rate: float = MISSING  # share of each batch's visual tokens used for training, in (0, 1]
    views: tuple[str, ...] | None = MISSING  # InternVL views to train and test on (None = all)
    lr: float = MISSING  # Adam learning rate at epoch 1 for a stage of width lr_ref_dim
    lr_ref_dim: int | None = MISSING  # lr scales by sqrt(lr_ref_dim / dim); None = lr everywhere
    lr_schedule: str = MISSING  # cosine | constant
    weight_decay: float = MISSING  # Adam weight decay
    minibatch_tokens: int = MISSING  # tokens per Adam step
    standardize: bool = MISSING  # z-score features with the first batch's statistics
    bf16_matmul: bool = MISSING  # CUDA only: probe matmuls in bf16 autocast
    max_cache_gb: float = MISSING  # bound of the cached training tokens (cache / sklearn)
    sklearn: SklearnSettings = MISSING

    def __post_init__(self) -> None:
        one_of("experiment.probe.target", self.target, TARGETS)
        one_of("experiment.probe.trainer", self.trainer, TRAINERS)
        at_least("experiment.probe.epochs", self.epochs, 1)
        one_of("experiment.probe.epoch_mode", self.epoch_mode, EPOCH_MODES)
        if not 0.0 < self.token_rate <= 1.0:
            raise ValueError(f"experiment.probe.token_rate must be in (0, 1], got {self.token_rate}")
        if self.views:  # an empty list, like null, keeps every view (probe_positions reads it so)
            subset_of("experiment.probe.views", self.views, VIEWS)
        above("experiment.probe.lr", self.lr, 0.0, inclusive=True)
        if self.lr_ref_dim is not None:
            at_least("experiment.probe.lr_ref_dim", self.lr_ref_dim, 1)
        one_of("experiment.probe.lr_schedule", self.lr_schedule, LR_SCHEDULES)
        above("experiment.probe.weight_decay", self.weight_decay, 0.0, inclusive=True)
        at_least("experiment.probe.minibatch_tokens", self.minibatch_tokens, 1)
        above("experiment.probe.max_cache_gb", self.max_cache_gb, 0.0, inclusive=True)


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


def select_stages(
    adapter: VLMAdapter, stages: Sequence[str] | None, heatmap_stages: Sequence[str], token_grid: int | None = None
) -> tuple[list[Stage], list[str]]:
    """The model's stages to probe (selectors as in `resolve_stages`, None = every stage) and the
    names of the heatmap stages among them, both in model order. token_grid: the probe grid of a
    dynamic-resolution family (experiment.image_grid.tokens_per_side); fixed-grid families ignore it."""
    every = model_stages(adapter, token_grid)
    chosen = resolve_stages(stages, every)
    return chosen, [s.name for s in resolve_stages(list(heatmap_stages), every) if s in chosen]


# --------------------------------------------------------------------------- activations


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
    transform: Callable[[Image.Image], Image.Image] | None = None,
) -> Iterator[dict[str, StageBatch]]:
    """Per batch of images: {stage: (x [n, dim], pos [n], view [n])}, restricted to `views` if given.

    Images are decoded (and `transform`ed: `grid_images`) in `num_workers` DataLoader workers (JPEG
    decoding would otherwise sit on the GPU's critical path); the processor and the forward run here.
    """
    loader = torch.utils.data.DataLoader(
        ImageFiles(paths, transform), batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=list
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


def _on_cpu(batch: Mapping[str, StageBatch]) -> dict[str, StageBatch]:
    return {k: (x.cpu(), p, v) for k, (x, p, v) in batch.items()}


# --------------------------------------------------------------------------- memory and plan


def _max_tiles(adapter: VLMAdapter) -> int:
    """Tiles per image at most: InternVL's token count depends on each image's tiling."""
    return int(adapter.cfg.get("max_tiles", 0)) + 1 if adapter.family == "internvl" else 1


def _stage_dim(adapter: VLMAdapter, stage: Stage) -> int:
    cfg = adapter.model.config
    return int(cfg.vision_config.hidden_size if stage.kind == VISION else cfg.text_config.hidden_size)


def memory_bound(
    adapter: VLMAdapter, stages: Sequence[Stage], batch_size: int, targets: Sequence[str]
) -> dict[str, float]:
    """Bytes the streaming path holds beyond the model: one batch of activations (model dtype,
    InternVL counted at its maximum tile count) and the probes (fp32 weights, gradients, 2 Adam moments)."""
    tiles = _max_tiles(adapter)
    act_bytes = torch.finfo(adapter.model.dtype).bits // 8
    dims = {s.name: _stage_dim(adapter, s) for s in stages}
    acts = sum(batch_size * tiles * s.grid**2 * dims[s.name] * act_bytes for s in stages)
    params = sum((dims[s.name] + 1) * n_classes(t, s.grid) for s in stages for t in targets)
    return {"activations_per_batch_bytes": float(acts), "probe_state_bytes": float(params * 4 * 4),
            "tiles_per_image_max": tiles, "batch_size": batch_size}


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
    tiles = _max_tiles(adapter)
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


# --------------------------------------------------------------------------- training and scoring


@dataclass
class ProbeRun:
    """What `probe_positions` / `score_probes` return."""

    accuracy: pd.DataFrame  # ACCURACY_COLUMNS + trainer, grid, n_classes
    per_position: pd.DataFrame  # stage, stage_index, kind, target, view, row, col, n, correct, accuracy
    trainer: str
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainedProbes:
    """Every (stage, target)'s trained probe and how it trained: what `train_probes` returns, a
    shard saves (`to_dict`, for `torch.save`) and `merge_probes` combines."""

    probes: dict[tuple[str, str], LinearProbe]
    n_train_tokens: dict[str, int]
    trainer: str
    info: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"probes": {f"{stage}|{t}": p.to_dict() for (stage, t), p in self.probes.items()},
                "n_train_tokens": dict(self.n_train_tokens), "trainer": self.trainer, "info": self.info}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], device: str | torch.device = "cpu") -> TrainedProbes:
        probes = {tuple(k.split("|", 1)): LinearProbe.from_dict(v, device) for k, v in d["probes"].items()}
        return cls(probes, dict(d["n_train_tokens"]), str(d["trainer"]), dict(d["info"]))  # type: ignore[misc]


def merge_probes(parts: Sequence[TrainedProbes]) -> TrainedProbes:
    """Probes of shards trained on disjoint training images, as one: each stage's probe is the
    average of the shards' (`vlmloc.probes.average_probes`), weighted by the tokens each shard
    trained that stage on; one part is returned unchanged."""
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    probes = {key: average_probes([p.probes[key] for p in parts], [p.n_train_tokens[key[0]] for p in parts])
              for key in first.probes}
    n_train = {stage: sum(p.n_train_tokens[stage] for p in parts) for stage in first.n_train_tokens}
    info = {**first.info, "timing": {k: sum(float(p.info["timing"][k]) for p in parts) for k in first.info["timing"]},
            "merged_from": len(parts)}
    return TrainedProbes(probes, n_train, first.trainer, info)


def _captured(adapter: VLMAdapter, stages: Sequence[Stage], timing: dict[str, float], *, batch_size: int, prompt: str,
              num_workers: int, views: Sequence[str] | None,
              transform: Callable[[Image.Image], Image.Image] | None = None,
              ) -> Callable[[Sequence[Path]], Iterator[dict[str, StageBatch]]]:
    """paths -> their captured batches (`stage_batches`), the forward passes timed into `timing`
    (image loading included)."""

    def batches(paths: Sequence[Path]) -> Iterator[dict[str, StageBatch]]:
        it = stage_batches(adapter, paths, stages, batch_size=batch_size, prompt=prompt,
                           num_workers=num_workers, views=views, transform=transform)
        while True:
            t0 = time.perf_counter()
            b = next(it, None)
            timing["forward_s"] += time.perf_counter() - t0
            if b is None:
                timing["n_forward_images"] += len(paths)
                return
            yield b

    return batches


def train_probes(
    adapter: VLMAdapter,
    train: Sequence[Path],
    stages: Sequence[Stage],
    probe: Mapping[str, Any],
    *,
    batch_size: int,
    prompt: str,
    seed: int = 0,
    num_workers: int = 0,
    sharded: bool = False,
    transform: Callable[[Image.Image], Image.Image] | None = None,
) -> TrainedProbes:
    """Train every stage's probes on `train` images (`probe`: the experiment.probe mapping, as in
    `probe_positions`). sharded: part of a data-parallel run, so `trainer=auto` means torch (the
    merge averages probes over every class; sklearn's cover only the classes a shard saw).
    transform: applied to every image first (`grid_images`)."""
    targets = probe_targets(str(probe["target"]))
    specs = [ProbeSpec(s.name, _stage_dim(adapter, s), s.grid, targets) for s in stages]
    views = list(probe["views"]) if probe.get("views") else None
    rate, epochs = float(probe.get("token_rate", 1.0)), int(probe["epochs"])
    if sharded:
        if str(probe["trainer"]) == "sklearn":
            raise ValueError("a sharded position-probe run trains with the torch trainer (experiment.probe.trainer="
                             "torch or auto): the merge averages probes over every class, and sklearn's cover only "
                             "the classes one shard saw; run sklearn probes with shard.count=1")
        probe = {**probe, "trainer": "torch"}
    plan = plan_training(adapter, len(train), specs, probe)
    log.info("position probes: %d stages, targets %s, trainer %s (%s), %d train images, token cache bound %.2f GB",
             len(stages), ",".join(targets), plan.trainer, plan.epoch_mode, len(train), plan.cache_gb)
    gen = torch.Generator().manual_seed(int(seed))
    timing = {"forward_s": 0.0, "probe_s": 0.0, "n_forward_images": 0}
    batches = _captured(adapter, stages, timing, batch_size=batch_size, prompt=prompt, num_workers=num_workers,
                        views=views, transform=transform)

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
    info = {"trainer": plan.trainer, "epoch_mode": plan.epoch_mode, "epochs": epochs if plan.trainer == "torch" else None,
            "token_rate": rate, "targets": list(targets), "views": views, "cache_bound_gb": plan.cache_gb,
            "n_train_images": len(train), "timing": timing}
    return TrainedProbes(model.export(), n_train_tokens, plan.trainer, info)


def score_probes(
    adapter: VLMAdapter,
    test: Sequence[Path],
    stages: Sequence[Stage],
    trained: TrainedProbes,
    probe: Mapping[str, Any],
    *,
    batch_size: int,
    prompt: str,
    num_workers: int = 0,
    transform: Callable[[Image.Image], Image.Image] | None = None,
) -> ProbeRun:
    """Score `trained` probes on `test` images (each `transform`ed first, as in training): accuracy
    per stage x target x view and per grid cell."""
    targets = probe_targets(str(probe["target"]))
    specs = [ProbeSpec(s.name, _stage_dim(adapter, s), s.grid, targets) for s in stages]
    views = list(probe["views"]) if probe.get("views") else None
    timing = {k: float(v) for k, v in trained.info.get("timing", {}).items()}
    timing.setdefault("forward_s", 0.0), timing.setdefault("probe_s", 0.0), timing.setdefault("n_forward_images", 0)
    batches = _captured(adapter, stages, timing, batch_size=batch_size, prompt=prompt, num_workers=num_workers,
                        views=views, transform=transform)
    bf16 = bool(probe.get("bf16_matmul", False)) and trained.trainer == "torch"
    on_device = {k: LinearProbe.from_dict(p.to_dict(), adapter.device) for k, p in trained.probes.items()}
    scores = PositionScores(specs)
    for b in batches(list(test)):
        t0 = time.perf_counter()
        for name, (x, pos, view) in b.items():
            preds = {t: on_device[name, t].predict(x, bf16_matmul=bf16) for t in targets}
            scores.add_predictions(name, view, pos.numpy(), preds)
        timing["probe_s"] += time.perf_counter() - t0
    return ProbeRun(
        accuracy=_accuracy_frame(scores, stages, trained.n_train_tokens, trained.trainer),
        per_position=_per_position_frame(scores, stages),
        trainer=trained.trainer,
        info={**trained.info, "n_test_images": len(test), "timing": timing},
    )


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
    transform: Callable[[Image.Image], Image.Image] | None = None,
) -> ProbeRun:
    """Train every stage's probes on `train` images and score them on `test` images (each image
    `transform`ed first: `grid_images`).

    `probe` is the `experiment.probe` config (a mapping): target, trainer, epochs, epoch_mode,
    token_rate, views, lr, lr_ref_dim, lr_schedule, weight_decay, minibatch_tokens, standardize,
    bf16_matmul, max_cache_gb, sklearn.*.
    """
    common = {"batch_size": batch_size, "prompt": prompt, "num_workers": num_workers, "transform": transform}
    trained = train_probes(adapter, train, stages, probe, seed=seed, **common)
    return score_probes(adapter, test, stages, trained, probe, **common)


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
