"""Train a demo model: teacher-forced next-token loss on the answer tokens, AdamW, cosine schedule.

    python scripts/train_demo.py configs/train/demo_llava.yaml [key=value ...]

One run: compose the model and data configs (configs/model/<model>.yaml, data=synthetic), build
the untrained model (`build.build_demo`), check that the packed training forward equals the
model's own single-question forward, train on freshly rendered train-split scenes
(`data.PackedScenes`, rendered in DataLoader workers), evaluate on the held-out split every
`eval.every` steps, then save the weights (`save.dtype`, safetensors), tokenizer and image
processor with `save_pretrained`, reload that folder through the project's loader
(`vlmloc.models.load_adapter`, as `model=<name>` does) and score the whole held-out split,
and write the model card (README.md) beside the weights. Logs are JSON lines (train.log).
"""

from __future__ import annotations

import dataclasses

import json
import logging
import math
import os
import platform
import shutil
import sys
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from vlmloc.data import load_samples
from vlmloc.data.sample import Sample
from vlmloc.data.synthetic import SyntheticParams
from vlmloc.engine.hooks import Call, Hooks
from vlmloc.evaluation import evaluate
from vlmloc.models.loading import ADAPTERS, load_adapter, resolve_device
from vlmloc.seeds import row_rng
from vlmloc.training.build import build_demo, n_parameters
from vlmloc.training.data import IGNORE, PackedScenes, block_mask, collate, pack, render_train_scene, scene_questions

log = logging.getLogger("vlmloc.training")


# ----------------------------------------------------------------------------- configs


def load_train_config(path: str | Path, overrides: Sequence[str] = ()) -> DictConfig:
    """configs/train/<name>.yaml merged with `key=value` overrides (OmegaConf dotlist)."""
    cfg = OmegaConf.load(path)
    if overrides:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    return cfg


def compose_project(model: str, work_dir: Path, data_overrides: Sequence[str] = ()) -> DictConfig:
    """The project config (`python -m vlmloc model=<model> data=synthetic ...`), paths under work_dir."""
    from hydra import compose, initialize_config_dir

    import vlmloc.assets  # noqa: F401  (registers the ${vlmloc.asset:...} resolver)
    from vlmloc.__main__ import config_dir

    overrides = [f"model={model}", "data=synthetic", f"paths.data_dir={work_dir / 'data'}",
                 f"paths.cache_dir={work_dir / 'cache'}", *data_overrides]
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose("config", overrides=overrides)


# ----------------------------------------------------------------------------- forward


def packed_hidden(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Last hidden states [batch, seq, hidden] of a packed batch through the model's own modules."""
    out = model.model(
        input_ids=batch["input_ids"],
        pixel_values=batch["pixel_values"],
        attention_mask=block_mask(batch["segment"]),
        position_ids=batch["position_ids"],
        use_cache=False,
    )
    return out.last_hidden_state


def answer_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean loss, per-token losses [n], selected target ids [n]) over the answer tokens."""
    hidden = packed_hidden(model, batch)
    target = batch["labels"][:, 1:]
    sel = target != IGNORE
    logits = model.lm_head(hidden[:, :-1][sel]).float()
    per_token = torch.nn.functional.cross_entropy(logits, target[sel], reduction="none")
    return per_token.mean(), per_token, target[sel]


class ProjectorTap:
    """Keeps the projector's output of the last forward: [n_visual_total, hidden] in layout order."""

    def __init__(self, projector: torch.nn.Module) -> None:
        self.out: torch.Tensor | None = None
        self.hooks = Hooks().after(projector, self._keep).__enter__()  # removed by the training loop

    def _keep(self, call: Call, out: torch.Tensor) -> None:
        self.out = out.reshape(-1, out.shape[-1])


