"""experiment=report: the paper report rebuilt from finished runs alone, its numbers equal to the runs'
parquet (computed here independently with pandas), no model or data loaded, bad run dirs refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf

from conftest import compose_cfg
from vlmloc import app, runner
from vlmloc.errors import ConfigError
from vlmloc.experiments.report import settings
from vlmloc.reports.paper_report import FINDINGS_FILE, REPORT_HTML, REPORT_MD, TABLES_FILE, write_report
from vlmloc.reports.runs import load_runs

GOLDEN = Path(__file__).parent / "golden"
SYN = ("data=synthetic", "data.synthetic.n_images=6")


def _forbid_model_and_data(monkeypatch) -> None:
    def refuse(*_a, **_k):
        raise AssertionError("the report loaded a model or data")

    monkeypatch.setattr(runner, "load_adapter", refuse)
    monkeypatch.setattr(runner, "load_samples", refuse)


def _scores(results: pd.DataFrame) -> pd.DataFrame:
    """Per row: the paper's accuracy share in % (localization: mean hit over 3 thresholds), by hand."""
    df = results.copy()
    hits = df[["hit_50", "hit_70", "hit_90"]].astype("boolean").fillna(False).astype(float).mean(axis=1) * 100
    df["score"] = np.where(df["task"] == "localization", hits, df["correct"].astype(float) * 100)
    return df


@pytest.fixture(scope="module")
def demo_runs(tmp_path_factory) -> Path:
    """Two small real runs on demo_llava: token ablation (object vs random tokens) and shuffle."""
    out = tmp_path_factory.mktemp("report_runs")
    common = ("model=demo_llava", *SYN, "data.n=3", f"paths.cache_dir={out / 'cache'}")
    app.run(compose_cfg("experiment=token_ablation", *common, "experiment.strategies=[object,random]",
                        "experiment.pads=[0]", "mean_embedding.n_images=2", data_dir=out / "data"), out / "token_ablation")
    app.run(compose_cfg("experiment=shuffle", *common, data_dir=out / "data"), out / "shuffle")
    return out


def test_report_numbers_equal_the_runs_parquet(demo_runs, tmp_path, monkeypatch):
    _forbid_model_and_data(monkeypatch)
    runs = [str(demo_runs / "token_ablation"), str(demo_runs / "shuffle")]
    cfg = compose_cfg("experiment=report", f"runs=[{','.join(runs)}]", "experiment.bootstrap.resamples=300")
    app.run(cfg, tmp_path / "report")
    tables = pd.read_parquet(tmp_path / "report" / TABLES_FILE)
    for exp in ("token_ablation", "shuffle"):
        scores = _scores(pd.read_parquet(demo_runs / exp / "results.parquet"))
        acc = scores.groupby(["condition", "task"])["score"].mean()
        wide = scores.pivot_table(index=["task", "sample_id"], columns="condition", values="score")
        got = tables[tables["section"] == exp].set_index(["condition", "task"])
        assert len(got) == len(acc) and set(got.index) == set(acc.index)
        for (cond, task), value in acc.items():
            row = got.loc[(cond, task)]
            assert row["accuracy"] == pytest.approx(value) and row["n"] == 3
            assert row["acc_low"] <= row["accuracy"] <= row["acc_high"]
            if cond != "baseline":
                delta = (wide.loc[task][cond] - wide.loc[task]["baseline"]).mean()
                assert row["delta"] == pytest.approx(delta)
                assert row["delta_low"] <= row["delta"] <= row["delta_high"]
    found = pd.read_parquet(tmp_path / "report" / FINDINGS_FILE).set_index(["section", "task"])
    ta = _scores(pd.read_parquet(demo_runs / "token_ablation" / "results.parquet"))
    loc = ta[ta["task"] == "localization"].pivot_table(index="sample_id", columns="condition", values="score")
    gap = found.loc[("token_ablation", "localization")]
    assert gap["value"] == pytest.approx((loc["object_tokens"] - loc["random_tokens"]).mean())
    assert gap["verdict"] == ("holds" if gap["high"] < 0 else "does not hold")
    md = (tmp_path / "report" / REPORT_MD).read_text()
    assert "## Token ablation (Table 1)" in md and "## Shuffle (Table 2)" in md and "### Provenance" in md
    assert f"{acc[('shuffle:global', 'localization')]:.2f}" in md and "transformers" in md
    page = (tmp_path / "report" / REPORT_HTML).read_text()
    assert page.count("data:image/png;base64,") == 2 and "src=\"figures" not in page


