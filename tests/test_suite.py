"""experiment=suite (the embedded default): each run equals its own `experiment=<name>` run, one model load."""

from __future__ import annotations

import pandas as pd
import pytest

from conftest import compose_cfg
from vlmloc import app, runner
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
    """One model and one dataset load; baseline rows computed once and copied into shuffle's run;
    every run's rows equal the rows of the same experiment run alone."""
    data_dir = tmp_path / "data"
    cfg = compose_cfg("model=tiny_llava", "data=synthetic", "data.n=3", "experiment.runs=[baseline,shuffle]",
                      data_dir=data_dir)
    loads, data_loads, evaluated = [], [], []
    real, real_data, real_eval = runner.load_adapter, runner.load_samples, runner.evaluate
    monkeypatch.setattr(runner, "load_adapter", lambda c: loads.append(1) or real(c))
    monkeypatch.setattr(runner, "load_samples", lambda c: data_loads.append(1) or real_data(c))

    def counting_evaluate(adapter, samples, tasks, *, conditions, skip, **kw):
        evaluated.extend((s.sample_id, t, c.name) for s in samples for t in tasks for c in conditions
                         if (s.sample_id, t, c.name) not in skip)
        return real_eval(adapter, samples, tasks, conditions=conditions, skip=skip, **kw)

    monkeypatch.setattr(runner, "evaluate", counting_evaluate)
    app.run(cfg, tmp_path / "suite")
    assert len(loads) == 1 and len(data_loads) == 1
    assert sorted(k for k in evaluated if k[2] == "baseline") == sorted(
        (s, t, "baseline") for s in pd.read_parquet(tmp_path / "suite" / "baseline" / "results.parquet")["sample_id"].unique()
        for t in ("classification", "localization"))
    assert len(evaluated) == len(set(evaluated)), "a row was computed twice"
    monkeypatch.setattr(runner, "evaluate", real_eval)
    for name in ("baseline", "shuffle"):
        alone = tmp_path / f"alone-{name}"
        app.run(compose_cfg(f"experiment={name}", "model=tiny_llava", "data=synthetic", "data.n=3", data_dir=data_dir), alone)
        cols = ["sample_id", "task", "condition", "answer", "p_yes", "iou"]
        a = pd.read_parquet(tmp_path / "suite" / name / "results.parquet")[cols].sort_values(cols[:3]).reset_index(drop=True)
        b = pd.read_parquet(alone / "results.parquet")[cols].sort_values(cols[:3]).reset_index(drop=True)
        pd.testing.assert_frame_equal(a, b)
    summary = (tmp_path / "suite" / "summary.md").read_text()
    assert "## baseline" in summary and "## shuffle" in summary and "shuffle:global" in summary


def test_a_run_keeps_its_experiments_own_defaults_and_the_commands_choices():
    """make_pairs' file picks inpaint=opencv in its defaults list; a value this command set wins."""
    plain = run_config(compose_cfg("model=tiny_llava", "data=synthetic"), "make_pairs")
    assert plain.inpaint.backend == "opencv" and plain.experiment.name == "make_pairs"
    assert "inpaint" not in compose_cfg("model=tiny_llava")  # the suite itself has no inpainter
    chosen = run_config(compose_cfg("model=tiny_llava", "data=synthetic", "inpaint=oracle", "seed=3"), "make_pairs")
    assert chosen.inpaint.backend == "oracle" and chosen.seed == 3 and chosen.model.name == "tiny_llava"