def dense_loss(head: torch.nn.Module, feats: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Soft cross-entropy of a linear read-out of each visual token against its category coverage."""
    logp = torch.log_softmax(head(feats).float(), dim=-1)
    return -(targets.float() * logp).sum(-1).mean()


@torch.no_grad()
def check_packing(model: torch.nn.Module, example: dict[str, Any], device: torch.device) -> float:
    """Max |logit difference| between the packed forward and each question's own unpacked forward.

    Must be float noise: the block mask and position ids make each segment see what the
    evaluation's single-question sequence sees.
    """
    was_training = model.training
    model.eval()
    batch = {k: v.to(device) for k, v in collate([example], pad_id=0).items() if isinstance(v, torch.Tensor)}
    packed = model.lm_head(packed_hidden(model, batch))[0].float()
    seg = batch["segment"][0]
    prefix = int((seg == 0).sum())
    worst = 0.0
    for k in range(1, int(seg.max()) + 1):
        idx = torch.nonzero(seg == k).flatten()
        ids = torch.cat([batch["input_ids"][0, :prefix], batch["input_ids"][0, idx]])[None]
        single = model(input_ids=ids, pixel_values=batch["pixel_values"], use_cache=False).logits[0].float()
        worst = max(worst, float((single[prefix:] - packed[idx]).abs().max()))
    model.train(was_training)
    return worst


# ----------------------------------------------------------------------------- evaluation


def negative_outcomes(adapter: Any, samples: Sequence[Sample], categories: Sequence[str], batch_size: int, seed: int = 0) -> list[bool]:
    """Per image: ask about a category absent from it; True when the model denies it (yes/no mode:
    "no" wins, p_yes < 0.5; list mode: the list does not name it).

    The project's classification accuracy only asks about present objects; this is the check
    that the model is not a yes-machine. The absent category is drawn per image (seeded).
    """
    by_image: dict[int, list[Sample]] = {}
    for s in samples:
        by_image.setdefault(s.image_id, []).append(s)
    present = _present_categories(samples)
    items = []
    for image_id, group in sorted(by_image.items()):
        absent = [c for c in categories if c not in present[image_id]]
        if absent:
            items.append((group[0], str(row_rng(seed, image_id, "negative").choice(absent))))
    # the same question about the absent category: "correct" (yes wins) would be a false positive
    asked = [dataclasses.replace(s, sample_id=f"{s.sample_id}-absent", category=c) for s, c in items]
    rows = evaluate(adapter, asked, ["classification"], batch_size=batch_size, progress=False)
    said_yes = dict(zip(rows["sample_id"], rows["correct"])) if len(rows) else {}
    return [not bool(said_yes[s.sample_id]) for s in asked]


def _present_categories(samples: Sequence[Sample]) -> dict[int, set[str]]:
    """image id -> every annotated category of the image (from the COCO file, filters ignored)."""
    import json as _json

    present: dict[int, set[str]] = {}
    files = {s.image_path.parent.parent / "instances.json" for s in samples}
    for f in files:
        coco = _json.loads(Path(f).read_text())
        names = {c["id"]: c["name"] for c in coco["categories"]}
        for a in coco["annotations"]:
            present.setdefault(int(a["image_id"]), set()).add(names[a["category_id"]])
    return present


def heldout_scores(adapter: Any, samples: Sequence[Sample], categories: Sequence[str], batch_size: int) -> dict[str, float]:
    """Baseline scores as experiment=baseline computes them (classification in the model's mode),
    plus the yes/no accuracy when that mode is another, and the negative-question accuracy."""
    df = evaluate(adapter, samples, ["classification", "localization"], batch_size=batch_size, progress=False)
    cls = df[df.task == "classification"]
    loc = df[df.task == "localization"]
    hits = {t: float(loc[f"hit_{t}"].astype(float).mean()) for t in ("50", "70", "90")}
    neg = negative_outcomes(adapter, samples, categories, batch_size)
    extra = {}
    if adapter.classification_mode != "yes_no":  # CMA and make_pairs ask the yes/no question
        yn = evaluate(adapter, samples, ["classification"], batch_size=batch_size, progress=False,
                      classification_mode="yes_no")
        extra["cls_acc_yes_no"] = 100 * float(yn["correct"].astype(float).mean())
    return {
        "n_objects": len(samples),
        "cls_acc": 100 * float(cls["correct"].astype(float).mean()),
        **extra,
        "loc_acc": 100 * float(np.mean(list(hits.values()))),
        "acc50": 100 * hits["50"],
        "acc70": 100 * hits["70"],
        "acc90": 100 * hits["90"],
        "mean_iou": float(loc["iou"].mean()),
        "neg_acc": 100 * float(np.mean(neg)) if neg else math.nan,
        "n_neg": len(neg),
    }


# ----------------------------------------------------------------------------- schedule


def lr_at(step: int, max_steps: int, o: Any) -> float:
    """Linear warmup, then cosine from lr to lr * min_lr_ratio at max_steps."""
    if step < int(o.warmup_steps):
        return float(o.lr) * (step + 1) / int(o.warmup_steps)
    t = min(1.0, (step - int(o.warmup_steps)) / max(1, max_steps - int(o.warmup_steps)))
    floor = float(o.min_lr_ratio)
    return float(o.lr) * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t)))


# ----------------------------------------------------------------------------- the run


class JsonLog:
    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self.f = path.open("a")

    def __call__(self, **record: Any) -> None:
        line = json.dumps(record, default=float)
        self.f.write(line + "\n")
        self.f.flush()
        print(line, flush=True)


class Feeder:
    """Training batches: fresh ones from the DataLoader (read by a background thread) and, while
    no fresh batch is ready, replays of recent fresh batches kept on the device.

    Rendering scenes is CPU work; a small model trains faster than the CPU renders on a GPU. Replays
    keep the GPU busy instead of idle; `max_replay_ratio` bounds them (replayed steps <= ratio x
    fresh steps), `buffer` is how many recent fresh batches they are drawn from (seeded draw; which
    steps replay depends on timing). max_replay_ratio=0 trains on fresh batches only.
    """

    def __init__(self, loader: Any, device: torch.device, buffer: int, max_replay_ratio: float, seed: int) -> None:
        import queue
        import threading

        self._queue: Any = queue.Queue(maxsize=4)
        self._empty = queue.Empty
        self.device = device
        self.buffer: list[dict[str, Any]] = []
        self.size = int(buffer)
        self.ratio = float(max_replay_ratio)
        self.rng = np.random.default_rng([int(seed), 0xFEED])
        self.fresh = self.replayed = 0
        self.wait_s = 0.0
        self._thread = threading.Thread(target=self._pump, args=(loader,), daemon=True)
        self._thread.start()

    def _pump(self, loader: Any) -> None:
        try:
            for batch in loader:
                self._queue.put(batch)
        except BaseException as err:  # surfaced in the training loop
            self._queue.put(err)

    def next(self) -> tuple[dict[str, Any], bool]:
        """(batch on the device, fresh?)"""
        item = None
        if self.buffer and self.replayed < self.ratio * self.fresh:
            try:
                item = self._queue.get_nowait()
            except self._empty:
                self.replayed += 1
                return self.buffer[int(self.rng.integers(len(self.buffer)))], False
        if item is None:
            t0 = time.time()
            item = self._queue.get()
            self.wait_s += time.time() - t0
        if isinstance(item, BaseException):
            raise RuntimeError("the training data loader failed") from item
        batch = {k: v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in item.items()}
        self.fresh += 1
        if self.size > 0:
            self.buffer.append(batch)
            if len(self.buffer) > self.size:
                self.buffer.pop(0)
        return batch, True


def _initial_model(cfg: DictConfig, model_cfg: Any, categories: Sequence[str], seed: int) -> tuple[Any, Any]:
    """A fresh build (cfg.arch), or the weights, tokenizer and processor of cfg.init_from (continued training)."""
    if cfg.get("init_from"):
        from vlmloc.models.loading import _load_processor, _model_class

        folder = str(Path(str(cfg.init_from)).expanduser().resolve())
        model = _model_class(str(model_cfg.family)).from_pretrained(folder, dtype=torch.float32)
        return model, _load_processor(str(model_cfg.family), folder, None)
    return build_demo(model_cfg, cfg.arch, categories, seed)


def train(cfg: DictConfig, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Run one training job; returns the summary written to the model card.

    overrides: the command line's `key=value` list, recorded so the card can repeat the run.
    """
    import tempfile

    t_start = time.time()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    out_dir = Path(str(cfg.out_dir)).expanduser().resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    work_dir = Path(tempfile.mkdtemp(prefix=f"vlmloc-train-{cfg.model}-"))  # held-out data, caches
    folder = out_dir / str(cfg.model)
    logj = JsonLog(out_dir / "train.log")
    seed = int(cfg.seed)
    torch.manual_seed(seed)
    np.random.seed(seed)

    project = compose_project(str(cfg.model), work_dir)
    model_cfg = project.model
    family = str(model_cfg.family)
    synth = OmegaConf.to_container(project.data.synthetic, resolve=True)
    synth.update(OmegaConf.to_container(cfg.data.synthetic, resolve=True) or {})
    params = SyntheticParams.from_mapping(synth)
    device = resolve_device(str(cfg.device))

    model, processor = _initial_model(cfg, model_cfg, params.categories, seed)
    adapter = ADAPTERS[family](model, processor, model_cfg, device)
    counts = n_parameters(model)
    logj(event="start", model=str(cfg.model), family=family, params=counts, device=str(device),
         torch=torch.__version__, transformers=_version("transformers"), python=platform.python_version(),
         gpu=torch.cuda.get_device_name(0) if device.type == "cuda" else None,
         config=OmegaConf.to_container(cfg, resolve=True))

    # The workers fork (iter(loader)) before CUDA is touched.
    dataset = PackedScenes(adapter, params, str(cfg.data.split), seed, offset=int(cfg.data.first_scene),
                           list_objects=bool(cfg.data.get("list_objects", False)))
    b = int(cfg.data.images_per_step)
    workers = int(cfg.data.num_workers)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=b, shuffle=False, num_workers=workers,
        collate_fn=partial(collate, pad_id=int(processor.tokenizer.pad_token_id)),
        pin_memory=device.type == "cuda", prefetch_factor=4 if workers else None, persistent_workers=bool(workers),
    )
    feeder = Feeder(iter(loader), device, int(cfg.data.replay_buffer), float(cfg.data.max_replay_ratio), seed)
    model.to(device)

    image, spec = render_train_scene(params, str(cfg.data.split), 10**9)  # beyond any training index
    example = pack(dataset.encoder, scene_questions(adapter, spec, params.categories, np.random.default_rng(0),
                                                    dataset.list_objects), dataset.pixel_values(image))
    torch.backends.cuda.matmul.allow_tf32 = False
    diff = check_packing(model, example, device)
    logj(event="packing_check", max_abs_logit_diff=diff)
    if diff > float(cfg.packing_tolerance):
        raise RuntimeError(f"packed forward differs from the model's own forward by {diff:.2e}")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True

    data_cfg = OmegaConf.to_container(project.data, resolve=True)
    eval_samples, _ = load_samples({**data_cfg, "n": cfg.eval.n})

    # Auxiliary dense loss: a linear read-out (discarded after training) of each projected visual
    # token predicts the share of its cell each category covers. It stands in for the semantic
    # pretraining of a real vision tower; without it the LM learns the answer prior and ignores
    # the image (the visual tokens collapse to a constant) for thousands of steps.
    aux_weight = float(cfg.aux.weight)
    aux_head = torch.nn.Linear(int(model.config.text_config.hidden_size), len(params.categories) + 1).to(device)
    tap = ProjectorTap(model.model.multi_modal_projector) if aux_weight > 0 else None

    o = cfg.optim
    trained = list(model.parameters()) + (list(aux_head.parameters()) if aux_weight > 0 else [])
    decay = [p for p in trained if p.dim() >= 2]
    no_decay = [p for p in trained if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": float(o.weight_decay)}, {"params": no_decay, "weight_decay": 0.0}],
        lr=float(o.lr), betas=tuple(o.betas), eps=1e-8, fused=device.type == "cuda",
    )
    auto_steps = str(o.max_steps) == "auto"
    if auto_steps and not 0 < int(o.calibrate_from) < int(o.calibrate_until) <= int(o.warmup_steps):
        raise ValueError("optim.max_steps=auto needs 0 < calibrate_from < calibrate_until <= warmup_steps")
    # Until calibration the schedule is in warmup, which does not depend on max_steps.
    max_steps = 10**9 if auto_steps else int(o.max_steps)
    budget = float(o.time_budget_s)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bool(o.bf16) and device.type == "cuda")
    model.train()
    t_train = time.time()
    t_cal = None
    stats = _fresh_stats()
    images_seen = questions_seen = 0
    history = []
    step = 0
    stopped_by = "max_steps"
    while step < max_steps:
        batch, fresh = feeder.next()
        if fresh:
            images_seen += b
            questions_seen += int(batch["n_questions"])
        for g in opt.param_groups:
            g["lr"] = lr_at(step, max_steps, o)
        with amp:
            loss, per_token, _ = answer_loss(model, batch)
            total = loss
            if tap is not None:
                aux = dense_loss(aux_head, tap.out, batch["token_targets"])
                total = loss + aux_weight * aux
                stats["aux"] += aux.detach()
                stats["vis_norm"] += tap.out.detach().float().norm(dim=-1).mean()
        opt.zero_grad(set_to_none=True)
        total.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), float(o.grad_clip))
        opt.step()
        with torch.no_grad():  # accumulated on the device: no sync until the next log line
            tasks = batch["label_task"][:, 1:][batch["labels"][:, 1:] != IGNORE]
            for name, code in (("cls", 1), ("loc", 2)):
                sel = tasks == code
                stats[name][0] += per_token.detach()[sel].sum()
                stats[name][1] += sel.sum()
        stats["loss"] += loss.detach()
        stats["n"] += 1
        step += 1

        if auto_steps and step == int(o.calibrate_from):
            _sync(device)
            t_cal = time.time()
        if auto_steps and step == int(o.calibrate_until):
            _sync(device)
            per_step = (time.time() - t_cal) / (int(o.calibrate_until) - int(o.calibrate_from))
            evals = 1 + budget / per_step / int(cfg.eval.every)
            left = budget - (time.time() - t_train) - evals * float(cfg.eval.seconds_estimate)
            max_steps = max(int(o.warmup_steps) + 1, step + int(left / per_step))
            logj(event="calibrated", sec_per_step=per_step, max_steps=max_steps,
                 fresh_steps=feeder.fresh, replayed_steps=feeder.replayed)
        if step % int(cfg.log_every) == 0 or step == max_steps:
            el = time.time() - t_train
            logj(event="train", step=step, max_steps=max_steps, loss=float(stats["loss"]) / stats["n"],
                 loss_cls=float(stats["cls"][0]) / max(1, int(stats["cls"][1])),
                 loss_loc=float(stats["loc"][0]) / max(1, int(stats["loc"][1])),
                 aux_loss=float(stats["aux"]) / stats["n"], visual_norm=float(stats["vis_norm"]) / stats["n"],
                 lr=opt.param_groups[0]["lr"], grad_norm=float(gnorm), images=images_seen, questions=questions_seen,
                 fresh_steps=feeder.fresh, replayed_steps=feeder.replayed,
                 elapsed_s=round(el, 1), steps_per_s=round(step / el, 2), data_wait_s=round(feeder.wait_s, 1))
            stats = _fresh_stats()
        if step % int(cfg.eval.every) == 0 or step == max_steps:
            model.eval()
            te = time.time()
            scores = heldout_scores(adapter, eval_samples, params.categories, int(cfg.eval.batch_size))
            save_model(model, processor, folder, str(cfg.save.dtype))  # a checkpoint, should the job be cut off
            model.train()
            history.append({"step": step, **scores})
            logj(event="eval", step=step, eval_s=round(time.time() - te, 1), **scores)
        if time.time() - t_train > budget and step < max_steps:
            stopped_by = "time_budget"
            logj(event="stop", reason="time budget reached before max_steps", step=step)
            break
    train_s = time.time() - t_train
    if tap is not None:
        tap.hooks.remove()

    # Save, reload through the project's loader (as model=<name> would), score the whole held-out split.
    save_model(model, processor, folder, str(cfg.save.dtype))
    final_cfg = OmegaConf.create(OmegaConf.to_container(model_cfg, resolve=True))
    final_cfg.path = str(folder)
    final_cfg.device = str(device)
    final_cfg.dtype = "float32"
    reloaded = load_adapter(final_cfg)
    full, _ = load_samples({**data_cfg, "n": cfg.eval.final_n})
    final = heldout_scores(reloaded, full, params.categories, int(cfg.eval.batch_size))
    default_samples, _ = load_samples(data_cfg)
    default = heldout_scores(reloaded, default_samples, params.categories, int(cfg.eval.batch_size))
    logj(event="final", split="heldout", **final)
    logj(event="final_default_subset", n=int(project.data.n), **default)
    summary = {
        "model": str(cfg.model),
        "family": family,
        "params": counts,
        "steps": step,
        "stopped_by": stopped_by,
        "fresh_steps": feeder.fresh,
        "replayed_steps": feeder.replayed,
        "images_seen": images_seen,
        "questions_seen": questions_seen,
        "train_seconds": round(train_s, 1),
        "total_seconds": round(time.time() - t_start, 1),
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else platform.processor() or "cpu",
        "versions": {"torch": torch.__version__, "transformers": _version("transformers"), "python": platform.python_version()},
        "heldout": final,
        "heldout_default_subset": default,
        "history": history,
        "synthetic": params.as_json(),
        "train_config": OmegaConf.to_container(cfg, resolve=True),
        "overrides": [o for o in overrides if not o.startswith(("out_dir=", "device="))],
        "eval_max_tiles": int(model_cfg.max_tiles) if family == "internvl" else None,
        "weights_bytes": sum(f.stat().st_size for f in folder.glob("*.safetensors")),
        "max_steps": max_steps,
    }
    summary["stages"] = previous_stages(cfg.get("init_from")) + [stage_record(summary)]
    write_card(folder, summary)
    (folder / "training_summary.json").write_text(json.dumps(summary, indent=2, default=float) + "\n")
    shutil.rmtree(work_dir, ignore_errors=True)
    logj(event="done", folder=str(folder), total_s=summary["total_seconds"])
    return summary


