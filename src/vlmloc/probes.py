"""Linear position probes: multinomial logistic regression from a token's activation to its grid position.

One probe per (stage, target). Targets (`probe.target` in the config):
- "position" (default, the paper's): the joint grid position r * G + c, a G^2-way classifier
  (LLaVA-1.5: 576-way; InternVL: 256-way per tile on the LM side, 1024-way on the ViT's 32x32 grid).
- "row_col": two G-way classifiers, "row" and "col"; the scores add "row_col", the share of
  tokens where both are right (comparable to the joint target).

Two trainers, one interface (`fit` on stage batches, `predict` per stage):

- `TorchProbes` (streaming): multinomial logistic regression per probe, trained with Adam on
  minibatches as the activations of each model batch arrive, so nothing beyond one batch is ever
  held. Stages of equal width and grid are stacked ([S, dim, classes] weights, batched matmuls):
  Adam is elementwise and the loss a sum over stages, so this is exactly S independent probes,
  without the per-step launch overhead of 57 small ones. Features are standardised per
  dimension with the mean / std of the first batch a stage sees (then frozen): LLM residual
  streams have a few dimensions thousands of times larger than the rest. A stage's learning rate
  may be scaled by sqrt(lr_ref_dim / dim) so one setting suits 32- to 4096-dim stages.
- `SklearnProbes` (full batch): StandardScaler + LogisticRegression (lbfgs) on all training
  tokens at once. A reference for small problems: lbfgs with 576 classes took about a minute per
  stage already for 29k tokens x 64 dims on 2 CPU cores, hence the `auto` rule (`choose_trainer`).

Memory of the streaming path at paper scale (LLaVA-1.5-7B, batch 16, bf16 activations):
  one batch of activations = 16 images x 576 tokens x (24 ViT layers x 1024 + 33 x 4096
  [projector + 32 LLM layers]) x 2 bytes = 0.45 + 2.49 = 2.94 GB; probe weights fp32 =
  576 x (24 x 1024 + 33 x 4096) x 4 bytes = 0.37 GB, x4 with gradients and Adam's two moments
  = 1.47 GB; one stacked minibatch (33 x 2048 tokens x 4096, fp32, standardised) ~2.2 GB.
  Measured (H200, random-weight LLaVA-1.5-7B, transformers 5.17): peak 25.5 GB allocated =
  14.1 GB weights + 11.3 GB (activations, probes, minibatch, forward transients).
Time at paper scale, measured the same way (600-token sequences, batch 16): forward with capture
  291 ms per batch (18.2 ms per image; capture costs nothing measurable), probe updates 37 ms
  per batch with bf16 matmuls (104 ms fp32), host-side PIL preprocessing 88 ms per batch
  (overlaps the GPU: `fit` never waits for it). End to end 343 ms per batch = 21.5 ms per image
  and epoch, so (50k x 10 epochs + 10k test) images take 3.0 h on one H200 (3.6 h with fp32
  probes), JPEG decoding excluded (DataLoader workers).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import nn

TARGETS = ("position", "row_col")
TRAINERS = ("auto", "torch", "sklearn")


def probe_targets(target: str) -> tuple[str, ...]:
    """Config target -> the classifiers trained: ("position",) or ("row", "col")."""
    if target == "position":
        return ("position",)
    if target == "row_col":
        return ("row", "col")
    raise ValueError(f"probe.target must be one of {TARGETS}, got {target!r}")


def n_classes(target: str, grid: int) -> int:
    return grid * grid if target == "position" else grid


def labels(target: str, pos: torch.Tensor, grid: int) -> torch.Tensor:
    """Flat grid positions r * grid + c -> the target's class ids."""
    if target == "position":
        return pos
    if target == "row":
        return torch.div(pos, grid, rounding_mode="floor")
    if target == "col":
        return pos % grid
    raise ValueError(f"unknown probe target {target!r}")


