"""One report section per experiment: the paper-layout table (ours, 95 % interval, the paper's value,
the difference) and the findings, from each run's parquet rows alone; several models stacked.

    section = build(runs_of_one_experiment, opts)   # Section(title, tables, findings, ...)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import pandas as pd

from vlmloc.reports import findings as F
from vlmloc.reports.bootstrap import Bootstrap, mean_ci
from vlmloc.reports.heads import critical_counts, head_interval, head_means, top_heads
from vlmloc.reports.paper_values import NOT_STATED, PaperValues
from vlmloc.reports.paraphrases import DEFAULT, accuracy_by_wording
from vlmloc.reports.runs import Run
from vlmloc.reports.scores import BASELINE, ci_table, condition_order, with_paper_columns

# experiment -> (title, the paper's table whose numbers it compares, order in the report)
TITLES = {
    "baseline": ("Baseline accuracy (Table 1, first row)", "table1"),
    "token_ablation": ("Token ablation (Table 1)", "table1"),
    "shuffle": ("Shuffle (Table 2)", "table2"),
    "extension": ("Object extension (Fig. 1, 8, 9)", None),
    "view_ablation": ("View ablation, InternVL (Table 3, Fig. 10)", "table3"),
    "position_probe": ("Position probes (Fig. 2, 11)", None),
    "knockout": ("Attention knockout (Fig. 3, 12)", None),
    "make_pairs": ("Object-removal pairs (control set for CMA)", None),
    "cma": ("Causal mediation per head (Fig. 4, 13, 14)", None),
    "head_ablation": ("Head ablation (Fig. 5, 15)", None),
}
ORDER = list(TITLES)


@dataclass(frozen=True)
class Options:
    """The report's settings (configs/experiment/report.yaml)."""

    boot: Bootstrap
    critical_mf: tuple[float, ...]
    top_k: int
    max_shared: int
    head_ks: tuple[int, ...]
    probe_mid_band: tuple[float, float]


@dataclass
class Section:
    """A titled part of the report: tables (caption -> frame, numbers unrounded), findings, and
    what the paper says (per model)."""

    experiment: str
    title: str
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    findings: list[pd.DataFrame] = field(default_factory=list)
    paper_text: dict[str, str] = field(default_factory=dict)

    @property
    def findings_table(self) -> pd.DataFrame:
        return pd.concat(self.findings, ignore_index=True) if self.findings else F.as_frame([])


def _conditions_table(run: Run, paper: PaperValues, table: str | None, opts: Options, rows: pd.DataFrame | None = None) -> pd.DataFrame:
    results = run.table("results.parquet") if rows is None else rows
    t = ci_table(results, condition_order(results), opts.boot)
    return with_paper_columns(t, paper.rows(table) if table else None)


def _findings(run: Run, opts: Options) -> list[F.Finding]:
    exp, st = run.experiment, run.settings
    if exp == "cma":
        return F.shared_heads(run.table("mf.parquet"), opts.top_k, opts.max_shared, opts.boot)
    if exp == "position_probe":
        return F.probe_peak(run.table("probe_accuracy.parquet"), opts.probe_mid_band)
    if exp not in ("token_ablation", "shuffle", "extension", "view_ablation", "head_ablation"):
        return []
    rows = run.table("results.parquet")
    checks: dict[str, Callable[[], list[F.Finding]]] = {
        "token_ablation": lambda: F.object_vs_random(rows, opts.boot),
        "shuffle": lambda: F.shuffle_containment(rows, opts.boot),
        "extension": lambda: F.extension_diagonal(rows, st.get("scale_levels", [0, 1, 2]), opts.boot),
        "view_ablation": lambda: F.global_view(rows, opts.boot),
        "head_ablation": lambda: F.top_vs_random_heads(rows, opts.head_ks, opts.boot)
        + F.cls_heads_cost_localization(rows, opts.head_ks, opts.boot),
    }
    return checks[exp]()


def _extension_matrix(run: Run, opts: Options) -> pd.DataFrame:
    levels = [int(q) for q in run.settings.get("scale_levels", [0, 1, 2])]
    out = []
    for pad, scores in F.extension_scores(run.table("results.parquet"), levels).items():
        for q in levels:
            iv = mean_ci(scores[q].to_numpy(), opts.boot)
            out.append({"pad": pad, "gt_grown_by": q, "n": iv.n, "accuracy": iv.estimate, "acc_low": iv.low,
                        "acc_high": iv.high, "diagonal": pad == q})
    return pd.DataFrame(out)


def _view_tables(run: Run, paper: PaperValues, opts: Options) -> dict[str, pd.DataFrame]:
    multi = _rows(run)
    tables = {"images with a thumbnail, all object sizes": _conditions_table(run, paper, "table3", opts, multi)}
    if "size_bin" in multi:
        parts = [ci_table(sub, condition_order(sub), opts.boot).assign(size_bin=b) for b, sub in multi.groupby("size_bin", sort=False)]
        if parts:
            tables["by object size (area_frac bins)"] = pd.concat(parts, ignore_index=True)
    return tables


def _cma_tables(run: Run, opts: Options) -> dict[str, pd.DataFrame]:
    mf = run.table("mf.parquet")
    positions = run.settings.get("positions")
    if positions is not None and "positions" in mf and (mf["positions"] == positions).any():
        mf = mf[mf["positions"] == positions]
    means = head_means(mf, opts.boot)
    top = [{"task": task, "rank": r + 1, "layer": h[0], "head": h[1], "mean_mf": iv.estimate, "low": iv.low,
            "high": iv.high, "pairs": iv.n}
           for task, hm in means.items() for r, h in enumerate(top_heads(hm, opts.top_k))
           for iv in [head_interval(hm, h, opts.boot.level)]]
    return {f"top {opts.top_k} heads by mean MF (interval over pairs)": pd.DataFrame(top),
            "critical heads (mean MF >= threshold) at several thresholds": critical_counts(means, opts.critical_mf, opts.boot.level)}


