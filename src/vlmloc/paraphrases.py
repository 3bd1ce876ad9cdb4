"""Prompt paraphrases: an experiment's conditions rerun under other wordings of its questions, the
referee's robustness check.

    python -m vlmloc experiment=token_ablation experiment.paraphrases=all

`model.prompts.paraphrases` lists, per question (classification, localization, list), alternative
wordings of the family's default ones (configs/family/<family>.yaml); wording k is the k-th entry of
every list. With `experiment.paraphrases` set (`all`, or a list of k), the experiment first runs as
usual with the default wordings into its run directory, then once per wording k into
`<run dir>/paraphrases/<k>/` with `model.prompts.<question>` set to wording k and every other value
the same, sharing the loaded model and data. Each is an ordinary run: its own config.json (which
records the wording it asked), resumable, sharded like the main run. When every wording's rows are
there, `paraphrases.md` in the run directory gives each condition's accuracy under every wording
(`vlmloc.reports.paraphrases`); the paper report adds the spread's interval and the findings per
wording. `experiment.paraphrases` and the catalogue `model.prompts.paraphrases` are left out of the
run's fingerprint (`vlmloc.rundir`): neither changes the default wording's numbers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf

from vlmloc.errors import ConfigError

log = logging.getLogger("vlmloc.paraphrases")

QUESTIONS = ("classification", "localization", "list")  # the keys of model.prompts a wording replaces
SUBDIR = "paraphrases"
SUMMARY = "paraphrases.md"


@dataclass(frozen=True)
class Paraphrased:
    """The field every experiment with a results table takes (its Settings subclass this):
    experiment.paraphrases = null (the default wordings only), all, or a list of wording indices."""

    paraphrases: Any = MISSING


def n_wordings(model_cfg: DictConfig) -> int:
    """How many alternative wordings `model.prompts.paraphrases` holds (every question the same number)."""
    catalogue = (model_cfg.get("prompts") or {}).get("paraphrases")
    if not catalogue:
        raise ConfigError(f"model={model_cfg.name} has no model.prompts.paraphrases: list alternative wordings of "
                          f"{list(QUESTIONS)} to run experiment.paraphrases")
    counts = {q: len(catalogue.get(q) or []) for q in QUESTIONS}
    if len(set(counts.values())) != 1 or not min(counts.values()):
        raise ConfigError(f"model.prompts.paraphrases must give every question {list(QUESTIONS)} the same number "
                          f"(>= 1) of wordings: wording k is the k-th of each; got {counts}")
    for q in QUESTIONS:
        for k, text in enumerate(catalogue[q]):
            if q != "list" and "{category}" not in str(text):
                raise ConfigError(f"model.prompts.paraphrases.{q}[{k}] = {text!r} lacks {{category}}")
    return counts["classification"]


def chosen(cfg: DictConfig) -> list[int]:
    """The wording indices `experiment.paraphrases` asks for ([] when null); checked against the model's."""
    value = cfg.experiment.get("paraphrases")
    if value is None:
        return []
    n = n_wordings(cfg.model)
    if isinstance(value, str):
        if value != "all":
            raise ConfigError(f"experiment.paraphrases must be null, all or a list of wording indices, got {value!r}")
        return list(range(n))
    picks = list(value) if OmegaConf.is_list(value) or isinstance(value, (list, tuple)) else [value]
    bad = [k for k in picks if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < n]
    if not picks or bad or len(set(picks)) != len(picks):
        raise ConfigError(f"experiment.paraphrases: indices must be distinct integers in 0..{n - 1} "
                          f"(model={cfg.model.name} has {n} wordings), got {list(picks)}")
    return picks


def wording_config(cfg: DictConfig, k: int) -> DictConfig:
    """`cfg` with wording k of every question in model.prompts and no further paraphrases."""
    catalogue = cfg.model.prompts.paraphrases
    return OmegaConf.merge(cfg, {"experiment": {"paraphrases": None},
                                 "model": {"prompts": {q: str(catalogue[q][k]) for q in QUESTIONS}}})


def wording_dirs(run_dir: Path) -> dict[str, Path]:
    """Wording label -> run directory of every paraphrase run under `run_dir` (in index order)."""
    root = Path(run_dir) / SUBDIR
    dirs = [p for p in root.iterdir() if p.is_dir() and p.name.isdigit()] if root.is_dir() else []
    return {p.name: p for p in sorted(dirs, key=lambda p: int(p.name))}


def run_paraphrases(cfg: DictConfig, run_dir: Path, run_one: Callable[..., None], adapter: Callable[[], Any],
                    data: Any) -> None:
    """Run the experiment of `cfg` once per chosen wording into `<run_dir>/paraphrases/<k>/`, then
    write paraphrases.md once every wording's rows (and the main run's) are merged.

    run_one: `vlmloc.app.run`; adapter: the main run's model on first use; data: its loaded data or None."""
    picks = chosen(cfg)
    if not picks:
        return
    for k in picks:
        sub = wording_config(cfg, k)
        log.info("paraphrase %d of %s: %s", k, picks, {q: sub.model.prompts[q] for q in QUESTIONS})
        run_one(sub, Path(run_dir) / SUBDIR / str(k), adapter=lambda s=sub: adapter().with_prompts(s.model), data=data)
    from vlmloc.reports.paraphrases import accuracy_by_wording, load_wordings
    from vlmloc.reports.tables import to_markdown

    rows = load_wordings(Path(run_dir), [str(k) for k in picks])
    if rows is None:
        log.info("paraphrases: waiting for every shard to merge before writing %s", SUMMARY)
        return
    table = accuracy_by_wording(rows)
    text = to_markdown(table)
    (Path(run_dir) / SUMMARY).write_text(
        f"Accuracy (%) under the default wording and each paraphrase k (model.prompts.paraphrases; runs in "
        f"{SUBDIR}/<k>/); delta_*: change from baseline under the same wording.\n\n{text}\n")
    print(f"\nparaphrases | model={cfg.model.name} | {run_dir / SUMMARY}\n{text}")
