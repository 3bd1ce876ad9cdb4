"""Object extension: the ring is filled with the object's own tokens, the GT scaling, the matrix, end to end."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import compose_cfg, noise_image
from vlmloc import app, geometry, runner
from vlmloc.conditions import Resources, realize
from vlmloc.data.sample import Sample
from vlmloc.engine.token_edits import edit_lm_input
from vlmloc.experiments import extension as ext
from vlmloc.extension_geometry import GRID_COLUMNS, grow_box
from vlmloc.models import GLOBAL, LOCAL
from vlmloc.reports import extension as report


def _edits(cond, sample, layout, task, **named):
    """The LM-input edits `cond` realizes to for one row (named: the resources it reads)."""
    return realize(cond, sample, layout, task, 0, Resources(**named)).edits


def make_sample(tmp_path, width, height, polygon, sid="s0", seed=0, category="cat"):
    path = tmp_path / f"{sid}.png"
    noise_image(width, height, seed).save(path)
    xs, ys = polygon[0::2], polygon[1::2]
    box = (min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys))
    return Sample(sid, seed, seed, path, width, height, category, 1, box, [list(map(float, polygon))], area=1.0)


def lm_input(adapter, batch, edits):
    """(clean, edited) inputs_embeds [B, T, D] at the LM input, from one forward pass.

    Pre-hooks run in registration order: one before the edit hook sees the clean embeddings,
    one after it sees what the first LM layer gets.
    """
    seen = {}

    def grab(key):
        def hook(module, args, kwargs):
            seen[key] = kwargs["inputs_embeds"].detach().clone()

        return hook

    lm = adapter.language_model
    handles = [lm.register_forward_pre_hook(grab("clean"), with_kwargs=True)]
    try:
        with edit_lm_input(adapter, edits):
            handles.append(lm.register_forward_pre_hook(grab("edited"), with_kwargs=True))
            with torch.no_grad():
                adapter.model(**batch.inputs)
    finally:
        for h in handles:
            h.remove()
    return seen["clean"], seen["edited"]


def reuse_adapter(monkeypatch, tiny):
    """Let app.run build its adapter around the session's tiny model (same weights, the run's model
    config), so end-to-end tests skip a second model build; loading itself is tested in test_app."""

    def load(model_cfg):
        assert model_cfg.name == tiny.cfg.name and model_cfg.tiny == tiny.cfg.tiny
        return type(tiny)(tiny.model, tiny.processor, model_cfg, tiny.device)

    monkeypatch.setattr("vlmloc.runner.load_adapter", load)


CASES = {
    # (width, height, object polygon): LLaVA pads to a square; InternVL 900x300 = 3x1 crops + thumbnail,
    # 300x500 = 2x3 crops + thumbnail.
    "tiny_llava": [(300, 200, [120, 60, 200, 80, 150, 140]), (200, 260, [60, 90, 130, 100, 90, 170])],
    "tiny_internvl": [(900, 300, [350, 80, 560, 120, 420, 230]), (300, 500, [100, 150, 200, 180, 140, 320])],
}


@pytest.mark.parametrize("family", ["tiny_llava", "tiny_internvl"])
def test_extension_fills_only_the_ring_with_object_tokens_of_the_same_view(family, request, tmp_path):
    ad = request.getfixturevalue(family)
    samples = [make_sample(tmp_path, w, h, poly, sid=f"s{i}", seed=i) for i, (w, h, poly) in enumerate(CASES[family])]
    # one row per (sample, p): p=1 on the first image, p=2 on the second
    items = list(zip(samples, ext.extension_conditions(seed=0, pads=[1, 2])))
    # different category lengths -> different prompt lengths -> left padding
    batch = ad.prepare(
        [s.load_image() for s, _ in items],
        [ad.prompt("localization", "cat" if i % 2 else "a very long category name") for i, _ in enumerate(items)],
    )
    assert (batch.inputs["attention_mask"] == 0).any()
    edits = [_edits(c, s, lay, "localization") for (s, c), lay in zip(items, batch.layouts)]
    clean, edited = lm_input(ad, batch, edits)
    for row, ((sample, cond), lay) in enumerate(zip(items, batch.layouts)):
        p = cond.columns["pad"]
        mask = sample.mask()
        obj = lay.object_tokens(mask, 0)
        ring = lay.object_tokens(mask, p) & ~obj
        changed = torch.nonzero((edited[row] != clean[row]).any(-1)).flatten().numpy()
        np.testing.assert_array_equal(changed, np.sort(lay.positions[ring]))
        assert obj.any() and not np.isin(lay.positions[obj], changed).any(), "object tokens must stay as they are"
        views = {GLOBAL, LOCAL} if family == "tiny_internvl" else {GLOBAL}
        assert set(lay.view[ring]) == views, "every view's object must grow"
        for view in views:
            pool = clean[row, torch.as_tensor(lay.positions[obj & lay.in_view(view)])]  # [k, D]
            new = edited[row, torch.as_tensor(lay.positions[ring & lay.in_view(view)])]  # [m, D]
            match = (new[:, None, :] == pool[None, :, :]).all(-1)  # [m, k]
            assert match.any(1).all(), f"row {row} view {view}: a ring token is not a clean object token of its view"
            assert len(set(match.float().argmax(1).tolist())) > 1, "sources should be drawn, not one token repeated"


def test_extension_draws_are_seeded_per_sample_and_p(tiny_internvl, tmp_path):
    s = make_sample(tmp_path, 900, 300, CASES["tiny_internvl"][0][2])
    lay = ext.layout_for_size(tiny_internvl, 900, 300)
    c1, c2 = ext.extension_conditions(seed=0, pads=[1, 2])
    a, b = _edits(c1, s, lay, "localization"), _edits(c1, s, lay, "classification")
    assert [e.src.tolist() for e in a] == [e.src.tolist() for e in b]  # same draws in any batch, any task
    assert ext.extension_conditions(seed=0, pads=[0])[0].name == "baseline"
    assert (c1.name, c2.name) == ("extension:p=1", "extension:p=2")
    other = _edits(ext.extension_conditions(seed=1, pads=[1])[0], s, lay, "localization")
    assert [e.src.tolist() for e in a] != [e.src.tolist() for e in other]


def test_gt_box_scaling_hand_checked(tiny_llava, tiny_internvl):
    # LLaVA 400x300: padded square S=400 -> 24 cells of 400/24 px
    cols = ext.grid_columns(ext.layout_for_size(tiny_llava, 400, 300))
    assert cols["grid_view"] == GLOBAL and cols["cell_w"] == pytest.approx(400 / 24) and cols["cell_h"] == pytest.approx(400 / 24)
    assert (cols["grid_x0"], cols["grid_y0"], cols["grid_x1"], cols["grid_y1"]) == (0, -50, 400, 350)
    c = 400 / 24
    gt = (100.0, 100.0, 200.0, 150.0)
    assert grow_box(gt, 0, c, c, 400, 300) == pytest.approx(gt)
    assert grow_box(gt, 1, c, c, 400, 300) == pytest.approx((83.3333, 83.3333, 216.6667, 166.6667), abs=1e-3)
    assert grow_box(gt, 2, c, c, 400, 300) == pytest.approx((66.6667, 66.6667, 233.3333, 183.3333), abs=1e-3)
    # the same as scaling about the centre by (w + 2qc)/w per axis (here a square box)
    sq = (100.0, 100.0, 150.0, 150.0)
    assert grow_box(sq, 2, c, c, 400, 300) == pytest.approx(geometry.scale_box(sq, (50 + 4 * c) / 50, 400, 300))
    # clipped at the image border
    assert grow_box((10.0, 5.0, 50.0, 40.0), 1, c, c, 400, 300) == pytest.approx((0, 0, 66.6667, 56.6667), abs=1e-3)
    # InternVL, cell=local: the finest grid is the local canvas (300x500 -> 2x3 crops -> 48 x 32 tokens) ...
    cols = ext.grid_columns(ext.layout_for_size(tiny_internvl, 300, 500), "local")
    assert cols["grid_view"] == LOCAL and (cols["grid_rows"], cols["grid_cols"]) == (48, 32)
    assert cols["cell_w"] == pytest.approx(300 / 32) and cols["cell_h"] == pytest.approx(500 / 48)
    assert grow_box((100, 200, 200, 300), 2, cols["cell_w"], cols["cell_h"], 300, 500) == pytest.approx(
        (100 - 600 / 32, 200 - 1000 / 48, 200 + 600 / 32, 300 + 1000 / 48)
    )
    # ... and a single-tile image's one grid (labelled global): 448 / 16 = 28 px
    cols = ext.grid_columns(ext.layout_for_size(tiny_internvl, 448, 448))
    assert cols["grid_view"] == GLOBAL and cols["cell_w"] == cols["cell_h"] == 28


NAMES = {p: ext.condition_name(p) for p in (0, 1, 2)}


def _row(pad, pred, gt=(100.0, 100.0, 200.0, 150.0), cell=10.0):
    return {"task": "localization", "pad": pad, "pred_box": pred, "gt_box": list(gt), "cell_w": cell, "cell_h": cell,
            "width": 400, "height": 300}


def test_extension_matrix_hand_checked():
    df = pd.DataFrame([
        _row(0, [100.0, 100.0, 200.0, 150.0]),  # = GT: IoU 1 at q=0, 5000/8400 at q=1, 5000/12600 at q=2
        _row(1, [90.0, 90.0, 210.0, 160.0]),    # = GT+1: 5000/8400 at q=0, 1 at q=1, 8400/12600 at q=2
        _row(2, None),                          # unparsed: a miss everywhere
        {**_row(2, None), "task": "classification"},  # ignored
    ])
    m = report.extension_matrix(df, [0, 1, 2], NAMES).set_index("pad")
    third = 100 / 3
    assert m.loc[0, ["q=0", "q=1", "q=2"]].tolist() == pytest.approx([100, third, 0])
    assert m.loc[1, ["q=0", "q=1", "q=2"]].tolist() == pytest.approx([third, 100, third])
    assert m.loc[2, ["q=0", "q=1", "q=2"]].tolist() == pytest.approx([0, 0, 0])
    assert m.loc[0, "best_q"] == 0 and m.loc[1, "best_q"] == 1 and pd.isna(m.loc[2, "best_q"])
    assert m.loc[1, "scale_q=1"] == pytest.approx(math.sqrt(120 * 70 / (100 * 50)))
    assert m.loc[1, "pred_gt_size"] == pytest.approx(math.sqrt(120 * 70 / (100 * 50)))
    assert list(m["n"]) == [1, 1, 1] and list(m["condition"]) == ["baseline", "extension:p=1", "extension:p=2"]


def test_bad_settings_are_refused():
    cfg = compose_cfg("experiment=extension", "experiment.pads=[0,-1]")
    with pytest.raises(ValueError, match="pads must be distinct integers >= 0"):
        ext.settings(cfg)
    with pytest.raises(ValueError, match="must include localization"):
        ext.settings(compose_cfg("experiment=extension", "experiment.tasks=[classification]"))


def test_extension_end_to_end_tiny_llava(tiny_llava, tmp_path, monkeypatch, capsys):
    reuse_adapter(monkeypatch, tiny_llava)
    cfg = compose_cfg("experiment=extension", "model=tiny_llava", "data=synthetic", "data.n=4",
                      "data.synthetic.n_images=8", "model.localization.max_new_tokens=6",
                      "experiment.n_examples=2", data_dir=tmp_path)
    run_dir = tmp_path / "run"
    app.run(cfg, run_dir)
    for name in ("results.parquet", "run.json", report.MATRIX_FILE, report.MATRIX_FIG, report.EXAMPLES_FIG):
        assert (run_dir / name).stat().st_size > 0, name
    df = pd.read_parquet(run_dir / "results.parquet")
    assert len(df) == 12 and set(df["task"]) == {"localization"}
    assert df.groupby("condition")["pad"].first().to_dict() == {"baseline": 0, "extension:p=1": 1, "extension:p=2": 2}
    assert (df.loc[df["pad"] == 0, "n_edited"] == 0).all() and (df.loc[df["pad"] > 0, "n_edited"] > 0).all()
    assert (df.sort_values("pad").groupby("sample_id")["n_edited"].apply(lambda s: s.is_monotonic_increasing)).all()
    assert set(GRID_COLUMNS) <= set(df.columns) and (df["cell_w"] > 0).all()
    md = (run_dir / report.MATRIX_FILE).read_text()
    assert "extension:p=2" in md and "GT+2" in md
    assert "| extension:p=1 |" in capsys.readouterr().out
    # a rerun does no new work and rebuilds the matrix from the parquet alone: with every prediction
    # replaced by the GT grown by p cells, the diagonal is 100 and best q = p
    from vlmloc.results import ResultStore

    store = ResultStore(run_dir)
    stored = store.load()
    stored["pred_box"] = [list(grow_box(r.gt_box, r.pad, r.cell_w, r.cell_h, r.width, r.height))
                      for r in stored.itertuples()]
    store.add(stored)
    monkeypatch.setattr(runner, "evaluate", lambda *a, **k: pytest.fail("a finished run must do no new work"))
    (run_dir / report.EXAMPLES_FIG).unlink()
    app.run(cfg, run_dir)
    m = report.extension_matrix(pd.read_parquet(run_dir / "results.parquet"), [0, 1, 2], NAMES).set_index("pad")
    assert [m.loc[p, f"q={p}"] for p in (0, 1, 2)] == [100, 100, 100] and list(m["best_q"]) == [0, 1, 2]
    assert (run_dir / report.EXAMPLES_FIG).exists()
    row = next(line for line in (run_dir / report.MATRIX_FILE).read_text().splitlines() if line.startswith("|   2 | extension:p=2"))
    cells = [c.strip() for c in row.split("|")]
    assert (cells[3], cells[6], cells[7]) == ("4", "100.00", "2")  # n, GT+2, best q


def test_the_gt_cell_is_the_global_views_by_default_or_the_local_canvas(tiny_internvl, tiny_llava):
    """900x300 on InternVL: the thumbnail's cell is 900/16 x 300/16 px; the local canvas's is finer.
    LLaVA has one grid: S/24 = 37.5 px on the 900x900 padded square, whichever cell is asked for."""
    lay = ext.layout_for_size(tiny_internvl, 900, 300)
    glob, loc = ext.grid_columns(lay), ext.grid_columns(lay, "local")
    assert (glob["grid_view"], glob["cell_w"], glob["cell_h"]) == ("global", 900 / 16, 300 / 16)
    assert loc["grid_view"] == "local" and loc["cell_w"] < glob["cell_w"] and loc["cell_h"] <= glob["cell_h"]
    llava = ext.layout_for_size(tiny_llava, 900, 300)
    assert ext.grid_columns(llava)["cell_w"] == ext.grid_columns(llava, "local")["cell_w"] == 900 / 24
    with pytest.raises(ValueError, match="experiment.cell"):
        ext.settings(compose_cfg("experiment=extension", "experiment.cell=thumbnail"))