def _probe_table(run: Run) -> pd.DataFrame:
    acc = run.table("probe_accuracy.parquet").sort_values("stage_index")
    cols = [c for c in ("stage", "kind", "view", "target", "accuracy", "chance", "n_test_tokens") if c in acc]
    return acc[cols].reset_index(drop=True)


def _pairs_table(run: Run) -> pd.DataFrame:
    m = run.table("manifest.parquet")
    kept = m["kept"].astype("boolean").fillna(False) if "kept" in m else pd.Series(True, index=m.index)
    return pd.DataFrame([{"objects": len(m), "kept_pairs": int(kept.sum()), "images_kept": int(m.loc[kept.to_numpy(), "image_id"].nunique()),
                          "paper": "2,248 annotations across 1,720 images; CMA uses 50 pairs"}])


def tables_of(run: Run, paper: PaperValues, opts: Options) -> dict[str, pd.DataFrame]:
    """The section tables of one run (caption -> frame)."""
    exp = run.experiment
    if exp in ("baseline", "token_ablation", "shuffle", "knockout", "head_ablation"):
        table = _conditions_table(run, paper, TITLES[exp][1], opts)
        if exp == "baseline":
            table = table[table["condition"] == BASELINE].reset_index(drop=True)
        return {"accuracy per condition": table}
    if exp == "extension":
        return {"padding p x GT grown by q cells: localization accuracy": _extension_matrix(run, opts)}
    if exp == "view_ablation":
        return _view_tables(run, paper, opts)
    if exp == "cma":
        return _cma_tables(run, opts)
    if exp == "position_probe":
        return {"probe accuracy per stage (no interval: accuracy is stored per stage)": _probe_table(run)}
    return {"pairs kept": _pairs_table(run)}


WORDINGS = "accuracy under each prompt wording (model.prompts.paraphrases; mean over wordings: interval over objects)"
WORDING_FINDINGS = "findings under each prompt wording"
IMAGE_SETS = "findings by image set: verdict (value [interval])"


def _rows(run: Run) -> pd.DataFrame:
    """The result rows a run's condition table is computed from (view ablation: images with a thumbnail)."""
    rows = run.table("results.parquet")
    if run.experiment == "view_ablation" and "has_thumbnail" in rows:
        rows = rows[rows["has_thumbnail"].astype(bool)]
    return rows


def _wording_tables(run: Run, opts: Options) -> dict[str, pd.DataFrame]:
    """The run's spread over its prompt wordings and its findings under each ({} without wordings)."""
    wordings = run.wordings
    if not wordings or not run.has("results.parquet"):
        return {}
    spread = accuracy_by_wording({DEFAULT: _rows(run), **{k: _rows(w) for k, w in wordings.items()}}, opts.boot)
    verdicts: dict[tuple[str, str], dict[str, str]] = {}
    for label, r in {DEFAULT: run, **wordings}.items():
        for f in _findings(r, opts):
            verdicts.setdefault((f.statement, f.task), {})[label] = f.verdict
    found = pd.DataFrame([{"statement": s, "task": t, **{k if k == DEFAULT else f"wording_{k}": v for k, v in by.items()},
                           "holds": f"{sum(v == F.HOLDS for v in by.values())} of {len(by)}"}
                          for (s, t), by in verdicts.items()])
    return {WORDINGS: spread, **({WORDING_FINDINGS: found} if len(found) else {})}


def _by_image_set(findings: pd.DataFrame) -> pd.DataFrame:
    """Findings side by side per image set: one row per model x statement x task, a column per data."""
    cell = [f"{v} ({x:.1f} [{lo:.1f}, {hi:.1f}])" for v, x, lo, hi in
            zip(findings["verdict"], findings["value"], findings["low"], findings["high"])]
    wide = findings.assign(cell=cell).pivot_table(index=["model", "statement", "task"], columns="data", values="cell",
                                                  aggfunc="first", sort=False)
    return wide.reset_index().rename_axis(columns=None)


def _stack(section: Section, caption: str, table: pd.DataFrame, run: Run) -> None:
    table = table.copy()
    table.insert(0, "model", run.model)
    table.insert(1, "data", run.image_set)
    prev = section.tables.get(caption)
    section.tables[caption] = table if prev is None else pd.concat([prev, table], ignore_index=True)


def build(runs: Sequence[Run], papers: dict[str, PaperValues], opts: Options) -> Section:
    """The section of one experiment over its runs (one per model and image set), tables stacked with
    model and data columns; a run's prompt wordings (`vlmloc.paraphrases`) add their spread and findings;
    findings on several image sets are also set side by side."""
    exp = runs[0].experiment
    section = Section(exp, TITLES[exp][0])
    for run in runs:
        paper = papers[run.model]
        for caption, table in {**tables_of(run, paper, opts), **_wording_tables(run, opts)}.items():
            _stack(section, caption, table, run)
        found = F.as_frame(_findings(run, opts))
        if len(found):
            found.insert(0, "model", run.model)
            found.insert(1, "data", run.image_set)
            section.findings.append(found)
        text = paper.finding_text(exp)
        table = TITLES[exp][1]
        if text == NOT_STATED and table and paper.rows(table):
            text = f"numbers in the table above ({paper.source(table)})"
        section.paper_text[run.model] = text
    if len({r.image_set for r in runs}) > 1 and section.findings:
        section.tables[IMAGE_SETS] = _by_image_set(section.findings_table)
    return section
