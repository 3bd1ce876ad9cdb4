"""Tests for vlmloc.results: schema, atomic parquet store, provenance, summary tables."""

from __future__ import annotations

import json
import math
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from omegaconf import OmegaConf

from vlmloc import results as R
from vlmloc.provenance import git_state, provenance, write_run_json
from vlmloc.reports.tables import add_baseline_delta, summarize, to_markdown
from vlmloc.results import RESULT_COLUMNS, RESULT_KEY, ResultStore, validate_results

REPO_ROOT = Path(__file__).resolve().parents[1]


def loc_row(sid: str, iou: float, condition: str = "baseline", pred_box=(0, 0, 10, 10), **extra):
    """A localization row whose hits follow from `iou` (NaN iou -> NA hits)."""
    hit = (lambda t: pd.NA) if math.isnan(iou) else (lambda t: iou >= t)
    return dict(
        sample_id=sid, image_id=int(sid[1:]), category="dog", task="localization",
        condition=condition, answer="[0, 0, 10, 10]", pred_box=pred_box, gt_box=[0, 0, 10, 10],
        iou=iou, hit_50=hit(0.5), hit_70=hit(0.7), hit_90=hit(0.9), p_yes=np.nan,
        correct=hit(0.5), **extra,
    )


def cls_row(sid: str, correct: bool, condition: str = "baseline", p_yes: float | None = None):
    return dict(
        sample_id=sid, image_id=int(sid[1:]), category="dog", task="classification",
        condition=condition, answer="Yes" if correct else "No", pred_box=None,
        gt_box=(0.0, 0.0, 10.0, 10.0), iou=np.nan, hit_50=None, hit_70=None, hit_90=None,
        p_yes=(0.9 if correct else 0.2) if p_yes is None else p_yes, correct=correct,
    )


def frame(*rows) -> pd.DataFrame:
    return pd.DataFrame(list(rows))


# --------------------------------------------------------------------------- schema


def test_validate_names_missing_columns():
    df = frame(loc_row("s1", 0.8)).drop(columns=["iou", "p_yes"])
    with pytest.raises(ValueError, match=r"missing required column\(s\) \['iou', 'p_yes'\]"):
        validate_results(df)
    validate_results(frame(loc_row("s1", 0.8)))  # complete frame passes


def test_validate_rejects_unknown_task():
    df = frame(loc_row("s1", 0.8)).assign(task="detection")
    with pytest.raises(ValueError, match="unknown task"):
        validate_results(df)


def test_result_key_is_part_of_schema():
    assert RESULT_KEY == ("sample_id", "task", "condition")
    assert set(RESULT_KEY) <= set(RESULT_COLUMNS)


# --------------------------------------------------------------------------- store


def test_load_absent_is_empty_with_schema(tmp_path):
    store = ResultStore(tmp_path / "run")
    df = store.load()
    assert store.path == tmp_path / "run" / "results.parquet"
    assert len(df) == 0 and list(df.columns) == list(RESULT_COLUMNS)
    assert store.done_keys() == set()


def test_boxes_round_trip_including_none(tmp_path):
    rows = [
        loc_row("s1", 0.8, pred_box=(1, 2, 3, 4), layer=3),
        loc_row("s2", 0.0, pred_box=None, layer=4),  # unparsed answer
        loc_row("s3", 0.6, pred_box=np.array([1.5, 2.5, 3.5, 4.5]), layer=5),
        cls_row("s1", True),
    ]
    store = ResultStore(tmp_path)
    store.add(frame(*rows))
    back = ResultStore(tmp_path).load()  # fresh store: read from disk, not the cache
    assert back["pred_box"].tolist() == [[1.0, 2.0, 3.0, 4.0], None, [1.5, 2.5, 3.5, 4.5], None]
    assert back["gt_box"].tolist() == [[0.0, 0.0, 10.0, 10.0]] * 4
    assert all(type(v) is float for v in back["pred_box"][0])
    schema = pq.read_schema(store.path)
    assert schema.field("pred_box").type == pa.list_(pa.float64())
    assert schema.field("pred_box").nullable
    # Extra columns survive; hits of classification rows stay NA.
    assert back["layer"].tolist()[:3] == [3, 4, 5]
    assert back.loc[3, "hit_50"] is pd.NA
    assert back["hit_50"].dtype == "boolean" and back["correct"].dtype == bool


