"""Prompt paraphrases (experiment.paraphrases): each wording's run asks exactly that wording, the
spread tables equal hand computations from the runs' rows, and bad choices are clear errors."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import compose_cfg
from vlmloc import app
from vlmloc.data import load_samples
from vlmloc.errors import ConfigError
from vlmloc.reports import findings as F
from vlmloc.reports.paraphrases import accuracy_by_wording
from vlmloc.reports.bootstrap import Bootstrap
from vlmloc.reports.sections import IMAGE_SETS, WORDING_FINDINGS, WORDINGS

# configs/family/llava.yaml's wording 1, written out here so a test fails if the run asks anything else
WORDING_1 = "Is a {category} visible in this picture? Answer the question using a single word or phrase."
WORDING_1_BOX = "Please output the bounding box of the {category} in the image."


def cfg_of(tmp_path, experiment: str, *extra: str):
    return compose_cfg(f"experiment={experiment}", "model=tiny_llava", "data=synthetic", "data.n=3",
                       f"paths.cache_dir={tmp_path / 'cache'}", *extra)


def hand_p_yes(adapter, image, question: str) -> float:
    """P(yes) / (P(yes) + P(no)) of one forward on the literal LLaVA prompt, by hand."""
    text = f"USER: <image>\n{question} ASSISTANT:"
    enc = adapter.processor(images=[image], text=[text], return_tensors="pt", do_pad=True)
    with torch.no_grad():
        logits = adapter.model(**enc).logits[0, -1].float()
    p = torch.softmax(logits, -1)
    yes, no = p[adapter.yes_ids].sum(), p[adapter.no_ids].sum()
    return float(yes / (yes + no))


def test_each_wording_run_asks_that_wording(tmp_path, tiny_llava):
    cfg = cfg_of(tmp_path, "baseline", "experiment.paraphrases=[1]", "model.localization.max_new_tokens=6")
    run_dir = tmp_path / "run"
    app.run(cfg, run_dir, adapter=tiny_llava)
    sub = run_dir / "paraphrases" / "1"
    recorded = json.loads((sub / "config.json").read_text())["model"]["prompts"]
    assert recorded["classification"] == WORDING_1 and recorded["localization"] == WORDING_1_BOX
    assert not (run_dir / "paraphrases" / "0").exists()
    samples, _ = load_samples(cfg.data)
    rows = pd.read_parquet(sub / "results.parquet").set_index(["sample_id", "task"])
    default = pd.read_parquet(run_dir / "results.parquet").set_index(["sample_id", "task"])
    for s in samples:
        image = s.load_image()
        got = rows.loc[(s.sample_id, "classification"), "p_yes"]
        assert got == pytest.approx(hand_p_yes(tiny_llava, image, WORDING_1.format(category=s.category)), abs=1e-5)
        default_q = str(cfg.model.prompts.classification).format(category=s.category)
        assert default.loc[(s.sample_id, "classification"), "p_yes"] == pytest.approx(hand_p_yes(tiny_llava, image, default_q), abs=1e-5)
        assert got != pytest.approx(default.loc[(s.sample_id, "classification"), "p_yes"], abs=1e-6)
    table = (run_dir / "paraphrases.md").read_text()
    assert "wording_1" in table and "default" in table
    # the main run's fingerprint leaves the paraphrases out: a rerun asking for another wording
    # is not refused, computes only that wording and leaves the default rows as they were
    before = (run_dir / "results.parquet").stat().st_mtime_ns
    app.run(cfg_of(tmp_path, "baseline", "experiment.paraphrases=[0]", "model.localization.max_new_tokens=6"), run_dir, adapter=tiny_llava)
    assert (run_dir / "paraphrases" / "0" / "results.parquet").is_file()
    assert (run_dir / "results.parquet").stat().st_mtime_ns == before


def _rows(correct: dict[str, list[bool]], hits: dict[str, list[float]]) -> pd.DataFrame:
    """Result rows of three objects: per condition, classification correct and localization hits
    (all three IoU hits equal, so an object's localization score is 100 x hit)."""
    out = []
    for cond in correct:
        for i in range(3):
            out.append({"sample_id": f"s{i}", "task": "classification", "condition": cond, "correct": correct[cond][i],
                        "hit_50": None, "hit_70": None, "hit_90": None})
            h = bool(hits[cond][i])
            out.append({"sample_id": f"s{i}", "task": "localization", "condition": cond, "correct": h,
                        "hit_50": h, "hit_70": h, "hit_90": h})
    return pd.DataFrame(out)


def test_spread_over_wordings_equals_a_hand_computation():
    rows = {
        "default": _rows({"baseline": [1, 1, 1], "object_tokens": [0, 1, 0]}, {"baseline": [1, 1, 0], "object_tokens": [0, 0, 0]}),
        "0": _rows({"baseline": [1, 0, 1], "object_tokens": [0, 0, 0]}, {"baseline": [1, 0, 0], "object_tokens": [1, 0, 0]}),
        "1": _rows({"baseline": [1, 1, 0], "object_tokens": [1, 1, 0]}, {"baseline": [1, 1, 1], "object_tokens": [0, 0, 0]}),
    }
    boot = Bootstrap(resamples=300, seed=0, level=0.9)
    t = accuracy_by_wording(rows, boot).set_index(["condition", "task"])
    cls = t.loc[("object_tokens", "classification")]
    assert cls["default"] == pytest.approx(100 / 3) and cls["wording_0"] == 0 and cls["wording_1"] == pytest.approx(200 / 3)
    assert cls["min"] == 0 and cls["max"] == pytest.approx(200 / 3) and cls["wordings"] == 3
    assert cls["mean"] == pytest.approx(100 * (1 + 0 + 2) / 9)
    # change from baseline under each wording: default 1/3 - 1, wording 0 0 - 2/3, wording 1 2/3 - 2/3
    assert cls["delta_default"] == pytest.approx(-200 / 3)
    assert cls["delta_min"] == pytest.approx(-200 / 3) and cls["delta_max"] == pytest.approx(0)
    assert cls["delta_mean"] == pytest.approx(100 * ((-2 / 3) + (-2 / 3) + 0) / 3)
    loc = t.loc[("baseline", "localization")]
    assert (loc["default"], loc["wording_0"], loc["wording_1"]) == pytest.approx((200 / 3, 100 / 3, 100))
    assert np.isnan(loc["delta_default"])
    # the interval is a percentile bootstrap over objects of each object's mean over wordings
    per_object = np.array([(1 + 1 + 1) / 3, (1 + 0 + 1) / 3, (0 + 0 + 1) / 3]) * 100
    rng = np.random.default_rng(0)
    stats = per_object[rng.integers(0, 3, size=(300, 3))].mean(axis=1)
    assert (loc["mean_low"], loc["mean_high"]) == pytest.approx(tuple(np.percentile(stats, [5, 95])))


def test_report_shows_the_spread_and_findings_per_wording_and_image_sets_side_by_side(tmp_path, tiny_llava):
    extra = ("model.localization.max_new_tokens=4", "experiment.paraphrases=[0,2]")
    a, b = tmp_path / "a", tmp_path / "b"
    app.run(cfg_of(tmp_path, "shuffle", *extra), a, adapter=tiny_llava)
    app.run(cfg_of(tmp_path, "shuffle", "data=synthetic_wide", "data.n=3", *extra), b, adapter=tiny_llava)
    cfg = compose_cfg("experiment=report", f"runs=[{a},{b}]", "experiment.bootstrap.resamples=200")
    app.run(cfg, tmp_path / "rep")
    tables = pd.read_parquet(tmp_path / "rep" / "report_tables.parquet")
    spread = tables[tables.caption == WORDINGS]
    assert set(spread["data"]) == {"synthetic", "synthetic_wide"}
    for run_dir, data in ((a, "synthetic"), (b, "synthetic_wide")):
        by = {"default": run_dir, "wording_0": run_dir / "paraphrases" / "0", "wording_2": run_dir / "paraphrases" / "2"}
        for cond in ("baseline", "shuffle:global", "shuffle:object"):
            row = spread[(spread.data == data) & (spread.condition == cond) & (spread.task == "classification")].iloc[0]
            accs = {}
            for col, d in by.items():
                df = pd.read_parquet(d / "results.parquet")
                df = df[(df.condition == cond) & (df.task == "classification")]
                accs[col] = 100 * df["correct"].astype(float).mean()
                assert float(row[col]) == pytest.approx(accs[col]), (data, cond, col)
            assert float(row["min"]) == pytest.approx(min(accs.values()))
            assert float(row["max"]) == pytest.approx(max(accs.values()))
        # each wording's verdict is the finding checked on that wording's own rows
        found = tables[(tables.caption == WORDING_FINDINGS) & (tables.data == data)]
        boot = Bootstrap(200, 0, 0.95)
        for col, d in by.items():
            (direct,) = F.shuffle_containment(pd.read_parquet(d / "results.parquet"), boot)
            assert found[found.statement == direct.statement][col].iloc[0] == direct.verdict, (data, col)
    sides = tables[tables.caption == IMAGE_SETS]
    assert {"synthetic", "synthetic_wide"} <= set(sides.columns) and len(sides) == 1
    assert sides["statement"].iloc[0] == F.SHUFFLE


@pytest.mark.parametrize("choice, message", [
    ("[5]", "indices must be distinct integers in 0..2"),
    ("[0,0]", "indices must be distinct"),
    ("some", "must be null, all or a list"),
])
def test_bad_paraphrase_choices_are_refused_before_any_work(tmp_path, choice, message):
    with pytest.raises(ConfigError, match=message):
        app.run(cfg_of(tmp_path, "baseline", f"experiment.paraphrases={choice}"), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_catalogue_with_unequal_lists_and_an_experiment_without_a_table_are_refused(tmp_path):
    cfg = cfg_of(tmp_path, "baseline", "experiment.paraphrases=all", "model.prompts.paraphrases.list=[a,b]")
    with pytest.raises(ConfigError, match="the same number"):
        app.run(cfg, tmp_path / "run")
    with pytest.raises(ConfigError, match="experiment.paraphrases"):
        app.run(compose_cfg("experiment=cma", "model=tiny_llava", "+experiment.paraphrases=all"), tmp_path / "cma")
