"""Table 1 and Table 2 experiments end to end on tiny models (CPU), with resume."""

from __future__ import annotations

import pandas as pd
import pytest

from conftest import compose_cfg
from vlmloc import app, runner
from vlmloc.experiments import token_ablation

FAST = ("experiment.integrated_gradients.steps=2", "experiment.integrated_gradients.batch_size=2",
        "model.localization.max_new_tokens=8")


@pytest.mark.parametrize("model", ["tiny_llava", pytest.param("tiny_internvl", marks=pytest.mark.slow)])
def test_token_ablation_end_to_end(model, tmp_path, monkeypatch):
    cfg = compose_cfg("experiment=token_ablation", f"model={model}", "data=synthetic", "data.n=2",
                      f"paths.cache_dir={tmp_path / 'cache'}", *FAST, data_dir=tmp_path / "data")
    run_dir = tmp_path / "run"
    app.run(cfg, run_dir)
    df = pd.read_parquet(run_dir / "results.parquet")
    names = [c.name for c in token_ablation.conditions(token_ablation.settings(cfg), int(cfg.seed))]
    assert list(pd.unique(df["condition"])) == names
    assert len(df) == 2 * 2 * len(names)
    frac = df.groupby("condition")["frac_edited"].mean()
    assert frac["baseline"] == 0
    # growing the mask ablates more tokens; random and IG ablate as many as the object
    assert frac["object_tokens:p=-2"] <= frac["object_tokens:p=-1"] <= frac["object_tokens"] < frac["object_tokens:p=+1"] < frac["object_tokens:p=+2"]
    assert frac["random_tokens"] == pytest.approx(frac["object_tokens"])
    assert frac["integrated_gradients"] == pytest.approx(frac["object_tokens"])
    table = (run_dir / "table1_token_ablation.md").read_text()
    assert "| object_tokens:p=+2" in table and "loc_delta" in table
    assert list((tmp_path / "cache" / "mean_embedding").glob("*.pt"))
    # rerun: nothing to do, the adapter is never built
    monkeypatch.setattr(runner, "load_adapter", lambda cfg: pytest.fail("a finished run must not load the model"))
    app.run(cfg, run_dir)
    pd.testing.assert_frame_equal(pd.read_parquet(run_dir / "results.parquet"), df)


def test_shuffle_end_to_end(tmp_path):
    cfg = compose_cfg("experiment=shuffle", "model=tiny_internvl", "data=synthetic", "data.n=3",
                      "model.localization.max_new_tokens=8", data_dir=tmp_path / "data")
    app.run(cfg, tmp_path / "run")
    df = pd.read_parquet(tmp_path / "run" / "results.parquet")
    assert list(pd.unique(df["condition"])) == ["baseline", "shuffle:global", "shuffle:object"]
    frac = df.groupby("condition")["frac_edited"].mean()
    assert frac["shuffle:global"] == 1.0 and 0 < frac["shuffle:object"] < 1
    assert "| shuffle:object" in (tmp_path / "run" / "table2_shuffle.md").read_text()