def test_box_with_wrong_length_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="4 coordinates"):
        ResultStore(tmp_path).add(frame(loc_row("s1", 0.8, pred_box=[1, 2, 3])))


def test_add_replaces_by_key_and_keeps_others(tmp_path):
    store = ResultStore(tmp_path)
    store.add(frame(loc_row("s1", 0.8), loc_row("s2", 0.3), cls_row("s1", True)))
    store.add(frame(loc_row("s2", 0.95), loc_row("s3", 0.1)))  # s2 replaced, s3 new
    df = ResultStore(tmp_path).load()
    assert len(df) == 4
    by_key = dict(zip(map(tuple, df[list(RESULT_KEY)].to_numpy()), df["iou"]))
    assert by_key[("s1", "localization", "baseline")] == 0.8
    assert by_key[("s2", "localization", "baseline")] == 0.95
    assert by_key[("s3", "localization", "baseline")] == 0.1
    assert math.isnan(by_key[("s1", "classification", "baseline")])


def test_add_rejects_duplicate_keys_in_one_batch(tmp_path):
    with pytest.raises(ValueError, match="duplicate result keys"):
        ResultStore(tmp_path).add(frame(loc_row("s1", 0.8), loc_row("s1", 0.2)))


def test_done_keys_and_pending(tmp_path):
    store = ResultStore(tmp_path)
    store.add(frame(loc_row("s1", 0.8), cls_row("s1", True, condition="object_tokens:p=1")))
    assert store.done_keys() == {
        ("s1", "localization", "baseline"),
        ("s1", "classification", "object_tokens:p=1"),
    }
    wanted = [
        ("s2", "localization", "baseline"),
        ("s1", "localization", "baseline"),
        ("s1", "classification", "object_tokens:p=1"),
        ("s1", "classification", "baseline"),
    ]
    assert store.pending(wanted) == [wanted[0], wanted[3]]


def test_second_store_sees_other_writes(tmp_path):
    a, b = ResultStore(tmp_path), ResultStore(tmp_path)
    a.add(frame(loc_row("s1", 0.8)))
    b.add(frame(loc_row("s2", 0.8)))
    assert a.done_keys() == {("s1", "localization", "baseline"), ("s2", "localization", "baseline")}


def _crash(*args, **kwargs):
    raise OSError("simulated crash")


@pytest.mark.parametrize("where", ["replace", "write"])
def test_crashed_add_leaves_old_parquet_intact_and_no_temp(tmp_path, monkeypatch, where):
    store = ResultStore(tmp_path)
    store.add(frame(loc_row("s1", 0.8)))
    before = store.path.read_bytes()
    if where == "replace":
        monkeypatch.setattr(R.os, "replace", _crash)
    else:
        monkeypatch.setattr(R.pq, "write_table", _crash)
    with pytest.raises(OSError, match="simulated crash"):
        store.add(frame(loc_row("s2", 0.5)))
    monkeypatch.undo()
    assert store.path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.parquet"]
    assert ResultStore(tmp_path).done_keys() == {("s1", "localization", "baseline")}


# --------------------------------------------------------------------------- summaries


def hand_frame() -> pd.DataFrame:
    """Baseline: 4 localization rows (IoU .95 .75 .55 .1) and 3 of 4 classifications right.
    Knockout: localization IoU .6 and one unparsed answer; classification 1 of 4 right."""
    return frame(
        loc_row("s1", 0.95), loc_row("s2", 0.75), loc_row("s3", 0.55), loc_row("s4", 0.1),
        cls_row("s1", True), cls_row("s2", True), cls_row("s3", True), cls_row("s4", False),
        loc_row("s1", 0.6, condition="ko"),
        loc_row("s2", math.nan, condition="ko", pred_box=None),  # NA hits count as misses
        *(cls_row(f"s{i}", i == 1, condition="ko") for i in range(1, 5)),
    )