STAGE_KEYS = ("steps", "max_steps", "stopped_by", "fresh_steps", "replayed_steps", "images_seen", "questions_seen",
              "train_seconds", "device", "overrides", "heldout")


def stage_record(summary: dict[str, Any]) -> dict[str, Any]:
    """One training stage (a run of `train`) as the model card lists it."""
    tc = summary["train_config"]
    record = {k: summary.get(k) for k in STAGE_KEYS}
    record.update(init_from=tc.get("init_from"), first_scene=tc["data"]["first_scene"],
                  images_per_step=tc["data"]["images_per_step"], lr=tc["optim"]["lr"])
    return record


def previous_stages(init_from: str | None) -> list[dict[str, Any]]:
    """The stages that produced `init_from` (from its training_summary.json); [] for a fresh build.

    A continued run's card then lists the whole lineage and every command that reproduces it.
    """
    if not init_from:
        return []
    path = Path(str(init_from)).expanduser() / "training_summary.json"
    if not path.exists():
        return [{"init_from": str(init_from), "unknown": True}]
    prev = json.loads(path.read_text())
    return prev.get("stages") or [stage_record(prev)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _fresh_stats() -> dict[str, Any]:
    return {"loss": 0.0, "n": 0, "cls": [0.0, 0], "loc": [0.0, 0], "aux": 0.0, "vis_norm": 0.0}


def save_model(model: torch.nn.Module, processor: Any, folder: Path, dtype: str) -> None:
    """save_pretrained (safetensors, one file) in `dtype`, plus the tokenizer and image processor."""
    import copy

    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    cast = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]
    clone = copy.deepcopy(model).to("cpu", dtype=cast)
    clone.save_pretrained(folder, safe_serialization=True, max_shard_size="100MB")
    processor.save_pretrained(folder)


