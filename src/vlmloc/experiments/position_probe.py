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
thumbnail / local crops). Qwen2.5-VL / Qwen3-VL resize every image to a grid of its own (dynamic
resolution), under which a class (row, col) would not name one place and the class set would
change with the image; they are probed on one configured grid instead, as the other families'
grids are fixed: every image is fitted to a square of `experiment.image_grid.tokens_per_side` LM
tokens (default 16: 448 px for Qwen2.5-VL, 512 px for Qwen3-VL, near an ImageNet photo's native
size) by a centre crop (or a pad, `image_grid.fit`) and a resize, which the processor keeps. The
projector and LLM are probed on that 16x16 token grid, the ViT layers on the 32x32 patch grid
before the 2x2 merge (each patch labelled by its place on the image, whatever order the tower
holds the patches in: `vlmloc.engine.capture`).

Activations come from one forward per batch (`vlmloc.engine.capture`); the question after the
image does not matter, since visual tokens never attend to later tokens (causal attention).
Training streams each batch's activations into all stages' probes, or caches them when they fit
(`experiment.probe.*`; the training paths and their costs are in `vlmloc.probe_training`).

Sharded (`shard.count=n`), the probes train data-parallel: shard i trains every stage's probes on
its share of the training images (membership by the image's path, `vlmloc.shards.shard_of`),
with the full schedule, and saves them; the shard that finishes last averages them into one
probe per stage, weighted by training tokens (`vlmloc.probes.average_probes`: averaged weights
and biases on raw features, so the merged probe's logits are the weighted mean of the shards'
logits, an ensemble that is itself one linear probe), and scores it on every test image. The
forward passes, the cost of a paper-scale run, divide by n; the test pass (one forward per test
image) runs once. Not identical to one process: each shard's probe is fit to fewer images, and
an average of linear models fit to disjoint data approaches the pooled fit as each share grows
(Zhang, Duchi & Wainwright 2013, "Communication-efficient algorithms for statistical
optimization"). Sharding by stage instead would leave every shard a full forward per image.

Outputs in the run directory: probe_accuracy.parquet (one row per stage x target x view),
per_position.parquet (per grid cell), probes.pt (every trained probe: `TrainedProbes.to_dict`;
a shard also keeps its own, probes.shard-<i>-of-<n>.pt), fig2_position_probe.png,
fig11_heatmaps.png, summary.md, run.json (`vlmloc.reports.position_probe` draws the figures and
table from the two parquet files). A rerun with the same config finds them and only redraws the
figures; a run killed after training finds its probes and only scores them.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from omegaconf import MISSING, DictConfig, OmegaConf

from vlmloc.data.images import ImageSplit, load_image_split
from vlmloc.engine.capture import token_pixels
from vlmloc.errors import ConfigError
from vlmloc.models.adapter import VLMAdapter
from vlmloc.models.families import family
from vlmloc.probe_training import (
    ImageGridSettings,
    ProbeSettings,
    TrainedProbes,
    grid_images,
    memory_bound,
    merge_probes,
    probe_prompt,
    score_probes,
    select_stages,
    train_probes,
)
from vlmloc.probes import probe_targets
from vlmloc.provenance import provenance, write_run_json
from vlmloc.reports import position_probe as position_probe_report
from vlmloc.results import atomic_write
from vlmloc.runner import RunContext
from vlmloc.shards import Shard
from vlmloc.shards import from_config as shard_config
from vlmloc.settings import at_least, load, register

log = logging.getLogger("vlmloc.experiments.position_probe")

# A changed config (its `fingerprint`) retrains the probes and replaces the results: see `run`.
RECOMPUTES_CHANGED_CONFIG = True

ACCURACY_FILE = "probe_accuracy.parquet"
PER_POSITION_FILE = "per_position.parquet"
PROBES_FILE = "probes.pt"  # the trained probes (`vlmloc.probe_training.TrainedProbes`)


# --------------------------------------------------------------------------- config


@register("position_probe")
@dataclass(frozen=True)
class Settings:
    """experiment.* of configs/experiment/position_probe.yaml, typed and checked."""

    name: str = MISSING
    question: str = MISSING  # the text after the image
    stages: tuple[str, ...] | None = MISSING  # stage selectors to probe (None = every stage)
    heatmap_stages: tuple[str, ...] = MISSING  # Fig. 11's panels, among the probed stages
    num_workers: int = MISSING  # DataLoader workers decoding images
    image_grid: ImageGridSettings = MISSING  # the one grid of dynamic-resolution families (Qwen-VL)
    probe: ProbeSettings = MISSING

    def __post_init__(self) -> None:
        at_least("experiment.num_workers", self.num_workers, 0)


def settings(cfg: DictConfig) -> Settings:
    return load(Settings, cfg)


def check_config(cfg: DictConfig) -> None:
    """A sharded run trains data-parallel with the torch trainer (`vlmloc.probe_training.train_probes`)."""
    if shard_config(cfg).sharded and settings(cfg).probe.trainer == "sklearn":
        raise ValueError("experiment.probe.trainer=sklearn cannot be sharded: the merge averages probes over every "
                         "class, and sklearn's cover only the classes one shard saw; use probe.trainer=torch (or "
                         "auto) or shard.count=1")


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


# --------------------------------------------------------------------------- resume and provenance


def fingerprint(cfg: DictConfig) -> str:
    """Hash of everything that changes the numbers: experiment, model, data, seed, batch size.
    `experiment.image_grid` counts only for dynamic-resolution families (the others ignore it, and
    their runs keep the fingerprints they had before it existed)."""
    parts = {k: OmegaConf.to_container(cfg[k], resolve=True) for k in ("experiment", "model", "data")}
    if not family(str(cfg.model.family)).dynamic_resolution:
        parts["experiment"].pop("image_grid", None)  # type: ignore[union-attr]
    parts |= {"seed": int(cfg.seed), "batch_size": int(cfg.batch_size)}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _finished(run_dir: Path, fp: str) -> bool:
    try:
        info = json.loads((run_dir / "run.json").read_text())
    except (OSError, ValueError):
        return False
    done = (run_dir / ACCURACY_FILE).exists() and (run_dir / PER_POSITION_FILE).exists()
    return done and info.get("position_probe", {}).get("fingerprint") == fp


def _write_parquet(df: pd.DataFrame, path: Path) -> None:
    table = pa.Table.from_pandas(df, preserve_index=False)
    atomic_write(path, lambda f: pq.write_table(table, f))


def _write_provenance(ctx: RunContext, split: ImageSplit, extra: Mapping[str, Any], filename: str = "run.json",
                      shards: list[Any] | None = None) -> None:
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
    if ctx.shard.sharded and filename != "run.json":
        info["shard"] = {"index": ctx.shard.index, "count": ctx.shard.count, "n_train_images": extra.get("n_train_images")}
    if shards is not None:  # the merged run: every shard's own provenance, as vlmloc.shards.merge lists it
        info["shards"] = shards
    write_run_json(ctx.run_dir, info, filename)


def _saved(path: Path, fp: str) -> TrainedProbes | None:
    """The probes a shard saved at `path` for this configuration, if any."""
    if not path.exists():
        return None
    d = torch.load(path, map_location="cpu", weights_only=True)
    return TrainedProbes.from_dict(d) if d.get("fingerprint") == fp else None


def shard_images(ctx: RunContext, paths: list[Path], folder: Path) -> list[Path]:
    """The training images of this shard: membership by the image's path under the folder."""
    if not ctx.shard.sharded:
        return list(paths)
    return [p for p in paths if ctx.shard.owns(p.relative_to(folder).as_posix())]


# --------------------------------------------------------------------------- the experiment


def run(ctx: RunContext) -> None:
    """Train the chosen stages' probes on this shard's training images (every one unsharded) and
    save them (probes.pt; a shard: probes.shard-<i>-of-<n>.pt). `finish` scores them."""
    cfg = ctx.cfg
    s = settings(cfg)
    split = _image_split(ctx)
    fp = fingerprint(cfg)
    path = ctx.run_dir / ctx.shard.file(PROBES_FILE)
    if _finished(ctx.run_dir, fp):
        log.info("position probes already done in %s: nothing to do (figures redrawn)", ctx.run_dir)
        return
    if _saved(path, fp) is not None:
        log.info("probes already trained in %s: scoring them", path)
        return
    adapter = ctx.adapter
    stages, heat = select_stages(adapter, s.stages, s.heatmap_stages, s.image_grid.tokens_per_side)
    transform = grid_images(adapter, s.image_grid)  # checks the pixel budget before any forward
    bound = memory_bound(adapter, stages, int(cfg.batch_size), probe_targets(s.probe.target))
    log.info("streaming memory bound: %.2f GB of activations per batch + %.2f GB of probe state",
             bound["activations_per_batch_bytes"] / 1e9, bound["probe_state_bytes"] / 1e9)
    train = shard_images(ctx, split.train, split.folder)
    if ctx.shard.sharded:
        log.info("shard %d of %d: %d of %d training images", ctx.shard.index, ctx.shard.count, len(train), len(split.train))
    trained = train_probes(adapter, train, stages, asdict(s.probe), batch_size=int(cfg.batch_size),
                           prompt=probe_prompt(adapter, s.question), seed=int(cfg.seed), num_workers=s.num_workers,
                           sharded=ctx.shard.sharded, transform=transform)
    trained.info |= {"fingerprint": fp, "heatmap_stages": heat, "stages": [st.name for st in stages],
                     "memory_bound": bound, "image_grid": _image_grid_info(adapter, s.image_grid)}
    data = {"fingerprint": fp, **trained.to_dict()}
    atomic_write(path, lambda f: torch.save(data, f))
    if ctx.shard.sharded:
        _write_provenance(ctx, split, trained.info, ctx.shard.run_json_file)


def finish(ctx: RunContext) -> None:
    """Once every shard has trained: merge the shards' probes (`vlmloc.probe_training.merge_probes`,
    saved as probes.pt), score them on the test images, write the two parquet files and run.json."""
    cfg = ctx.cfg
    s = settings(cfg)
    split = _image_split(ctx)
    fp = fingerprint(cfg)
    if _finished(ctx.run_dir, fp):
        return
    parts = []
    for i in range(ctx.shard.count):
        name = Shard(ctx.shard.count, i).file(PROBES_FILE)
        part = _saved(ctx.run_dir / name, fp)
        if part is None:
            raise ConfigError(f"{ctx.run_dir / name} is missing or was trained with another configuration: rerun "
                              f"that shard (shard.index={i})")
        parts.append(part)
    trained = merge_probes(parts)
    if ctx.shard.sharded:
        merged = {"fingerprint": fp, **trained.to_dict()}
        atomic_write(ctx.run_dir / PROBES_FILE, lambda f: torch.save(merged, f))
    adapter = ctx.adapter
    stages, _ = select_stages(adapter, s.stages, s.heatmap_stages, s.image_grid.tokens_per_side)
    result = score_probes(adapter, split.test, stages, trained, asdict(s.probe), batch_size=int(cfg.batch_size),
                          prompt=probe_prompt(adapter, s.question), num_workers=s.num_workers,
                          transform=grid_images(adapter, s.image_grid))
    _write_parquet(result.accuracy, ctx.run_dir / ACCURACY_FILE)
    _write_parquet(result.per_position, ctx.run_dir / PER_POSITION_FILE)
    extra = dict(result.info)
    shards = None
    if ctx.shard.sharded:  # each shard's provenance and training, as the merge listed them
        shards = json.loads((ctx.run_dir / "run.json").read_text()).get("shards", [])
        extra["shards"] = [sh.get("position_probe", sh) for sh in shards]
    _write_provenance(ctx, split, extra, shards=shards)


def _image_grid_info(adapter: VLMAdapter, grid: ImageGridSettings) -> dict[str, Any] | None:
    """What run.json records of the probe images' fitted grid; None where the family's processor fixes it."""
    if not adapter.facts.dynamic_resolution:
        return None
    return {"tokens_per_side": grid.tokens_per_side, "fit": grid.fit,
            "pixels": grid.tokens_per_side * token_pixels(adapter)}


def report(ctx: RunContext, rows: pd.DataFrame) -> None:
    """Fig. 2 / 11 and summary.md from the two parquet files (`rows`, the runner's table, is empty here)."""
    acc = pd.read_parquet(ctx.run_dir / ACCURACY_FILE)
    per_pos = pd.read_parquet(ctx.run_dir / PER_POSITION_FILE)
    heat = list(json.loads((ctx.run_dir / "run.json").read_text())["position_probe"]["heatmap_stages"])
    position_probe_report.write(acc, ctx.run_dir, ctx.cfg, per_position=per_pos, heatmap_stages=heat)
