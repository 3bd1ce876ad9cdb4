"""experiment=paper end to end at CI size (experiment=paper_smoke): every run in dependency order
into its own directory, the pairs feeding CMA and CMA feeding head ablation, the report's numbers
equal to the runs' own rows, and a rerun that loads no model."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from conftest import compose_cfg
from vlmloc import app, runner
from vlmloc.errors import ConfigError

EXPECTED = ["baseline", "token_ablation", "shuffle", "extension", "knockout", "make_pairs", "cma", "head_ablation",
            "position_probe"]


def smoke(tmp_path, model: str, *extra: str):
    return compose_cfg("experiment=paper_smoke", f"model={model}", "inpaint=oracle",
                       f"paths.cache_dir={tmp_path / 'cache'}", *extra, data_dir=tmp_path / "data")


def accuracy(run_dir, condition: str, task: str) -> float:
    """The paper's accuracy from a run's rows: classification, the share correct; localization, the
    mean of the hit rates at IoU 0.5 / 0.7 / 0.9."""
    df = pd.read_parquet(run_dir / "results.parquet")
    rows = df[(df.condition == condition) & (df.task == task)]
    cols = ["correct"] if task == "classification" else ["hit_50", "hit_70", "hit_90"]
    return 100 * float(rows[cols].fillna(False).astype(float).to_numpy().mean())


def test_paper_smoke_on_demo_llava_runs_everything_and_reports_the_runs_numbers(tmp_path, monkeypatch):
    cfg = smoke(tmp_path, "demo_llava")
    run_dir = tmp_path / "paper"
    app.run(cfg, run_dir)
    for name in EXPECTED:
        assert (run_dir / name / "run.json").is_file(), name
    # LLaVA has no views: view ablation is refused by its own check, skipped and said so
    assert not (run_dir / "view_ablation").exists()
    assert "## view_ablation\n\nnot run for model=demo_llava" in (run_dir / "summary.md").read_text()
    # the dependencies point inside this run
    cma_cfg = json.loads((run_dir / "cma" / "config.json").read_text())
    assert cma_cfg["data"]["pairs_dir"] == str(run_dir / "make_pairs") and cma_cfg["data"]["n"] == 6
    ha_cfg = json.loads((run_dir / "head_ablation" / "config.json").read_text())
    assert ha_cfg["experiment"]["cma_dir"] == str(run_dir / "cma")
    assert ha_cfg["data"]["n"] == 4 and ha_cfg["experiment"]["ks"] == [1, 5]
    # the report's accuracies are the runs' own
    table = pd.read_parquet(run_dir / "report_tables.parquet")
    for exp, cond, task in [("token_ablation", "object_tokens", "localization"), ("shuffle", "shuffle:global", "classification"),
                            ("knockout", "baseline", "localization"), ("baseline", "baseline", "classification")]:
        row = table[(table.section == exp) & (table.condition == cond) & (table.task == task) & table.accuracy.notna()]
        assert len(row) == 1, (exp, cond, task)
        assert float(row["accuracy"].iloc[0]) == pytest.approx(accuracy(run_dir / exp, cond, task)), (exp, cond, task)
    assert "src=\"data:image/png;base64," in (run_dir / "report.html").read_text()  # figures embedded
    report = (run_dir / "report.md").read_text()
    assert "## " in report and "Findings" in report
    # a rerun of the finished whole does no work and loads no model, and rebuilds the same report
    before = table.copy()
    monkeypatch.setattr(runner, "load_adapter", lambda cfg: pytest.fail("a finished paper run must not load the model"))
    app.run(cfg, run_dir)
    pd.testing.assert_frame_equal(pd.read_parquet(run_dir / "report_tables.parquet"), before)


@pytest.mark.slow
def test_paper_smoke_on_demo_internvl_includes_the_view_ablation(tmp_path):
    run_dir = tmp_path / "paper"
    app.run(smoke(tmp_path, "demo_internvl"), run_dir)
    for name in EXPECTED + ["view_ablation"]:
        assert (run_dir / name / "run.json").is_file(), name
    table = pd.read_parquet(run_dir / "report_tables.parquet")
    row = table[(table.section == "view_ablation") & (table.condition == "baseline") & (table.task == "localization")
                & table.accuracy.notna()]
    assert float(row["accuracy"].iloc[0]) == pytest.approx(accuracy(run_dir / "view_ablation", "baseline", "localization"))
    assert "not run" not in (run_dir / "summary.md").read_text()
    findings = pd.read_parquet(run_dir / "findings.parquet")
    view = findings[findings.statement == "the global view carries localization in InternVL"]
    assert len(view) == 1 and view["verdict"].iloc[0] != "not measured" and int(view["n"].iloc[0]) == 4


def test_paper_settings_are_checked_before_any_run(tmp_path):
    with pytest.raises(ConfigError, match="experiment.data names \\['cmaa'\\]"):
        app.run(smoke(tmp_path, "demo_llava", "+experiment.data.cmaa.n=3"), tmp_path / "bad")
    with pytest.raises(ConfigError, match="experiment.window"):
        app.run(smoke(tmp_path, "demo_llava", "+experiment.overrides.knockout.window=0"), tmp_path / "bad2")
    assert not (tmp_path / "bad2" / "baseline").exists()
