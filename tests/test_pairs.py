"""Object-removal pairs: the filter keeps exactly what its rule admits (answers controlled by the
test), a rerun does no new work and an interrupted run redoes only what is missing, make_pairs
runs end to end on tiny models, and data=pairs loads exactly the kept pairs."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from conftest import compose_cfg
from vlmloc import app
from vlmloc.runner import RunContext, seed_everything
from vlmloc.data import DataError, load_samples
from vlmloc.data.pairs import MANIFEST_COLUMNS, MANIFEST_FILE, inpainted_sample, read_manifest
from vlmloc.evaluation import classification_outcome
from vlmloc.experiments import make_pairs
from vlmloc.inpaint import Inpainter
from vlmloc.reports.make_pairs import FIGURE_FILE

SYN = ("data=synthetic", "data.n=6", "data.synthetic.n_images=8", "data.filters.min_area_frac=0.01",
       "experiment.figure_examples=2")  # a small figure: drawing it is most of a run's cost here
# (P(yes) original, P(yes) inpainted, IoU of the box on the original) per sample, in sample order
TABLE = [(0.9, 0.1, 0.8), (0.9, 0.1, 0.2), (0.9, 0.8, 0.9), (0.2, 0.1, 0.9), (0.2, 0.9, 0.9), (0.51, 0.5, 0.5)]


def _run(cfg, run_dir, adapter) -> RunContext:
    """app.run, with the session's tiny adapter instead of a fresh build."""
    seed_everything(int(cfg.seed))
    run_dir.mkdir(parents=True, exist_ok=True)
    ctx = RunContext(cfg=cfg, run_dir=run_dir)
    ctx.__dict__["adapter"] = adapter
    ctx.check_inputs()
    make_pairs.run(ctx)
    return ctx


class Controlled:
    """Stands in for `evaluate`: answers from a table keyed by sample id (+ "/inpainted"), records calls."""

    def __init__(self, answers: dict[str, float]) -> None:
        self.answers = answers
        self.calls: list[tuple[str, list[str]]] = []

    def __call__(self, adapter, samples, tasks, *, batch_size, **kw) -> pd.DataFrame:
        rows = []
        for task in tasks:
            self.calls.append((task, [s.sample_id for s in samples]))
            for s in samples:
                if s.sample_id.endswith("/inpainted"):
                    assert s.image_path.parent.name == "pairs" and s.image_path.is_file()
                if task == "classification":
                    out = classification_outcome(self.answers[s.sample_id])
                else:
                    iou = self.answers[s.sample_id + "/box"]
                    out = {"answer": "[0, 0, 1, 1]", "p_yes": math.nan, "iou": iou, "correct": iou >= 0.5}
                rows.append({"sample_id": s.sample_id, "task": task, **out})
        return pd.DataFrame(rows)


def _controlled(samples) -> tuple[Controlled, dict[str, tuple[float, float, float]]]:
    by_id = {s.sample_id: t for s, t in zip(samples, TABLE)}
    answers = {}
    for sid, (po, pi, iou) in by_id.items():
        answers.update({sid: po, sid + "/inpainted": pi, sid + "/box": iou})
    return Controlled(answers), by_id


def _load_pairs(run_dir, *extra):
    return load_samples(compose_cfg("data=pairs", f"data.pairs_dir={run_dir}", *extra).data)[0]


