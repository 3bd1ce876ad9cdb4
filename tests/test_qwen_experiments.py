"""Every experiment of the paper end to end on the tiny Qwen2.5-VL and Qwen3-VL builds (random weights
of the real classes): the paper's runs in dependency order, then CMA on the pairs and head ablation
ranked by it. The engine's values on these families are checked against the model's own code in
test_qwen.py, test_qwen_engine.py and test_qwen_probes.py; here each run must finish with the rows
its design calls for, and the report's numbers must be the runs' own. `pytest -m slow`."""

from __future__ import annotations

import pandas as pd
import pytest

from conftest import compose_cfg
from test_paper import accuracy, smoke
from vlmloc import app
from vlmloc.data.pairs import read_manifest, write_manifest
from vlmloc.models import load_adapter

FAMILIES = ["tiny_qwen2_5vl", "tiny_qwen3vl"]
BEFORE_PAIRS = ["baseline", "token_ablation", "shuffle", "extension", "knockout", "make_pairs", "position_probe"]


def _cfg(tmp_path, model: str, *overrides: str):
    return compose_cfg(f"model={model}", "inpaint=oracle", f"paths.cache_dir={tmp_path / 'cache'}", *overrides,
                       data_dir=tmp_path / "data")


@pytest.mark.slow  # ~1 min per family on 2 cores
@pytest.mark.parametrize("model", FAMILIES)
def test_every_experiment_runs_on_the_tiny_qwen_builds(model, tmp_path):
    paper = tmp_path / "paper"
    runs = "[" + ",".join(BEFORE_PAIRS) + "]"
    app.run(smoke(tmp_path, model, f"experiment.runs={runs}"), paper)
    n = 4  # paper_smoke's data.n
    for name in BEFORE_PAIRS:
        assert (paper / name / "run.json").is_file(), name
    ablation = pd.read_parquet(paper / "token_ablation" / "results.parquet")
    # 9 conditions (baseline, object, random, IG, ...) x 2 tasks x n objects, as for the paper's families
    assert ablation.groupby(["condition", "task"]).size().eq(n).all() and ablation.condition.nunique() >= 5
    knock = pd.read_parquet(paper / "knockout" / "results.parquet")
    assert knock.groupby(["condition", "task"]).size().eq(n).all()
    table = pd.read_parquet(paper / "report_tables.parquet")
    for exp, cond, task in [("token_ablation", "object_tokens", "localization"), ("shuffle", "shuffle:global", "classification"),
                            ("baseline", "baseline", "localization")]:
        row = table[(table.section == exp) & (table.condition == cond) & (table.task == task) & table.accuracy.notna()]
        assert len(row) == 1, (exp, cond, task)
        assert float(row["accuracy"].iloc[0]) == pytest.approx(accuracy(paper / exp, cond, task)), (exp, cond, task)

    # a random model's answers keep no pair (the filter itself is tested in test_make_pairs): keep them all
    manifest = read_manifest(paper / "make_pairs")
    manifest["kept"] = True
    write_manifest(paper / "make_pairs", manifest)
    cma = tmp_path / "cma"
    app.run(_cfg(tmp_path, model, "experiment=cma", "data=pairs", f"data.pairs_dir={paper / 'make_pairs'}", "data.n=2",
                 "experiment.positions=text", "experiment.localization_source_min_iou=null",
                 "experiment.min_denominator=1e-9"), cma)
    mf = pd.read_parquet(cma / "mf.parquet")
    lm = load_adapter(_cfg(tmp_path, model).model).text_config
    heads = {(layer, head) for layer in range(lm.num_hidden_layers) for head in range(lm.num_attention_heads)}
    for (sample, task), group in mf.groupby(["sample_id", "task"]):
        assert set(zip(group["layer"], group["head"])) == heads, (sample, task)
    assert mf.sample_id.nunique() == 2 and set(mf.task) == {"classification", "localization"}

    ablate = tmp_path / "head_ablation"
    app.run(_cfg(tmp_path, model, "experiment=head_ablation", "data=synthetic", "data.n=2", f"experiment.cma_dir={cma}",
                 "experiment.ks=[1]", "experiment.mean_samples=2", "experiment.mf_positions=text"), ablate)
    rows = pd.read_parquet(ablate / "results.parquet")
    assert {"baseline", "heads:top:k=1", "heads:random:k=1", "heads:cls_critical:k=1"} <= set(rows.condition)
    assert rows.groupby(["condition", "task"]).size().eq(2).all()