@dataclass(frozen=True)
class ProbeSpec:
    """One stage's probes: its name, feature dim, grid side and targets."""

    stage: str
    dim: int
    grid: int
    targets: tuple[str, ...] = ("position",)


# A stage's training / test data: x [n, dim] activations, pos [n] flat grid positions (long).
StageData = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class LinearProbe:
    """One trained probe as data: class = classes[argmax(z @ weight + bias)], z = (x - mean) / std
    (z = x without standardisation). What either trainer exports, a shard saves and the merge averages.

    weight [dim, C] (float32 from torch; float64 from sklearn, as its own decision function), bias [C], classes [C] long (the class id of each column: every class
    for the torch trainer, those seen in training for sklearn), mean / std [dim] or None.
    """

    weight: torch.Tensor
    bias: torch.Tensor
    classes: torch.Tensor
    mean: torch.Tensor | None = None
    std: torch.Tensor | None = None

    def folded(self) -> LinearProbe:
        """The same map on raw features: weight / std, bias - (mean / std) @ weight."""
        if self.mean is None or self.std is None:
            return self
        w = self.weight / self.std[:, None]
        return LinearProbe(w, self.bias - self.mean @ w, self.classes)

    @torch.no_grad()
    def predict(self, x: torch.Tensor, *, bf16_matmul: bool = False) -> np.ndarray:
        """[n] predicted class ids for tokens x [n, dim] (on the probe's device)."""
        x = x.to(self.weight.device, self.weight.dtype)
        if self.mean is not None and self.std is not None:
            x = (x - self.mean) / self.std
        on = bf16_matmul and x.device.type == "cuda"
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=on):
            cols = torch.addmm(self.bias, x, self.weight).argmax(-1)
        return self.classes.to(cols.device)[cols].cpu().numpy()

    def to_dict(self) -> dict[str, torch.Tensor | None]:
        return {"weight": self.weight.cpu(), "bias": self.bias.cpu(), "classes": self.classes.cpu(),
                "mean": None if self.mean is None else self.mean.cpu(), "std": None if self.std is None else self.std.cpu()}

    @classmethod
    def from_dict(cls, d: Mapping[str, torch.Tensor | None], device: str | torch.device = "cpu") -> LinearProbe:
        on = {k: None if v is None else v.to(device) for k, v in d.items()}
        return cls(on["weight"], on["bias"], on["classes"], on["mean"], on["std"])  # type: ignore[arg-type]


def average_probes(probes: Sequence[LinearProbe], weights: Sequence[float]) -> LinearProbe:
    """The data-parallel merge of probes trained on disjoint images: one linear probe whose logits
    are the `weights`-weighted mean of theirs (weight and bias averaged on raw features, where
    the shards' different standardisations cancel). Every probe must cover the same classes."""
    folded = [p.folded() for p in probes]
    if any(not torch.equal(f.classes.cpu(), folded[0].classes.cpu()) for f in folded):
        raise ValueError("probes to average must cover the same classes (sharded runs train with the torch trainer)")
    w = torch.as_tensor(list(weights), dtype=torch.float64)
    w = (w / w.sum()).tolist()
    weight = sum(wi * f.weight.double() for wi, f in zip(w, folded))
    bias = sum(wi * f.bias.double() for wi, f in zip(w, folded))
    return LinearProbe(weight.float(), bias.float(), folded[0].classes)  # type: ignore[union-attr]


