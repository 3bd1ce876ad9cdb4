"""The mean visual embedding: the average projector output over a reference set of images.

Token ablation replaces tokens with it (the paper's "global mean visual embedding"). It is
computed once per (model, data, reference size) and cached on disk with its provenance, so all
experiments and reruns ablate with the same vector.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from vlmloc.engine.visual_features import prepared_batches, projector_io
from vlmloc.results import atomic_write
from vlmloc.rundir import computed_once

log = logging.getLogger("vlmloc.engine")


def _weights_stamp(path: Any) -> list | None:
    """(name, size, mtime) of a local checkpoint's weight files; None for hub ids and tiny builds."""
    if path is None or not Path(str(path)).is_dir():
        return None
    files = sorted(Path(str(path)).glob("*.safetensors")) + sorted(Path(str(path)).glob("*.bin"))
    return [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]


def _cache_key(ctx: Any) -> tuple[str, dict[str, Any]]:
    cfg = ctx.cfg
    ident = {
        "model": str(cfg.model.path if cfg.model.path is not None else f"tiny:{cfg.model.name}"),
        "model_config": OmegaConf.to_container(cfg.model.get("tiny"), resolve=True) if cfg.model.path is None else None,
        "revision": cfg.model.revision,
        "data": OmegaConf.to_container(cfg.data, resolve=True),
        "n_images": int(cfg.mean_embedding.n_images),
        "dtype": str(cfg.model.dtype),
        # a local checkpoint retrained in place must not reuse the old vector
        "weights": _weights_stamp(cfg.model.path),
    }
    digest = hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return f"{cfg.model.name}-{cfg.data.name}-{digest}", ident


def mean_visual_embedding(ctx: Any) -> torch.Tensor:
    """[hidden] float32 mean of projector outputs over the first `mean_embedding.n_images` images of the run's data."""
    name, ident = _cache_key(ctx)
    cache = Path(ctx.cfg.paths.cache_dir) / "mean_embedding"
    tensor_path, meta_path = cache / f"{name}.pt", cache / f"{name}.json"
    # shards starting together: one computes, the others wait and load its file
    return computed_once(tensor_path, lambda: _compute(ctx, ident, meta_path), lambda v, f: torch.save(v, f),
                         lambda p: torch.load(p, map_location="cpu"))


def _compute(ctx: Any, ident: dict[str, Any], meta_path: Path) -> torch.Tensor:
    adapter, t0 = ctx.adapter, time.monotonic()
    total, count, image_ids = None, 0, []
    n_images = int(ctx.cfg.mean_embedding.n_images)
    # the first n_images distinct images in sample order
    seen: set[int] = set()
    first = [s for s in ctx.samples if not (s.image_id in seen or seen.add(s.image_id))][:n_images]
    for chunk, batch in prepared_batches(adapter, first, "classification", int(ctx.cfg.batch_size)):
        _, outs = projector_io(adapter, batch)
        for s, feats in zip(chunk, outs):
            total = feats.sum(0, dtype=torch.float64) if total is None else total + feats.sum(0, dtype=torch.float64)
            count += feats.shape[0]
            image_ids.append(int(s.image_id))
    if total is None:
        raise ValueError("no images to compute the mean visual embedding from")
    mean = (total / count).float()
    meta = {**ident, "n_images_used": len(image_ids), "n_tokens": count, "image_ids": image_ids}
    atomic_write(meta_path, lambda f: f.write(json.dumps(meta, indent=2, default=str).encode()))
    log.info("mean visual embedding over %d images (%d tokens) in %.1f s, cached in %s", len(image_ids), count,
             time.monotonic() - t0, meta_path.parent)
    return mean