def _golden_run(tmp_path: Path, name: str, *overrides: str) -> Path:
    """A golden record's parquet files with a run.json of the config that made them (tests/test_golden.py)."""
    run = tmp_path / name
    shutil.copytree(GOLDEN / name, run)
    cfg = OmegaConf.to_container(compose_cfg(*overrides), resolve=True)
    (run / "run.json").write_text(json.dumps({"config": cfg, "model_id": "m", "wall_time_total_s": 1.0,
                                              "data": {"n_samples": 3}, "versions": {"transformers": "5.24.0"}}))
    return run


def test_report_of_circuit_runs_equals_their_parquet(tmp_path, monkeypatch):
    _forbid_model_and_data(monkeypatch)
    cma = _golden_run(tmp_path, "cma-demo_llava", "experiment=cma", "model=demo_llava", "data=pairs", "data.pairs_dir=/x")
    ext = _golden_run(tmp_path, "extension-demo_llava", "experiment=extension", "model=demo_llava", *SYN)
    probe = _golden_run(tmp_path, "position_probe-tiny_llava", "experiment=position_probe", "model=tiny_llava", *SYN)
    view = _golden_run(tmp_path, "view_ablation-tiny_internvl", "experiment=view_ablation", "model=tiny_internvl", *SYN)
    opts = settings(compose_cfg("experiment=report", "runs=[x]", "experiment.bootstrap.resamples=200")).options()
    write_report(load_runs([cma, ext, probe, view]), tmp_path / "out", opts)
    tables = pd.read_parquet(tmp_path / "out" / TABLES_FILE)
    mf = pd.read_parquet(cma / "mf.parquet")
    means = mf[mf["valid"] & mf["mf"].notna()].groupby(["task", "layer", "head"])["mf"].mean().reset_index()
    top = tables[(tables["section"] == "cma") & tables["rank"].notna()]
    for task, sub in top.groupby("task"):
        want = means[means["task"] == task].sort_values(["mf", "layer", "head"], ascending=[False, True, True]).head(10)
        assert sub["layer"].astype(int).tolist() == want["layer"].tolist() and sub["head"].astype(int).tolist() == want["head"].tolist()
        np.testing.assert_allclose(sub["mean_mf"], want["mf"])
    crit = tables[(tables["section"] == "cma") & tables["critical_heads"].notna()]
    for r in crit.itertuples():
        t = means[means["task"] == r.task]
        assert r.critical_heads == (t["mf"] >= r.mf_threshold).sum() and r.low <= r.critical_heads <= r.high
    assert sorted(crit["mf_threshold"].unique()) == sorted(opts.critical_mf)
    # extension: the matrix cell (p, q) equals extension_matrix's (the experiment's own report)
    from vlmloc.reports.extension import extension_matrix

    rows = pd.read_parquet(ext / "results.parquet")
    want = extension_matrix(rows, [0, 1, 2], {0: "baseline", 1: "extension:p=1", 2: "extension:p=2"}).set_index("pad")
    got = tables[tables["section"] == "extension"]
    for r in got.itertuples():
        assert r.accuracy == pytest.approx(want.loc[int(r.pad), f"q={int(r.gt_grown_by)}"])
    acc = pd.read_parquet(probe / "probe_accuracy.parquet")
    np.testing.assert_allclose(tables[tables["section"] == "position_probe"]["accuracy"], acc.sort_values("stage_index")["accuracy"])
    v = _scores(pd.read_parquet(view / "results.parquet"))
    v = v[v["has_thumbnail"]]
    vt = tables[(tables["section"] == "view_ablation") & tables["size_bin"].isna()].set_index(["condition", "task"])
    for (cond, task), value in v.groupby(["condition", "task"])["score"].mean().items():
        assert vt.loc[(cond, task), "accuracy"] == pytest.approx(value)
    found = pd.read_parquet(tmp_path / "out" / FINDINGS_FILE)
    assert set(found["section"]) == {"cma", "extension", "position_probe", "view_ablation"}
    assert set(found["verdict"]) <= {"holds", "does not hold", "not measured"}