class _Group:
    """Stages of one width, grid and target set, trained as one stacked problem.

    weight[t]: [S, dim, classes], bias[t]: [S, 1, classes]. Adam is elementwise and the loss is a
    sum of per-stage losses, so stacking is exactly S independent probes, in a few large batched
    matmuls instead of S small ones (the per-step launch overhead of 57 separate probes made the
    probe updates CPU bound on an H200).
    """

    def __init__(self, specs: Sequence[ProbeSpec], gen: torch.Generator, device: torch.device) -> None:
        self.stages = [s.stage for s in specs]
        self.slot = {name: i for i, name in enumerate(self.stages)}
        first = specs[0]
        self.dim, self.grid, self.targets = first.dim, first.grid, first.targets
        bound = 1.0 / math.sqrt(self.dim)  # nn.Linear's default init range, drawn on CPU: same probes on any device
        shapes = {t: (len(specs), self.dim, n_classes(t, self.grid)) for t in self.targets}
        self.weight = {t: nn.Parameter(torch.empty(shape).uniform_(-bound, bound, generator=gen).to(device))
                       for t, shape in shapes.items()}
        self.bias = {t: nn.Parameter(torch.zeros(s, 1, c, device=device)) for t, (s, _, c) in shapes.items()}
        self.mean: torch.Tensor | None = None  # [S, 1, dim]
        self.std: torch.Tensor | None = None

    def parameters(self) -> list[nn.Parameter]:
        return [*self.weight.values(), *self.bias.values()]