def test_summarize_hand_computed():
    s = summarize(hand_frame()).set_index(["condition", "task"])
    base_loc = s.loc[("baseline", "localization")]
    assert base_loc["n"] == 4
    assert (base_loc["acc_50"], base_loc["acc_70"], base_loc["acc_90"]) == (75.0, 50.0, 25.0)
    assert base_loc["accuracy"] == pytest.approx(50.0)
    assert base_loc["mean_iou"] == pytest.approx((0.95 + 0.75 + 0.55 + 0.1) / 4)
    assert base_loc["n_unparsed"] == 0
    base_cls = s.loc[("baseline", "classification")]
    assert base_cls["n"] == 4 and base_cls["accuracy"] == pytest.approx(75.0)
    assert base_cls["mean_p_yes"] == pytest.approx((0.9 * 3 + 0.2) / 4)
    assert pd.isna(base_cls["acc_50"]) and pd.isna(base_cls["n_unparsed"])
    ko_loc = s.loc[("ko", "localization")]
    assert (ko_loc["acc_50"], ko_loc["acc_70"], ko_loc["acc_90"]) == (50.0, 0.0, 0.0)
    assert ko_loc["accuracy"] == pytest.approx(50 / 3)
    assert ko_loc["mean_iou"] == pytest.approx(0.3)  # unparsed counts as IoU 0
    assert ko_loc["n_unparsed"] == 1
    assert s.loc[("ko", "classification"), "accuracy"] == pytest.approx(25.0)
    # Conditions in order of first appearance.
    assert list(s.index.get_level_values(0)) == ["baseline", "baseline", "ko", "ko"]


def test_baseline_delta_hand_computed():
    s = add_baseline_delta(summarize(hand_frame())).set_index(["condition", "task"])["delta"]
    assert s[("baseline", "localization")] == 0 and s[("baseline", "classification")] == 0
    assert s[("ko", "localization")] == pytest.approx(50 / 3 - 50)
    assert s[("ko", "classification")] == pytest.approx(25.0 - 75.0)


def test_delta_is_nan_without_baseline():
    df = hand_frame()
    s = add_baseline_delta(summarize(df[df["condition"] == "ko"]))
    assert s["delta"].isna().all()


def test_summarize_from_parquet_alone(tmp_path):
    ResultStore(tmp_path).add(hand_frame())
    pd.testing.assert_frame_equal(
        summarize(ResultStore(tmp_path).load()), summarize(hand_frame())
    )


def test_to_markdown_exact():
    table = pd.DataFrame(
        {"condition": ["baseline", "a|b"], "n": [4, 12], "accuracy": [75.0, np.nan]}
    )
    assert to_markdown(table, digits=1) == "\n".join(
        [
            "| condition |   n | accuracy |",
            "| --------- | --: | -------: |",
            "| baseline  |   4 |     75.0 |",
            "| a\\|b      |  12 |          |",
        ]
    )


def test_to_markdown_of_summary_has_one_line_per_row():
    md = to_markdown(add_baseline_delta(summarize(hand_frame())))
    lines = md.splitlines()
    assert len(lines) == 2 + 4 and lines[0].startswith("| condition | task")
    assert len({len(line) for line in lines}) == 1  # columns aligned


# --------------------------------------------------------------------------- provenance


def _provenance(started: float) -> dict:
    cfg = OmegaConf.create({"model": {"name": "llava"}, "out": "${model.name}_run", "seed": 0})
    return provenance(
        cfg,
        model_info={"model_id": "llava-hf/llava-1.5-7b-hf", "revision": "abc123"},
        seed=0, device="cpu", dtype="bfloat16", attn_implementation="sdpa", started=started,
    )