def _version(pkg: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(pkg)
    except Exception:  # pragma: no cover
        return None


BAR = {"cls_acc": 90.0, "loc_acc": 60.0}  # the project's quality bar for the demo models (held-out split)


def write_card(folder: Path, s: dict[str, Any]) -> None:
    """README.md model card: what the model is, its data, training and held-out scores."""
    h, d = s["heldout"], s["heldout_default_subset"]
    tc = s["train_config"]
    arch = tc["arch"]
    fam = s["family"]
    cls_name = "LlavaForConditionalGeneration" if fam == "llava" else "InternVLForConditionalGeneration"
    fmt = ("`[x1, y1, x2, y2]`, normalised to the image padded to a square, two decimals" if fam == "llava"
           else "`<box>[[x1, y1, x2, y2]]</box>`, integers 0-1000 of the original image")
    syn = s["synthetic"]
    hist = "\n".join(
        f"| {r['step']} | {r['cls_acc']:.1f} | {r['neg_acc']:.1f} | {r['loc_acc']:.1f} | {r['acc50']:.1f} | {r['acc70']:.1f} | {r['acc90']:.1f} |"
        for r in s["history"]
    )
    stages = s.get("stages") or [stage_record(s)]
    met = h["cls_acc"] >= BAR["cls_acc"] and h["loc_acc"] >= BAR["loc_acc"]
    status = (
        f"Quality bar of the project (whole held-out split: classification >= {BAR['cls_acc']:.0f} %, "
        f"localization >= {BAR['loc_acc']:.0f} %): **{'met' if met else 'NOT met'}**"
        + ("." if met else f" ({h['cls_acc']:.1f} % / {h['loc_acc']:.1f} %): train longer (see Retrain).")
    )
    listq = (", and the list prompt, answered with the scene's categories in reading order"
             + (" (in the stages run with data.list_objects=true)" if len(s.get("stages") or []) > 1 else "")
             if tc["data"].get("list_objects") else "")
    listed = "cls_acc_yes_no" in h  # scored in list mode; the yes/no accuracy beside it
    cls_rule = ("share of objects whose category the generated answer to the list prompt names (the yes/no "
                "column: share where P(yes) > P(no), the question CMA asks)" if listed
                else "share of objects where P(yes) > P(no)")
    absent_rule = "a list that does not name it" if listed else "P(yes) < P(no)"
    yn_head, yn_rule = (" yes/no |", "---|") if listed else ("", "")

    def yn(r: dict[str, Any]) -> str:
        return f" {r['cls_acc_yes_no']:.1f} |" if listed else ""

    notes = "".join(f"- {n}\n" for n in s.get("notes", []))
    notes = f"\n## Notes\n{notes}" if notes else ""
    text = f"""# {s['model']}: a small {cls_name} trained by vlmloc

A demo model for the vlmloc pipeline (reproducing "Mechanisms of Object Localization in
Vision-Language Models"): the real transformers class `{cls_name}`, trained from scratch on
the project's synthetic shape scenes, so that every experiment runs on a CPU and means
something. It is not a general VLM: it knows {len(syn['categories'])} shape categories.

- Load: `python -m vlmloc model={s['model']}` (config `configs/model/{s['model']}.yaml`), or
  `{cls_name}.from_pretrained(<this folder>)`; no network needed.
- Parameters: {s['params']['total']/1e6:.2f} M (vision tower {s['params']['vision_tower']/1e6:.2f} M,
  projector {s['params']['projector']/1e6:.2f} M, language model {s['params']['language_model']/1e6:.2f} M),
  stored as {tc['save']['dtype']} safetensors ({s['weights_bytes']/1e6:.1f} MB); loads as float32 on CPU.
- Architecture (`arch` in `configs/train/{s['model']}.yaml`): vision {arch['vision']}; language model
  {arch['text']}; BPE vocabulary trained on the prompts (digits are single tokens).
- Answers in the family's own formats: "Yes"/"No" to the classification prompt, and boxes as {fmt}
  (`adapter.format_box`, the format `adapter.parse_box` reads).

## Data
Synthetic scenes from `vlmloc.data.synthetic` with the generator settings of `data=synthetic`
({', '.join(syn['categories'])}; 1-{syn['max_objects']} objects, sizes {syn['size_frac']} of the short side,
{syn['n_distractors']} distractors, textured backgrounds, images {syn['width']} x {syn['height']} px):
split `train` (scene i = image i of `ensure_synthetic(root, "train", ...)`), rendered on the fly;
evaluation on split `heldout` (disjoint seed stream). Per scene: for every object the
classification question (answer Yes) and the localization question; as many classification
questions about absent categories (answer No){listq}. {sum(st.get('images_seen') or 0 for st in stages):,} scenes,
{sum(st.get('questions_seen') or 0 for st in stages):,} questions{' over all stages' if len(stages) > 1 else ''}.

## Training
Teacher-forced next-token cross-entropy on the answer tokens only (prompt masked), plus
{tc['aux']['weight']} x an auxiliary dense loss: a linear read-out of every projected visual token
(discarded after training) predicts the share of its cell that each category covers, a stand-in
for the semantic pretraining of a real vision tower (without it the LM learned the answer prior
and ignored the image). The questions of
one image share its visual prefix through a block attention mask (checked equal to the
single-question forward at start). AdamW (lr {tc['optim']['lr']}, betas {tc['optim']['betas']},
weight decay {tc['optim']['weight_decay']}), {tc['optim']['warmup_steps']} warmup steps, cosine to
{tc['optim']['min_lr_ratio']} x lr, grad clip {tc['optim']['grad_clip']}, bf16 autocast,
{tc['data']['images_per_step']} images per step, seed {tc['seed']}.
{stages_text(stages, s)}

## Held-out scores
{status}

`experiment=baseline` scoring on split `heldout` (the object filters of `data=synthetic`), with these
weights loaded as float32 through `model.path`. Classification: {cls_rule};
localization: mean of the hit rates at IoU 0.5 / 0.7 / 0.9. "No on absent" asks each image about one
category it does not contain ({absent_rule} is correct): not part of the project's score.

| subset | objects | classification |{yn_head} no on absent | localization | acc@0.5 | acc@0.7 | acc@0.9 | mean IoU |
|---|---|---|{yn_rule}---|---|---|---|---|---|
| whole held-out split | {h['n_objects']} | {h['cls_acc']:.1f} |{yn(h)} {h['neg_acc']:.1f} | {h['loc_acc']:.1f} | {h['acc50']:.1f} | {h['acc70']:.1f} | {h['acc90']:.1f} | {h['mean_iou']:.3f} |
| default run (data.n={d['n_objects']}) | {d['n_objects']} | {d['cls_acc']:.1f} |{yn(d)} {d['neg_acc']:.1f} | {d['loc_acc']:.1f} | {d['acc50']:.1f} | {d['acc70']:.1f} | {d['acc90']:.1f} | {d['mean_iou']:.3f} |

During training{f' stage {len(stages)}' if len(stages) > 1 else ''} (held-out subset of {tc['eval']['n']} objects; steps of that stage):

| step | classification | no on absent | localization | acc@0.5 | acc@0.7 | acc@0.9 |
|---|---|---|---|---|---|---|
{hist}

## Retrain
```bash
{retrain_commands(stages, s['model'])}
```
Seeded (model init, scene stream, question draws, replay draws); which steps replay depends on
timing and GPU kernels are not bit-reproducible, so reruns come close, not identical
(`data.max_replay_ratio=0` trains on fresh scenes only).
`training_summary.json` holds every number above and the full training config.
{notes}"""
    (folder / "README.md").write_text(text)


def stages_text(stages: Sequence[dict[str, Any]], s: dict[str, Any]) -> str:
    """The card's account of the training run(s): one paragraph, or a table when training was continued."""
    last = stages[-1]
    env = f"torch {s['versions']['torch']}, transformers {s['versions']['transformers']}"
    if len(stages) == 1:
        return (f"{last['steps']} steps in {last['train_seconds']/60:.1f} min on one {last['device']} (whole job\n"
                f"{s['total_seconds']/60:.1f} min; {env}):\n"
                f"{last['fresh_steps']} steps on freshly rendered scenes and {last['replayed_steps']} replays of recent batches,\n"
                "taken while the CPU workers had no fresh batch ready (`data.max_replay_ratio`).")
    rows = []
    for k, st in enumerate(stages, start=1):
        if st.get("unknown"):
            rows.append(f"| {k} | {st['init_from']} (no training summary) | | | | | | | |")
            continue
        h = st["heldout"]
        start = "fresh build" if not st.get("init_from") else f"stage {k - 1}"
        rows.append(
            f"| {k} | {start} | {st['steps']} ({st['stopped_by']}) | {st['images_per_step']} | {st['lr']} | "
            f"{st['images_seen']:,} (from scene {st['first_scene']:,}) | {st['fresh_steps']} / {st['replayed_steps']} | "
            f"{st['train_seconds']/60:.1f} min, {st['device']} | {h['cls_acc']:.1f} / {h['loc_acc']:.1f} |"
        )
    total_min = sum(st.get("train_seconds") or 0 for st in stages) / 60
    return (
        f"Trained in {len(stages)} stages, each a run of the entry point; a later stage starts from the\n"
        "previous stage's saved weights (`init_from`), with a fresh optimiser, warmup and cosine schedule, on\n"
        f"the next unseen scenes of the stream (`data.first_scene`). {total_min:.1f} min of training in all ({env}).\n"
        "Replays: steps on a recent batch, taken while the CPU workers had no fresh batch ready (`data.max_replay_ratio`).\n\n"
        "| stage | starts from | steps | images/step | lr | scenes | fresh / replayed steps | time | held-out cls / loc |\n"
        "|---|---|---|---|---|---|---|---|---|\n" + "\n".join(rows)
    )


def retrain_commands(stages: Sequence[dict[str, Any]], model: str) -> str:
    """Shell commands that rerun every stage in order, then ship the last one."""
    skip = ("init_from=", "out_dir=", "device=", "optim.max_steps=")
    lines = []
    for k, st in enumerate(stages, start=1):
        if st.get("unknown"):
            lines.append(f"# stage {k}: the weights in {st['init_from']} (no record of how they were trained)")
            continue
        out = f"outputs/train/{model}" + (f"/stage{k}" if len(stages) > 1 else "")
        args = [o for o in st.get("overrides") or [] if not o.startswith(skip)]
        if k > 1:
            args.insert(0, f"init_from=outputs/train/{model}/stage{k - 1}/{model}")
        # The planned max_steps fixes the cosine schedule; a stage cut by its time budget stops there again.
        args.append(f"optim.max_steps={st.get('max_steps') or st['steps']}")
        lines.append(f"python scripts/train_demo.py configs/train/{model}.yaml device=cuda {' '.join(args)} out_dir={out}")
    last = f"outputs/train/{model}" + (f"/stage{len(stages)}" if len(stages) > 1 else "")
    lines.append(f"cp -r {last}/{model}/* src/vlmloc/assets/{model}/")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    cfg = load_train_config(argv[0], argv[1:])
    train(cfg, argv[1:])
    return 0