class TorchProbes:
    """Streaming probes for many stages: `fit(batch)` takes one batch of every stage's tokens.

    Stages of the same width and grid are stacked into one group (`_Group`); a batch must hold
    every stage of a group it touches, with the same number of tokens (true for what the
    experiment captures: all LLM stages see the same visual tokens, all ViT stages the same patches).
    """

    def __init__(
        self,
        specs: Sequence[ProbeSpec],
        *,
        lr: float = 1e-3,
        lr_ref_dim: int | None = None,
        weight_decay: float = 0.0,
        minibatch: int = 1024,
        standardize: bool = True,
        device: str | torch.device = "cpu",
        seed: int = 0,
        bf16_matmul: bool = False,
    ) -> None:
        self.specs = {s.stage: s for s in specs}
        self.lr_ref_dim = lr_ref_dim
        self.minibatch = int(minibatch)
        self.standardize = bool(standardize)
        self.device = torch.device(device)
        gen = torch.Generator().manual_seed(int(seed))
        # Minibatch order drawn on the probes' device: a CPU permutation copied over would make
        # every step wait for the GPU queue to drain (pageable host-to-device copies synchronise).
        self.order_gen = torch.Generator(device=self.device).manual_seed(int(seed))
        # bf16 autocast of the probe matmuls (CUDA only): weights, Adam state and the loss stay fp32.
        self.bf16_matmul = bool(bf16_matmul) and self.device.type == "cuda"
        by_key: dict[tuple[int, int, tuple[str, ...]], list[ProbeSpec]] = {}
        for s in specs:
            by_key.setdefault((s.dim, s.grid, tuple(s.targets)), []).append(s)
        self.groups = [_Group(g, gen, self.device) for g in by_key.values()]
        self.group_of = {name: g for g in self.groups for name in g.stages}
        # fused Adam on CUDA: one kernel per step for all of a group's parameters
        self.opts = [torch.optim.Adam(g.parameters(), lr=self.stage_lr(lr, g.dim), weight_decay=float(weight_decay),
                                      fused=(self.device.type == "cuda") or None) for g in self.groups]

    def stage_lr(self, lr: float, dim: int) -> float:
        """lr x sqrt(lr_ref_dim / dim): with standardised features one Adam step moves a logit by
        about lr x sum|x|, which grows with dim, so wide stages take smaller steps."""
        return float(lr) if self.lr_ref_dim is None else float(lr) * math.sqrt(self.lr_ref_dim / dim)

    def set_lr(self, lr: float) -> None:
        """Set every stage's learning rate (the experiment's per-epoch schedule), dim-scaled as at init."""
        for g, opt in zip(self.groups, self.opts):
            for group in opt.param_groups:
                group["lr"] = self.stage_lr(lr, g.dim)

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        if t.device == self.device:
            return t
        if self.device.type == "cuda" and t.device.type == "cpu":
            return t.pin_memory().to(self.device, non_blocking=True)  # no wait for the GPU queue
        return t.to(self.device)

    def _set_stats(self, g: _Group, xs: Sequence[torch.Tensor]) -> None:
        """The first batch a group sees fixes its per-stage mean / std [S, 1, dim] (one stage at a
        time in fp32: stacking them all would cost S x n x dim x 4 bytes, 5 GB for LLaVA-7B)."""
        mean = torch.stack([x.float().mean(0, keepdim=True) for x in xs])
        std = torch.stack([x.float().std(0, keepdim=True) if len(x) > 1 else torch.ones_like(x[:1], dtype=torch.float32)
                           for x in xs])
        g.mean, g.std = mean, std.clamp_min(1e-6)

    def _standardise(self, g: _Group, x: torch.Tensor) -> torch.Tensor:
        """[S, m, dim] any dtype -> float32, z-scored with the group's frozen per-stage statistics."""
        return (x.float() - g.mean) / g.std if self.standardize else x.float()

    def fit(self, batch: Mapping[str, StageData]) -> dict[str, torch.Tensor]:
        """One pass of minibatch Adam steps over this batch for every stage in it.

        Returns each stage's mean loss as a 0-d tensor on the probes' device: converting to float
        here would wait for the GPU and keep the CPU from preparing the next batch meanwhile.
        """
        losses: dict[str, torch.Tensor] = {}
        for g, opt in zip(self.groups, self.opts):
            present = [name for name in g.stages if name in batch]
            if not present:
                continue
            if len(present) != len(g.stages):
                raise ValueError(f"a batch must hold all of {g.stages} or none (got {present})")
            xs = [self._to_device(batch[name][0]) for name in g.stages]
            n = len(xs[0])
            if any(len(x) != n for x in xs):
                raise ValueError(f"stages {g.stages} must have the same number of tokens in a batch")
            pos = torch.stack([self._to_device(batch[name][1]) for name in g.stages])  # [S, n]
            ys = {t: labels(t, pos, g.grid) for t in g.targets}
            if g.mean is None and self.standardize:
                self._set_stats(g, xs)
            order = torch.randperm(n, generator=self.order_gen, device=self.device)
            total = torch.zeros(len(g.stages), device=self.device)
            chunks = order.split(self.minibatch)
            with torch.enable_grad():
                for idx in chunks:
                    xb = self._standardise(g, torch.stack([x[idx] for x in xs]))  # [S, m, dim]
                    with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16_matmul):
                        per_stage = sum(
                            nn.functional.cross_entropy(
                                torch.baddbmm(g.bias[t], xb, g.weight[t]).flatten(0, 1).float(),
                                ys[t][:, idx].flatten(), reduction="none",
                            ).view(len(g.stages), -1).mean(1)
                            for t in g.targets
                        )
                    opt.zero_grad(set_to_none=True)
                    per_stage.sum().backward()  # sum over stages: each slice gets its own stage's gradient
                    opt.step()
                    total += per_stage.detach()  # no .item() per step: it would sync the GPU every step
            for name, value in zip(g.stages, total / max(len(chunks), 1)):
                losses[name] = value
        return losses

    def export(self) -> dict[tuple[str, str], LinearProbe]:
        """Every (stage, target)'s probe as a `LinearProbe` (on the probes' device)."""
        out = {}
        for g in self.groups:
            for stage, i in g.slot.items():
                for t in g.targets:
                    stats = (g.mean[i, 0], g.std[i, 0]) if self.standardize and g.mean is not None else (None, None)
                    c = g.weight[t].shape[-1]
                    out[stage, t] = LinearProbe(g.weight[t][i].detach(), g.bias[t][i, 0].detach(),
                                                torch.arange(c, device=self.device), *stats)
        return out

    def predict(self, stage: str, x: torch.Tensor) -> dict[str, np.ndarray]:
        """{target: [n] predicted class ids} for one stage's tokens x [n, dim]."""
        probes = self.export()
        return {t: probes[stage, t].predict(x, bf16_matmul=self.bf16_matmul) for t in self.specs[stage].targets}

    def n_parameters(self) -> int:
        return sum(p.numel() for g in self.groups for p in g.parameters())