def test_provenance_keys_and_json():
    started = time.time() - 5
    prov = _provenance(started)
    expected = {
        "config", "git_commit", "git_dirty", "versions", "platform", "hostname",
        "cuda_device_name", "model_id", "model_revision", "dtype", "attn_implementation",
        "device", "seed", "start_time", "wall_time_s", "gpu_peak_memory_gb",
    }
    assert expected <= set(prov)
    assert prov["gpu_peak_memory_gb"] is None  # no GPU used here
    json.dumps(prov, allow_nan=False)  # plain JSON, nothing left to a default=
    assert prov["config"]["out"] == "llava_run"  # resolved
    assert set(prov["versions"]) >= {
        "python", "torch", "transformers", "accelerate", "numpy", "pandas", "pyarrow",
        "hydra-core", "omegaconf", "pycocotools", "vlmloc",
    }
    assert prov["versions"]["pandas"] == pd.__version__
    assert (prov["model_id"], prov["model_revision"]) == ("llava-hf/llava-1.5-7b-hf", "abc123")
    assert prov["wall_time_s"] >= 5


def test_provenance_git_commit_matches_checkout():
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True
    )
    if head.returncode != 0:
        pytest.skip("not running from a git checkout")
    if Path(R.__file__).resolve().parents[2] != REPO_ROOT:
        pytest.skip("vlmloc is installed from another tree")
    prov = _provenance(time.time())
    assert prov["git_commit"] == head.stdout.strip()
    assert isinstance(prov["git_dirty"], bool)


def test_git_state_outside_a_checkout(tmp_path, monkeypatch):
    # The ceiling stops git from finding a repository above tmp_path.
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    state = git_state(tmp_path)
    assert state["git_commit"] is None and state["git_dirty"] is None


def test_write_run_json_atomic_and_updates_wall_time(tmp_path, monkeypatch):
    prov = _provenance(time.time() - 10)
    path = write_run_json(tmp_path, prov)
    assert path == tmp_path / "run.json"
    info = json.loads(path.read_text())
    assert info["git_commit"] == prov["git_commit"] and info["wall_time_s"] >= 10
    monkeypatch.setattr(R.os, "replace", _crash)
    with pytest.raises(OSError):
        write_run_json(tmp_path, {"broken": True})
    monkeypatch.undo()
    assert json.loads(path.read_text()) == info
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.json"]


def test_run_json_sums_the_wall_time_of_every_session(tmp_path):
    first = _provenance(time.time() - 100)  # a session that ran ~100 s, then was killed
    write_run_json(tmp_path, first)
    write_run_json(tmp_path, first)  # the same session writing again is not a second session
    second = _provenance(time.time() - 30)  # the resumed session
    info = json.loads(write_run_json(tmp_path, second).read_text())
    assert [round(s["wall_time_s"]) for s in info["sessions"]] == [100, 30]
    assert info["wall_time_total_s"] == pytest.approx(sum(s["wall_time_s"] for s in info["sessions"]))
    assert 129 <= info["wall_time_total_s"] <= 132 and 29 <= info["wall_time_s"] <= 32


def test_a_corrupted_results_file_is_moved_aside_and_its_rows_recomputed(tmp_path, caplog):
    store = ResultStore(tmp_path)
    store.add(frame(loc_row("s1", 0.8), cls_row("s2", True)))
    good = store.path.read_bytes()
    store.path.write_bytes(good[: len(good) // 2])  # truncated, as by a full disk
    fresh = ResultStore(tmp_path)
    with caplog.at_level("WARNING", logger="vlmloc.results"):
        assert len(fresh.load()) == 0 and fresh.pending([("s1", "localization", "baseline")]) == [("s1", "localization", "baseline")]
    aside = list(tmp_path.glob("results.parquet.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_bytes() == good[: len(good) // 2] and not store.path.exists()
    assert "not a readable parquet file" in caplog.text and "its rows will be recomputed" in caplog.text
    fresh.add(frame(loc_row("s1", 0.8)))
    assert len(ResultStore(tmp_path).load()) == 1
