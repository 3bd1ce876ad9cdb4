"""The paper's numbers beside ours: configs/paper/<model>.yaml, and the tables' paper columns."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pandas as pd
import pytest

from conftest import compose_cfg
from omegaconf import OmegaConf

from vlmloc.reports.paper_values import NOT_STATED, PaperValues, paper_dir
from vlmloc.reports.tables import model_paper_values, paper_table, with_paper

PAPER_MD = Path(__file__).resolve().parents[2] / "shared" / "PAPER.md"


def _rows(condition: str, loc_hits: list[bool], cls_correct: list[bool]) -> list[dict]:
    rows = []
    for i, (hit, ok) in enumerate(zip(loc_hits, cls_correct)):
        common = {"sample_id": f"s{i}", "image_id": i, "category": "cat", "condition": condition,
                  "gt_box": [0.0, 0.0, 10.0, 10.0], "frac_edited": 0.1}
        rows.append({**common, "task": "localization", "answer": "[0.1, 0.1, 0.2, 0.2]",
                     "pred_box": [0.0, 0.0, 10.0, 10.0] if hit else [50.0, 50.0, 60.0, 60.0],
                     "iou": 1.0 if hit else 0.0, "hit_50": hit, "hit_70": hit, "hit_90": hit, "p_yes": math.nan,
                     "correct": hit})
        rows.append({**common, "task": "classification", "answer": "yes" if ok else "no", "pred_box": None,
                     "iou": math.nan, "hit_50": None, "hit_70": None, "hit_90": None, "p_yes": 0.9 if ok else 0.1,
                     "correct": ok})
    return rows


def test_the_tables_put_the_papers_value_and_the_difference_beside_ours():
    results = pd.DataFrame(_rows("baseline", [True, True, False, False], [True, True, True, False])
                           + _rows("object_tokens", [True, False, False, False], [False, False, True, False]))
    paper = {"baseline": {"loc": 35.34, "cls": 58.10}, "object_tokens": {"loc": 5.92}}
    table = with_paper(paper_table(results, ["baseline", "object_tokens"]), paper).set_index("condition")
    # ours by hand: baseline loc 2/4 hits at every threshold = 50 %, cls 3/4 = 75 %; object 25 % / 25 %
    assert table.loc["baseline", "loc"] == pytest.approx(50.0) and table.loc["baseline", "cls"] == pytest.approx(75.0)
    assert table.loc["baseline", "loc_vs_paper"] == pytest.approx(50.0 - 35.34)
    assert table.loc["baseline", "cls_vs_paper"] == pytest.approx(75.0 - 58.10)
    assert table.loc["object_tokens", "loc_vs_paper"] == pytest.approx(25.0 - 5.92)
    assert math.isnan(table.loc["object_tokens", "paper_cls"]) and math.isnan(table.loc["object_tokens", "cls_vs_paper"])
    assert list(with_paper(paper_table(results, ["baseline"]), None).columns) == list(paper_table(results, ["baseline"]).columns)


def test_paper_files_hold_the_papers_numbers_and_demo_models_none():
    llava, internvl = compose_cfg("model=llava7b"), compose_cfg("model=internvl8b")
    t1 = model_paper_values(llava, "table1")
    assert t1["baseline"] == {"loc": 35.34, "cls": 58.10}
    assert t1["object_tokens:p=+2"] == {"loc": 0.34, "cls": 10.59, "tokens_pct": 21}
    assert model_paper_values(llava, "table2")["shuffle:object"] == {"loc": 35.30, "cls": 58.44}
    assert model_paper_values(internvl, "table1")["baseline"] == {"loc": 72.64, "cls": 83.30}
    assert model_paper_values(internvl, "table3")["object_tokens:view=global"] == {"loc_delta": -36.4, "cls_delta": -9.5}
    assert model_paper_values(internvl, "table2") is None  # not stated for InternVL
    assert model_paper_values(compose_cfg("model=demo_llava"), "table1") is None
    paper = PaperValues.for_model("llava7b")
    assert paper.source("table1") == "Table 1 (token ablation)" and paper.source("table3") == NOT_STATED
    assert paper.finding("cma")["layers"] == [11, 16] and paper.finding("cma")["top10_shared"] == [1, 2]
    assert PaperValues.for_model("internvl8b").finding("position_probe")["peak_layers"] == [7]
    assert not PaperValues.for_model("demo_llava").stated
    assert "paper" not in compose_cfg("model=llava7b").model  # one source: configs/paper/


def _numbers(node: object) -> list[float]:
    if isinstance(node, dict):
        return [v for k, x in node.items() if k != "model" for v in _numbers(x)]
    if isinstance(node, list):
        return [v for x in node for v in _numbers(x)]
    return [float(node)] if isinstance(node, (int, float)) and not isinstance(node, bool) else []


def test_every_number_in_configs_paper_is_one_paper_md_states():
    """Each file names its model and a source per table and finding; every number in it is a number
    PAPER.md writes (same sign and value): the files hold what the paper states, nothing more."""
    files = sorted(paper_dir().glob("*.yaml"))
    assert {f.stem for f in files} == {"llava7b", "llava13b", "internvl8b"}
    models = {p.stem for p in (paper_dir().parent / "model").glob("*.yaml")}
    if not PAPER_MD.exists():
        pytest.skip("../shared/PAPER.md is not here")
    stated = {float(m) for m in re.findall(r"(?<![\w.])[-+]?\d+(?:\.\d+)?", PAPER_MD.read_text().replace(",", ""))}
    for f in files:
        assert f.stem in models, f"{f.name} names no model config"
        data = OmegaConf.to_container(OmegaConf.load(f))
        PaperValues.for_model(f.stem)  # checks the layout
        numbers = _numbers({k: v for k, v in data.items() if k != "model"})
        assert numbers, f.name
        for v in numbers:
            assert v in stated, f"{f.name}: {v} is not a number PAPER.md states"


def test_a_malformed_paper_file_is_refused(tmp_path):
    (tmp_path / "m.yaml").write_text("model: m\ntables: {table1: {rows: {baseline: {loc: 1.0}}}}\n")
    with pytest.raises(ValueError, match="source"):
        PaperValues.for_model("m", tmp_path)
    (tmp_path / "m.yaml").write_text("model: m\ntables: {table1: {source: T1, rows: {baseline: {lok: 1.0}}}}\n")
    with pytest.raises(ValueError, match="baseline"):
        PaperValues.for_model("m", tmp_path)