class SklearnProbes:
    """Full-batch probes: `fit(data)` gets all training tokens of every stage at once."""

    def __init__(
        self, specs: Sequence[ProbeSpec], *, C: float = 1.0, max_iter: int = 300, standardize: bool = True
    ) -> None:
        self.specs = {s.stage: s for s in specs}
        self.C, self.max_iter, self.standardize = float(C), int(max_iter), bool(standardize)
        self.models: dict[tuple[str, str], object] = {}

    def fit(self, data: Mapping[str, StageData]) -> None:
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler
        from threadpoolctl import threadpool_limits

        for stage, (x, pos) in data.items():
            spec = self.specs[stage]
            xn = x.float().cpu().numpy()
            for t in spec.targets:
                y = labels(t, pos.cpu(), spec.grid).numpy()
                clf = LogisticRegression(C=self.C, max_iter=self.max_iter)
                model = make_pipeline(StandardScaler(), clf) if self.standardize else clf
                # One BLAS / OpenMP thread: these problems are small (the auto rule), and threads
                # spinning on a busy CPU made lbfgs 8x slower on a shared 2-core machine.
                with threadpool_limits(limits=1):
                    self.models[stage, t] = model.fit(xn, y)

    def predict(self, stage: str, x: torch.Tensor) -> dict[str, np.ndarray]:
        xn = x.float().cpu().numpy()
        models = self.models
        return {t: np.asarray(models[stage, t].predict(xn)) for t in self.specs[stage].targets}  # type: ignore[attr-defined]

    def export(self) -> dict[tuple[str, str], LinearProbe]:
        """Every (stage, target)'s fitted model as a `LinearProbe` with sklearn's decision rule:
        argmax of the decision function over the classes seen (two classes: column 1 wins when
        its decision value is positive, as `LogisticRegression.predict`)."""
        out = {}
        for key, model in self.models.items():
            steps = getattr(model, "steps", None)
            scaler, clf = (steps[0][1], steps[-1][1]) if steps else (None, model)
            coef = torch.as_tensor(clf.coef_, dtype=torch.float64).T  # [dim, C] or [dim, 1]
            bias = torch.as_tensor(clf.intercept_, dtype=torch.float64)
            if coef.shape[1] == 1:  # binary: logits (0, decision)
                coef, bias = torch.cat([torch.zeros_like(coef), coef], 1), torch.cat([torch.zeros_like(bias), bias])
            stats = (None, None) if scaler is None else (
                torch.as_tensor(scaler.mean_, dtype=torch.float64), torch.as_tensor(scaler.scale_, dtype=torch.float64))
            out[key] = LinearProbe(coef, bias, torch.as_tensor(clf.classes_, dtype=torch.long), *stats)
        return out


def choose_trainer(
    trainer: str, n_train_tokens: int, max_classes: int, *, max_tokens: int, max_class_count: int
) -> str:
    """The rule for `probe.trainer=auto`: sklearn only for small problems, torch otherwise.

    sklearn when the training set has at most `max_tokens` tokens per stage and every probe at
    most `max_class_count` classes (lbfgs then converges in seconds per stage on a CPU); the
    paper's joint-position targets (256-1024 classes) therefore always stream through torch.
    """
    if trainer not in TRAINERS:
        raise ValueError(f"probe.trainer must be one of {TRAINERS}, got {trainer!r}")
    if trainer != "auto":
        return trainer
    return "sklearn" if n_train_tokens <= max_tokens and max_classes <= max_class_count else "torch"


