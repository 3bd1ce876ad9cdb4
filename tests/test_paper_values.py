"""The paper's numbers beside ours: each model config's `paper` node, and the tables' paper columns."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pandas as pd
import pytest

from conftest import compose_cfg
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


def test_real_model_configs_hold_the_papers_numbers_and_demo_models_none():
    llava, internvl = compose_cfg("model=llava7b"), compose_cfg("model=internvl8b")
    t1 = model_paper_values(llava, "table1")
    assert t1["baseline"] == {"loc": 35.34, "cls": 58.10} and t1["object_tokens:p=+2"] == {"loc": 0.34, "cls": 10.59}
    assert model_paper_values(llava, "table2")["shuffle:object"] == {"loc": 35.30, "cls": 58.44}
    assert model_paper_values(internvl, "table1")["baseline"] == {"loc": 72.64, "cls": 83.30}
    assert model_paper_values(internvl, "table2") is None
    assert model_paper_values(compose_cfg("model=demo_llava"), "table1") is None
    if not PAPER_MD.exists():
        pytest.skip("../shared/PAPER.md is not here")
    text = PAPER_MD.read_text()
    for cfg in (llava, internvl):
        for table in ("table1", "table2"):
            for values in (model_paper_values(cfg, table) or {}).values():
                for v in values.values():  # every number is one PAPER.md states
                    assert re.search(rf"(?<![\d.]){v:.2f}(?!\d)", text), v
