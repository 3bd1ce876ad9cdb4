"""The paper report: every experiment the given finished runs cover, in the paper's layout, with
95 % bootstrap intervals, the paper's values and the findings checked, from the runs' files alone.

    write_report(load_runs([...]), out_dir, opts)

Writes into `out_dir`: report.md (figures as files under figures/), report.html (self-contained:
figures embedded as base64 PNG), report_tables.parquet (every table's numbers unrounded, one row
per table row, with its section and caption) and findings.parquet.
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from vlmloc.reports import report_figures
from vlmloc.reports.paper_values import PaperValues
from vlmloc.reports.runs import REPORT_FILES, Run
from vlmloc.reports.sections import ORDER, Options, Section, build
from vlmloc.reports.tables import to_markdown
from vlmloc.results import atomic_write

REPORT_MD, REPORT_HTML = "report.md", "report.html"
TABLES_FILE, FINDINGS_FILE = REPORT_FILES


def provenance(run: Run) -> dict[str, Any]:
    """What a section's numbers come from: the run, config, model id and revision, versions, data, time."""
    info, cfg = run.info, run.config
    versions = info.get("versions") or {}
    wall = info.get("wall_time_total_s", info.get("wall_time_s"))
    settings = {k: v for k, v in run.settings.items() if k != "name"}
    return {
        "model": run.model, "run": str(run.path), "model_id": info.get("model_id"), "revision": info.get("model_revision"),
        "data": (cfg.get("data") or {}).get("name"), "samples": (info.get("data") or {}).get("n_samples"),
        "seed": info.get("seed"), "device": info.get("device"), "dtype": info.get("dtype"),
        "git": f"{(info.get('git_commit') or '?')[:10]}{' (dirty)' if info.get('git_dirty') else ''}",
        "versions": ", ".join(f"{k} {versions.get(k)}" for k in ("vlmloc", "torch", "transformers") if versions.get(k)),
        "wall_time_s": round(float(wall), 1) if wall is not None else None,
        "settings": json.dumps(settings, sort_keys=True, default=str),
    }


def sections(runs: Sequence[Run], opts: Options) -> tuple[list[Section], dict[str, list[Run]]]:
    """One section per experiment found (the paper's order), its runs grouped by experiment."""
    papers = {m: PaperValues.for_model(m) for m in dict.fromkeys(r.model for r in runs)}
    by_exp: dict[str, list[Run]] = {}
    for run in runs:
        by_exp.setdefault(run.experiment, []).append(run)
    ordered = [e for e in ORDER if e in by_exp]
    return [build(by_exp[e], papers, opts) for e in ordered], by_exp


def _figures(section: Section) -> dict[str, bytes]:
    out = {}
    for caption, table in section.tables.items():
        png = None
        if {"condition", "accuracy", "acc_low"} <= set(table.columns):
            png = report_figures.accuracy_figure(table, f"{section.title}: {caption}")
        elif "critical_heads" in table:
            png = report_figures.critical_figure(table, f"{section.title}: {caption}")
        if png is not None:
            out[caption] = png
    return out


def _html_table(table: pd.DataFrame) -> str:
    return table.to_html(index=False, na_rep="", float_format=lambda v: f"{v:.2f}", border=0, classes="t")


def _blocks(section: Section, runs: Sequence[Run]) -> list[tuple[str, Any]]:
    """The section as (kind, content) blocks: h2, p, table, figure (caption, png), h3."""
    blocks: list[tuple[str, Any]] = [("h2", section.title)]
    blocks += [("p", f"Paper, {m}: {t}") for m, t in section.paper_text.items()]
    figures = _figures(section)
    for caption, table in section.tables.items():
        blocks += [("h3", caption), ("table", table)]
        if caption in figures:
            blocks.append(("figure", (caption, figures[caption])))
    blocks += [("h3", "Findings"), ("table", section.findings_table) if len(section.findings_table) else ("p", "none checked here")]
    blocks += [("h3", "Provenance"), ("table", pd.DataFrame([provenance(r) for r in runs]))]
    return blocks


HEAD = ("Intervals: 95 % percentile bootstrap over objects (pairs for CMA), {resamples} resamples, seed {seed}; "
        "changes from the baseline (delta, points) resample objects with their pairs kept. paper_acc / paper_delta: "
        "the paper's value where it states one (configs/paper/<model>.yaml), blank where not stated; acc_vs_paper, "
        "delta_vs_paper: ours minus the paper's. Verdicts: holds when the whole interval lies on the stated side.")


def write_report(runs: Sequence[Run], out_dir: Path, opts: Options) -> str:
    """Write the report files into `out_dir`; returns the markdown."""
    out_dir = Path(out_dir)
    secs, by_exp = sections(runs, opts)
    head = HEAD.format(resamples=opts.boot.resamples, seed=opts.boot.seed).replace("95 %", f"{opts.boot.level:.0%}")
    models = ", ".join(dict.fromkeys(r.model for r in runs))
    n_figures = 0
    md, body = [f"# Mechanisms of Object Localization in VLMs: reproduction report ({models})", "", head, ""], []
    body += [f"<h1>{html.escape(md[0][2:])}</h1>", f"<p>{html.escape(head)}</p>"]
    for sec in secs:
        for kind, content in _blocks(sec, by_exp[sec.experiment]):
            if kind in ("h2", "h3"):
                md += [("## " if kind == "h2" else "### ") + content, ""]
                body.append(f"<{kind}>{html.escape(content)}</{kind}>")
            elif kind == "p":
                md += [content, ""]
                body.append(f"<p>{html.escape(content)}</p>")
            elif kind == "table":
                md += [to_markdown(content), ""]
                body.append(_html_table(content))
            else:
                caption, png = content
                n_figures += 1
                name = f"figures/fig{n_figures:02d}-{sec.experiment}.png"
                atomic_write(out_dir / name, lambda f, b=png: f.write(b))
                md += [f"![{caption}]({name})", ""]
                body.append(f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,'
                            f'{base64.b64encode(png).decode()}"/><figcaption>{html.escape(caption)}</figcaption></figure>')
    text = "\n".join(md)
    style = "body{font-family:sans-serif;max-width:1200px;margin:auto}table.t{border-collapse:collapse;font-size:12px}" \
            "table.t td,table.t th{border:1px solid #ccc;padding:2px 6px}img{max-width:100%}"
    page = f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>vlmloc report</title><style>{style}</style></head>" \
           f"<body>{''.join(body)}</body></html>"
    atomic_write(out_dir / REPORT_MD, lambda f: f.write(text.encode("utf-8")))
    atomic_write(out_dir / REPORT_HTML, lambda f: f.write(page.encode("utf-8")))
    long = [t.assign(section=s.experiment, caption=c) for s in secs for c, t in s.tables.items()]
    pd.concat(long, ignore_index=True).astype({"model": str}).pipe(_parquet, out_dir / TABLES_FILE)
    found = [s.findings_table.assign(section=s.experiment) for s in secs if len(s.findings_table)]
    (pd.concat(found, ignore_index=True) if found else pd.DataFrame()).pipe(_parquet, out_dir / FINDINGS_FILE)
    return text


def _parquet(df: pd.DataFrame, path: Path) -> None:
    """Mixed-type columns (a caption's tables differ) as strings where they are not numbers."""
    df = df.copy()
    for col in df.columns:
        if df[col].dtype == object:
            df[col] = df[col].map(lambda v: v if v is None or isinstance(v, str) else str(v))
    atomic_write(path, lambda f: df.to_parquet(f, index=False))