def test_filter_keeps_exactly_what_the_rule_admits(tmp_path, tiny_llava, monkeypatch):
    cfg = compose_cfg("experiment=make_pairs", "inpaint=oracle", *SYN, "experiment.require_localization=true",
                      data_dir=tmp_path / "data")
    samples = load_samples(cfg.data)[0]
    assert len(samples) == len(TABLE)
    fake, table = _controlled(samples)
    monkeypatch.setattr(make_pairs, "evaluate", fake)
    run_dir = tmp_path / "run"
    _run(cfg, run_dir, tiny_llava)

    rule = {sid for sid, (po, pi, iou) in table.items() if po > 0.5 and not pi > 0.5 and iou >= 0.5}
    rule_cls = {sid for sid, (po, pi, _) in table.items() if po > 0.5 and not pi > 0.5}
    assert len(rule) == 2 and len(rule_cls) == 3
    m = read_manifest(run_dir)
    assert set(m.loc[m["kept"], "sample_id"]) == rule
    # classification on both images of every object; boxes only for pairs the classification rule admits
    assert [t for t, _ in fake.calls] == ["classification", "localization"]
    assert sorted(fake.calls[0][1]) == sorted([s.sample_id for s in samples] + [s.sample_id + "/inpainted" for s in samples])
    assert set(fake.calls[1][1]) == rule_cls
    row = m.set_index("sample_id").loc[samples[0].sample_id]
    assert row["p_yes_original"] == 0.9 and row["p_yes_inpainted"] == 0.1 and row["iou_original"] == 0.8
    assert row["answer_original"] == "yes" and row["answer_inpainted"] == "no"
    assert m.loc[~m["sample_id"].isin(rule_cls), "localized_original"].isna().all()

    counts = {c["step"]: c["kept"] for c in json.loads((run_dir / "run.json").read_text())["pairs_counts"]}
    assert counts == {"objects": 6, "inpainted": 6, "recognized_original": 4, "not_recognized_inpainted": 3,
                      "localized_original": 2, "kept": 2}
    assert "| not_recognized_inpainted |    3 |" in (run_dir / "summary.md").read_text()

    # data=pairs: exactly the kept pairs, each the ORIGINAL sample with its inpainted image in meta
    pairs = _load_pairs(run_dir)
    assert {p.sample_id for p in pairs} == rule
    source = {s.sample_id: s for s in samples}
    for p in pairs:
        s = source[p.sample_id]
        assert p.box_xywh == s.box_xywh and p.image_path == s.image_path.resolve() and p.category == s.category
        np.testing.assert_array_equal(p.mask(), s.mask())
        assert p.meta["vlmloc_scene"] == s.meta["vlmloc_scene"]
        assert p.meta["pair"]["p_yes_original"] == table[p.sample_id][0]
        base = inpainted_sample(p)
        assert base.sample_id == p.sample_id and base.box_xywh == p.box_xywh
        a, b = np.asarray(p.load_image()), np.asarray(base.load_image())
        changed = (a != b).any(-1)
        assert changed.any() and not changed[~p.mask()].any()  # oracle: only the object's pixels differ
    assert len(_load_pairs(run_dir, "data.n=1")) == 1

    # dropping the box requirement admits the third pair without asking the model anything
    fake.calls.clear()
    _run(compose_cfg("experiment=make_pairs", "inpaint=oracle", *SYN, data_dir=tmp_path / "data"), run_dir, tiny_llava)
    assert fake.calls == []
    assert {p.sample_id for p in _load_pairs(run_dir)} == rule_cls


def _count_fills(monkeypatch) -> list[list[str]]:
    seen: list[list[str]] = []
    real = Inpainter.inpaint

    def spy(self, images, masks, samples=None):
        seen.append([s.sample_id for s in samples])
        return real(self, images, masks, samples)

    monkeypatch.setattr(Inpainter, "inpaint", spy)
    return seen


def test_rerun_does_no_new_work_and_resume_redoes_only_the_missing(tmp_path, tiny_llava, monkeypatch):
    cfg = compose_cfg("experiment=make_pairs", "inpaint=opencv", *SYN, "inpaint.batch_size=4", data_dir=tmp_path / "data")
    samples = load_samples(cfg.data)[0]
    fake, _ = _controlled(samples)
    monkeypatch.setattr(make_pairs, "evaluate", fake)
    fills = _count_fills(monkeypatch)
    run_dir = tmp_path / "run"
    _run(cfg, run_dir, tiny_llava)
    assert sorted(sum(fills, [])) == sorted(s.sample_id for s in samples) and len(fills) == 2  # batches of 4
    files = [run_dir / n for n in (MANIFEST_FILE, "run.json", "summary.md", FIGURE_FILE)]
    files += sorted((run_dir / "pairs").glob("*.png"))
    assert len(files) == 4 + len(samples)
    stamp = {f: f.stat().st_mtime_ns for f in files}
    manifest = read_manifest(run_dir)

    fake.calls.clear(), fills.clear()
    _run(cfg, run_dir, tiny_llava)
    assert fake.calls == [] and fills == []
    assert {f: f.stat().st_mtime_ns for f in files} == stamp
    pd.testing.assert_frame_equal(read_manifest(run_dir), manifest)

    # an interrupted run: one inpainted image lost -> only that object is inpainted and asked again
    lost = samples[2].sample_id
    (run_dir / "pairs" / f"{lost}.png").unlink()
    _run(cfg, run_dir, tiny_llava)
    assert fills == [[lost]]
    assert fake.calls == [("classification", [lost, lost + "/inpainted"])]
    pd.testing.assert_frame_equal(read_manifest(run_dir), manifest)

    # other inpainting settings -> the images are redone (the manifest records the margin)
    fills.clear()
    cfg2 = compose_cfg("experiment=make_pairs", "inpaint=opencv", *SYN, "inpaint.dilate_px=3", data_dir=tmp_path / "data")
    _run(cfg2, run_dir, tiny_llava)
    assert sorted(sum(fills, [])) == sorted(s.sample_id for s in samples)
    assert (read_manifest(run_dir)["mask_margin_px"] == 3).all()