def epoch_lr(lr: float, epoch: int, epochs: int, schedule: str) -> float:
    """Learning rate of epoch `epoch` (0-based): constant, or cosine from lr down towards 0."""
    if schedule == "constant":
        return float(lr)
    if schedule == "cosine":
        return float(lr) * 0.5 * (1.0 + math.cos(math.pi * epoch / max(epochs, 1)))
    raise ValueError(f"probe.lr_schedule must be constant or cosine, got {schedule!r}")


class PositionScores:
    """Correct / total counts per (stage, target, view, grid position) over the test tokens."""

    def __init__(self, specs: Iterable[ProbeSpec]) -> None:
        self.grid = {s.stage: s.grid for s in specs}
        self.counts: dict[tuple[str, str, str], np.ndarray] = {}  # -> [2, G*G]: correct, total

    def update(self, stage: str, target: str, view: np.ndarray, pos: np.ndarray, correct: np.ndarray) -> None:
        """view [n] str, pos [n] flat grid positions, correct [n] bool."""
        g2 = self.grid[stage] ** 2
        for v in np.unique(view):
            sel = view == v
            c = self.counts.setdefault((stage, target, str(v)), np.zeros((2, g2), dtype=np.int64))
            c[0] += np.bincount(pos[sel], weights=correct[sel], minlength=g2).astype(np.int64)
            c[1] += np.bincount(pos[sel], minlength=g2)

    def add_predictions(self, stage: str, view: np.ndarray, pos: np.ndarray, preds: Mapping[str, np.ndarray]) -> None:
        """Score one batch of a stage's predictions ({target: [n]}); row+col adds "row_col"."""
        grid = self.grid[stage]
        p = torch.as_tensor(pos)
        ok = {t: pred == labels(t, p, grid).numpy() for t, pred in preds.items()}
        if {"row", "col"} <= ok.keys():
            ok["row_col"] = ok["row"] & ok["col"]
        for t, correct in ok.items():
            self.update(stage, t, view, pos, correct)

    def views(self) -> list[str]:
        return sorted({v for _, _, v in self.counts})

    def per_position(self) -> pd.DataFrame:
        """Tidy per-position table: stage, target, view (incl. "all"), row, col, n, correct, accuracy
        (`vlmloc.reports.position_probe.position_grid` lays one probe's rows out as its grid)."""
        rows = []
        for (stage, target), by_view in self._with_all().items():
            g = self.grid[stage]
            r, c = np.divmod(np.arange(g * g), g)
            for view, (correct, total) in by_view.items():
                with np.errstate(invalid="ignore", divide="ignore"):
                    acc = np.where(total > 0, correct / np.maximum(total, 1), np.nan)
                rows.append(pd.DataFrame({
                    "stage": stage, "target": target, "view": view, "row": r, "col": c,
                    "n": total, "correct": correct, "accuracy": acc,
                }))
        return pd.concat(rows, ignore_index=True) if rows else pd.DataFrame()

    def accuracy(self) -> pd.DataFrame:
        """stage, target, view, accuracy, n_test_tokens."""
        rows = []
        for (stage, target), by_view in self._with_all().items():
            for view, (correct, total) in by_view.items():
                n = int(total.sum())
                rows.append({"stage": stage, "target": target, "view": view,
                             "accuracy": float(correct.sum() / n) if n else float("nan"), "n_test_tokens": n})
        return pd.DataFrame(rows)

    def _with_all(self) -> dict[tuple[str, str], dict[str, np.ndarray]]:
        """{(stage, target): {view: counts}}, with "all" (every view summed) first; the per-view
        entries are kept only where a stage saw more than one view (else they repeat "all")."""
        out: dict[tuple[str, str], dict[str, np.ndarray]] = {}
        for (stage, target, view), counts in self.counts.items():
            out.setdefault((stage, target), {})[view] = counts
        for key, by_view in out.items():
            total = sum(by_view.values())
            out[key] = {"all": total, **(by_view if len(by_view) > 1 else {})}
        return out

