"""experiment=suite (the embedded default): each run equals its own `experiment=<name>` run, one model load."""

from __future__ import annotations

import pandas as pd
import pytest

from conftest import compose_cfg
from vlmloc import app
from vlmloc.experiments.suite import check_config, run_config


def test_run_configs_are_the_experiments_own_plus_overrides():
    cfg = compose_cfg("model=tiny_llava", "data=synthetic")
    own = compose_cfg("experiment=token_ablation", "model=tiny_llava", "data=synthetic")
    sub = run_config(cfg, "token_ablation")
    assert sub.experiment.name == "token_ablation"
    assert sub.experiment.integrated_gradients.steps == 8  # the suite's override
    assert own.experiment.integrated_gradients.steps == 32
    assert sub.experiment.pads == own.experiment.pads and sub.model == own.model and sub.data == own.data
    assert run_config(cfg, "shuffle").experiment == compose_cfg("experiment=shuffle").experiment


@pytest.mark.parametrize("override, message", [
    ("experiment.runs=[baseline,no_such_experiment]", "no_such_experiment"),
    ("experiment.runs=[]", "one or more"),
    ("+experiment.overrides.token_ablaton.pads=[0]", "token_ablaton"),  # a typo
])
def test_bad_suites_fail_before_any_work(override, message):
    with pytest.raises(ValueError, match=message):
        check_config(compose_cfg("model=tiny_llava", override))


def test_suite_runs_each_experiment_into_its_folder_with_one_model(tmp_path, monkeypatch):
    data_dir = tmp_path / "data"
    cfg = compose_cfg("model=tiny_llava", "data=synthetic", "data.n=3", "experiment.runs=[baseline,shuffle]",
                      data_dir=data_dir)
    loads = []
    real = app.load_adapter
    monkeypatch.setattr(app, "load_adapter", lambda c: loads.append(1) or real(c))
    app.run(cfg, tmp_path / "suite")
    assert len(loads) == 1
    for name in ("baseline", "shuffle"):
        alone = tmp_path / f"alone-{name}"
        app.run(compose_cfg(f"experiment={name}", "model=tiny_llava", "data=synthetic", "data.n=3", data_dir=data_dir), alone)
        cols = ["sample_id", "task", "condition", "answer", "p_yes", "iou"]
        a = pd.read_parquet(tmp_path / "suite" / name / "results.parquet")[cols].sort_values(cols[:3]).reset_index(drop=True)
        b = pd.read_parquet(alone / "results.parquet")[cols].sort_values(cols[:3]).reset_index(drop=True)
        pd.testing.assert_frame_equal(a, b)
    summary = (tmp_path / "suite" / "summary.md").read_text()
    assert "## baseline" in summary and "## shuffle" in summary and "shuffle:global" in summary