def _check_run(run_dir, n_objects: int, backend: str, margin: int):
    m = pd.read_parquet(run_dir / MANIFEST_FILE)
    assert tuple(m.columns) == MANIFEST_COLUMNS and len(m) == n_objects
    assert (m["inpaint_backend"] == backend).all() and (m["mask_margin_px"] == margin).all()
    assert m["inpainted_path"].map(lambda p: (run_dir / p).is_file()).all()
    assert (m["hole_frac"] > 0).all() and m["inpaint_key"].nunique() == 1
    assert m["p_yes_original"].between(0, 1).all() and m["p_yes_inpainted"].between(0, 1).all()
    assert (m["recognized_original"] == (m["p_yes_original"] > 0.5)).all()
    assert (m["recognized_inpainted"] == (m["p_yes_inpainted"] > 0.5)).all()
    assert (m["kept"] == (m["recognized_original"] & ~m["recognized_inpainted"])).all()
    info = json.loads((run_dir / "run.json").read_text())
    counts = {c["step"]: c["kept"] for c in info["pairs_counts"]}
    assert counts["objects"] == counts["inpainted"] == n_objects
    assert counts["kept"] == counts["not_recognized_inpainted"] <= counts["recognized_original"] <= n_objects
    assert counts["kept"] == int(m["kept"].sum())
    assert info["inpaint"]["backend"] == backend and info["config"]["experiment"]["name"] == "make_pairs"
    assert (run_dir / FIGURE_FILE).stat().st_size > 0
    pairs = _load_pairs(run_dir)
    kept = m[m["kept"]].set_index("sample_id")
    assert sorted(p.sample_id for p in pairs) == sorted(kept.index)
    for p in pairs:
        assert list(p.box_xywh) == list(kept.loc[p.sample_id, "box_xywh"])
    return m


def test_make_pairs_synthetic_oracle_tiny_llava(tmp_path, capsys):
    """Through app.run, as `python -m vlmloc experiment=make_pairs inpaint=oracle` runs it."""
    cfg = compose_cfg("experiment=make_pairs", "inpaint=oracle", "model=tiny_llava", *SYN, data_dir=tmp_path / "data")
    app.run(cfg, tmp_path / "run")
    assert "| kept " in capsys.readouterr().out
    _check_run(tmp_path / "run", 6, "oracle", 0)


def test_make_pairs_fixture_opencv_tiny_internvl(tmp_path, tiny_internvl, monkeypatch):
    """Real photos, OpenCV, the InternVL family; with the box requirement, real localization
    answers for pairs the (controlled) classification admits."""
    pytest.importorskip("skimage")
    cfg = compose_cfg("experiment=make_pairs", "model=tiny_internvl", "data=fixture", "batch_size=4",
                      "experiment.require_localization=true", "data.filters.categories=[cup,spoon]",
                      "experiment.figure_examples=0", data_dir=tmp_path / "data")
    run_dir = tmp_path / "run"
    real = make_pairs.evaluate
    admit = {"3-3"}  # the cup: recognized in the original, not in the inpainted image; the spoon not

    def evaluate(adapter, samples, tasks, **kw):
        if tasks == ["localization"]:
            return real(adapter, samples, tasks, **kw)
        df = real(adapter, samples, tasks, **kw)
        sid = df["sample_id"]
        df["p_yes"] = np.where(sid.isin(admit), 0.9, np.where(sid.str.endswith("/inpainted"), 0.1, 0.2))
        df["correct"] = df["p_yes"] > 0.5
        return df

    monkeypatch.setattr(make_pairs, "evaluate", evaluate)
    monkeypatch.setitem(tiny_internvl.cfg.localization, "max_new_tokens", 8)  # a random model's box is noise anyway
    _run(cfg, run_dir, tiny_internvl)
    m = read_manifest(run_dir).set_index("sample_id")
    assert set(m.index) == {"3-3", "3-4"}
    assert (m["inpaint_backend"] == "opencv").all() and (m["mask_margin_px"] == 8).all()
    asked = m["iou_original"].notna()
    assert set(m.index[asked]) == admit and m.loc[list(admit), "loc_answer_original"].notna().all()
    assert (m["kept"] == (m.index.isin(admit) & (m["iou_original"] >= 0.5))).all()
    assert {p.sample_id for p in _load_pairs(run_dir)} == set(m.index[m["kept"]])


def test_make_pairs_fixture_opencv_real_answers(tmp_path, tiny_llava):
    pytest.importorskip("skimage")
    cfg = compose_cfg("experiment=make_pairs", "model=tiny_llava", "data=fixture", "experiment.figure_examples=2",
                      data_dir=tmp_path / "data")
    _run(cfg, tmp_path / "run", tiny_llava)
    _check_run(tmp_path / "run", 5, "opencv", 8)


def test_pairs_data_errors(tmp_path):
    with pytest.raises(DataError, match="no manifest.parquet"):
        _load_pairs(tmp_path)
    with pytest.raises(DataError, match="data.pairs_dir is required"):
        load_samples(compose_cfg("data=pairs").data)