def test_runs_of_two_models_are_reported_side_by_side(tmp_path):
    a = _golden_run(tmp_path, "knockout-demo_llava", "experiment=knockout", "model=demo_llava", *SYN)
    b = _golden_run(tmp_path, "knockout-tiny_internvl", "experiment=knockout", "model=tiny_internvl", *SYN)
    opts = settings(compose_cfg("experiment=report", "runs=[x]", "experiment.bootstrap.resamples=100")).options()
    md = write_report(load_runs([a, b]), tmp_path / "out", opts)
    tables = pd.read_parquet(tmp_path / "out" / TABLES_FILE)
    assert set(tables["model"]) == {"demo_llava", "tiny_internvl"} and md.count("## Attention knockout") == 1


def test_bad_run_directories_are_refused_naming_them(tmp_path, demo_runs):
    with pytest.raises(ConfigError, match="no-such-dir"):
        load_runs([tmp_path / "no-such-dir"])
    unfinished = tmp_path / "unfinished"
    shutil.copytree(demo_runs / "shuffle", unfinished)
    (unfinished / "run.json").unlink()
    with pytest.raises(ConfigError, match=f"{unfinished}.*not a finished run"):
        load_runs([unfinished])
    locked = tmp_path / "locked"
    shutil.copytree(demo_runs / "shuffle", locked)
    (locked / "run.lock").write_text("{}")
    with pytest.raises(ConfigError, match="being written"):
        load_runs([locked])
    with pytest.raises(ConfigError, match="runs=\\["):
        app.run(compose_cfg("experiment=report"), tmp_path / "r")
    assert [r.experiment for r in load_runs([demo_runs])] == ["shuffle", "token_ablation"]  # a folder of runs


@pytest.mark.parametrize("override, message", [
    ("experiment.bootstrap.level=1.5", "experiment.bootstrap.level must lie strictly between 0 and 1, got 1.5"),
    ("+experiment.bootstrap.resample=10", "experiment.bootstrap.resample: Key 'resample' not in 'BootstrapSettings'"),
    ("experiment.bootstrap.resamples=0", "experiment.bootstrap.resamples must be >= 1, got 0"),
    ("experiment.probe_mid_band=[0.9,0.1]", "experiment.probe_mid_band must be [low, high]"),
    ("experiment.critical_mf=[]", "experiment.critical_mf must list one or more"),
])
def test_bad_report_settings_are_refused_naming_their_key(override, message):
    from vlmloc.experiments import report
    from vlmloc.settings import check_experiment

    with pytest.raises(ConfigError) as err:
        check_experiment(report, compose_cfg("experiment=report", "runs=[x]", override))
    assert message in str(err.value)
    st = settings(compose_cfg("experiment=report", "runs=[x]"))
    assert st.options().boot.resamples == 2000 and st.options().critical_mf == (0.05, 0.1, 0.2, 0.5)


def test_accuracy_figure_is_drawn_once_per_condition_and_skips_split_tables():
    """A table with one row per (model, task, condition) gets a PNG; one that splits a condition
    over rows (view ablation by object size) gets none instead of mismatched points."""
    from vlmloc.reports.report_figures import accuracy_figure

    one = pd.DataFrame({"model": "m", "task": "localization", "condition": ["baseline", "object_tokens"],
                        "accuracy": [80.0, 10.0], "acc_low": [70.0, 5.0], "acc_high": [90.0, 15.0]})
    assert accuracy_figure(one, "t")[:8] == b"\x89PNG\r\n\x1a\n"
    split = pd.concat([one.assign(size_bin="small"), one.assign(size_bin="large")], ignore_index=True)
    assert accuracy_figure(split, "t") is None
