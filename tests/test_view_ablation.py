"""View ablation (InternVL): edits hit exactly one view's object tokens; size bins; tables; LLaVA refused; end to end."""

from __future__ import annotations

import importlib.util

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import compose_cfg
from test_extension import lm_input, make_sample, reuse_adapter
from vlmloc import app
from vlmloc.conditions import Resources, realize
from vlmloc.experiments import view_ablation as va
from vlmloc.models import GLOBAL, LOCAL
from vlmloc.reports import view_ablation as report


def _edits(cond, sample, layout, task, **named):
    """The LM-input edits `cond` realizes to for one row (named: the resources it reads)."""
    return realize(cond, sample, layout, task, 0, Resources(**named)).edits


def stand_in_mean(adapter) -> torch.Tensor:
    """A stand-in for the cached mean visual embedding: any fixed [hidden] vector."""
    return torch.linspace(-1, 1, int(adapter.text_config.hidden_size))


def test_view_conditions_edit_exactly_the_object_tokens_of_the_view(tiny_internvl, tmp_path):
    ad = tiny_internvl
    mean = stand_in_mean(ad)
    # a 900x300 image (3x1 crops + thumbnail) and a 448x448 one (a single tile, labelled global)
    samples = [
        make_sample(tmp_path, 900, 300, [350, 80, 560, 120, 420, 230], sid="wide"),
        make_sample(tmp_path, 448, 448, [100, 100, 300, 140, 200, 320], sid="square", seed=1),
    ]
    conds = va.view_conditions()
    assert [c.name for c in conds] == [
        "baseline", "object_tokens:view=global", "object_tokens:view=local", "object_tokens:view=both"]
    items = [(s, c) for s in samples for c in conds]
    batch = ad.prepare([s.load_image() for s, _ in items], [ad.prompt("classification", "cat")] * len(items))
    edits = [_edits(c, s, lay, "classification", mean_embedding=mean) for (s, c), lay in zip(items, batch.layouts)]
    clean, edited = lm_input(ad, batch, edits)
    for row, ((sample, cond), lay) in enumerate(zip(items, batch.layouts)):
        obj = lay.object_tokens(sample.mask(), 0)
        view = cond.columns["view"]
        want = {"none": np.zeros_like(obj), "global": obj & (lay.view == GLOBAL),
                "local": obj & (lay.view == LOCAL), "both": obj}[view]
        changed = torch.nonzero((edited[row] != clean[row]).any(-1)).flatten().numpy()
        np.testing.assert_array_equal(changed, np.sort(lay.positions[want]), err_msg=f"{sample.sample_id} {cond.name}")
        if want.any():
            assert torch.equal(edited[row, torch.as_tensor(lay.positions[want])], mean.expand(int(want.sum()), -1))
        if sample.sample_id == "wide" and view in ("global", "local"):
            assert 0 < want.sum() < obj.sum()  # one view only, and it holds object tokens
        if sample.sample_id == "square":
            assert lay.n_tiles == 1 and (view != "local" or not want.any())


def test_view_ablation_on_llava_fails_fast_with_a_clear_message(tmp_path, monkeypatch):
    cfg = compose_cfg("experiment=view_ablation", "model=tiny_llava", "data=synthetic", "data.n=2",
                      "data.synthetic.n_images=2", data_dir=tmp_path)
    msg = "view_ablation needs a model with global and local views (InternVL); model=tiny_llava is llava"
    with pytest.raises(ValueError, match=r"view_ablation needs a model with global and local views \(InternVL\); model=tiny_llava is llava"):
        va.check_config(cfg)
    monkeypatch.setattr("vlmloc.runner.load_adapter", lambda *a, **k: pytest.fail("the model must not be loaded"))
    monkeypatch.setattr("vlmloc.resources.mean_visual_embedding", lambda *a, **k: pytest.fail("no mean embedding work"))
    with pytest.raises(ValueError) as err:
        app.run(cfg, tmp_path / "run")
    assert str(err.value) == msg
    assert not (tmp_path / "run" / "results.parquet").exists()
    va.check_config(compose_cfg("experiment=view_ablation", "model=internvl8b"))  # InternVL passes


def test_the_coco_sizes_preset_keeps_the_small_bin_and_coco_warns(caplog):
    small_edge = compose_cfg("experiment=view_ablation").experiment.size_bins.edges[0]
    sizes = compose_cfg("experiment=view_ablation", "model=internvl8b", "data=coco_sizes", "data.root=/x")
    # a 20x20 px object on 640x480 is COCO-small and kept; 0.01 would drop everything below 55x55 px
    assert sizes.data.filters.min_area_frac <= 20 * 20 / (640 * 480) < small_edge
    assert sizes.data.annotations == "/x/annotations/instances_valrem.json" and sizes.data.kind == "coco"
    with caplog.at_level("WARNING"):
        va.check_config(sizes)
    assert "will be empty" not in caplog.text
    with caplog.at_level("WARNING"):
        va.check_config(compose_cfg("experiment=view_ablation", "model=internvl8b", "data=coco", "data.root=/x"))
    assert "the 'small' bin will be empty (on COCO use data=coco_sizes" in caplog.text


def test_size_bins_default_to_coco_sizes_relative_to_640x480():
    cfg = compose_cfg("experiment=view_ablation", "model=tiny_internvl")
    edges, labels = va.check_bins(cfg.experiment.size_bins.edges, cfg.experiment.size_bins.labels)
    assert edges == pytest.approx([32**2 / (640 * 480), 96**2 / (640 * 480)], abs=1e-4) and labels == ["small", "medium", "large"]
    got = report.size_bins(pd.Series([0.001, 0.0033, 0.02, 0.03, 0.6]), edges, labels)
    assert list(got) == ["small", "medium", "medium", "large", "large"]  # left-closed
    with pytest.raises(ValueError, match="need 3 labels"):
        va.check_bins([0.1, 0.2], ["a", "b"])
    with pytest.raises(ValueError, match="increase strictly"):
        va.check_bins([0.2, 0.1], ["a", "b", "c"])


def _cls(cond, correct, area, thumb=True, sid="x"):
    return {"sample_id": sid, "image_id": 0, "category": "c", "task": "classification", "condition": cond,
            "answer": "", "pred_box": None, "gt_box": [0.0, 0.0, 1.0, 1.0], "iou": np.nan, "hit_50": None,
            "hit_70": None, "hit_90": None, "p_yes": 0.9 if correct else 0.1, "correct": correct,
            "area_frac": area, "has_thumbnail": thumb}


def test_view_table_deltas_per_size_bin_and_single_tile_kept_apart():
    rows = []
    # two medium objects, one large: global ablation breaks the large one, local one medium one
    for sid, area in (("m1", 0.01), ("m2", 0.02), ("l1", 0.2)):
        rows.append(_cls("baseline", True, area, sid=sid))
        rows.append(_cls("object_tokens:view=global", sid != "l1", area, sid=sid))
        rows.append(_cls("object_tokens:view=local", sid != "m1", area, sid=sid))
    # a single-tile image that fails everything: must not enter the main table
    rows.append(_cls("baseline", False, 0.2, thumb=False, sid="s1"))
    rows.append(_cls("object_tokens:view=global", False, 0.2, thumb=False, sid="s1"))
    long = report.view_table(pd.DataFrame(rows), [0.0033, 0.03], ["small", "medium", "large"])
    multi = long[long["group"] == "multi_tile"].set_index(["size_bin", "condition"])
    assert multi.loc[("medium", "object_tokens:view=local"), "delta"] == pytest.approx(-50)
    assert multi.loc[("medium", "object_tokens:view=global"), "delta"] == pytest.approx(0)
    assert multi.loc[("large", "object_tokens:view=global"), "delta"] == pytest.approx(-100)
    assert multi.loc[("all", "baseline"), "accuracy"] == pytest.approx(100) and multi.loc[("all", "baseline"), "n"] == 3
    assert "small" not in multi.index.get_level_values(0)
    single = long[long["group"] == "single_tile"]
    assert set(single["size_bin"]) == {"large", "all"} and (single["n"] == 1).all()
    md = report.table_markdown(long, [c.name for c in va.view_conditions(["global", "local"])], [0.0033, 0.03], ["small", "medium", "large"], "head")
    assert "1 single-tile object(s) reported separately" in md and "medium (n=2)" in md


def test_view_ablation_end_to_end_tiny_internvl(tiny_internvl, tmp_path, monkeypatch, capsys):
    reuse_adapter(monkeypatch, tiny_internvl)
    # wide scenes (aspect ~2) -> 2x1 crops + thumbnail, so every object has both views
    cfg = compose_cfg("experiment=view_ablation", "model=tiny_internvl", "data=synthetic", "data.n=2",
                      "data.synthetic.n_images=4", "data.synthetic.width=[480,520]", "data.synthetic.height=[240,250]",
                      "model.localization.max_new_tokens=6", f"paths.cache_dir={tmp_path / 'cache'}", data_dir=tmp_path)
    if importlib.util.find_spec("vlmloc.engine.mean_embedding") is None:  # the lead's cache is not there yet
        monkeypatch.setattr(va, "load_mean_embedding", lambda ctx: stand_in_mean(ctx.adapter))
    run_dir = tmp_path / "run"
    app.run(cfg, run_dir)
    for name in ("results.parquet", "run.json", report.TABLE_FILE, report.FIG_FILE):
        assert (run_dir / name).stat().st_size > 0, name
    df = pd.read_parquet(run_dir / "results.parquet")
    assert len(df) == 2 * 2 * 4
    assert df["has_thumbnail"].all() and (df["n_tiles"] == 3).all()
    edited = df.groupby("condition")["n_edited"].sum()
    assert edited["baseline"] == 0 and 0 < edited["object_tokens:view=global"] < edited["object_tokens:view=both"]
    assert edited["object_tokens:view=global"] + edited["object_tokens:view=local"] == edited["object_tokens:view=both"]
    assert set(df["size_bin"]) <= {"small", "medium", "large"}
    md = (run_dir / report.TABLE_FILE).read_text()
    assert "Change vs baseline" in md and "object_tokens:view=local" in md
    assert "# View ablation (Table 3)" in capsys.readouterr().out


def _thumbnail_object_tokens(sample, grid: int) -> list[int]:
    """Token indices of the thumbnail (the whole image squeezed to one tile, grid x grid cells of
    W/grid x H/grid original pixels) whose cell overlaps a mask pixel, brute force."""
    mask = sample.mask()
    h, w = mask.shape
    out = []
    for r in range(grid):
        for c in range(grid):
            x0, x1, y0, y1 = c * w / grid, (c + 1) * w / grid, r * h / grid, (r + 1) * h / grid
            cols = [j for j in range(w) if j + 1 > x0 + 1e-9 and j < x1 - 1e-9]
            rows = [i for i in range(h) if i + 1 > y0 + 1e-9 and i < y1 - 1e-9]
            if mask[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].any():
                out.append(r * grid + c)
    return out


def test_global_view_rows_equal_a_forward_with_the_thumbnail_edited_by_hand(tiny_internvl, tmp_path):
    """object_tokens:view=global replaces the object's tokens of the thumbnail (the last tile) with
    the mean embedding: its stored P(yes) equals a forward whose LM input the test edits itself."""
    from vlmloc.engine.readout import yes_probability
    from vlmloc.runner import RunContext

    cfg = compose_cfg("experiment=view_ablation", "model=tiny_internvl", "data=synthetic", "data.n=2",
                      "data.synthetic.n_images=4", "data.synthetic.width=[480,520]", "data.synthetic.height=[240,250]",
                      "tasks=[classification]", "mean_embedding.n_images=2", f"paths.cache_dir={tmp_path / 'cache'}",
                      data_dir=tmp_path)
    app.run(cfg, tmp_path / "run", adapter=tiny_internvl)
    df = pd.read_parquet(tmp_path / "run" / "results.parquet")
    (mean_file,) = (tmp_path / "cache" / "mean_embedding").glob("*.pt")
    mean = torch.load(mean_file)
    ad, model = tiny_internvl, tiny_internvl.model
    for sample in RunContext(cfg=cfg, run_dir=tmp_path / "run").samples:
        batch = ad.prepare([sample.load_image()], [ad.prompt("classification", sample.category)])
        image_pos = torch.nonzero(batch.inputs["input_ids"][0] == model.config.image_token_id).flatten()
        per_tile = int(ad.processor.image_seq_length)
        assert len(image_pos) == 3 * per_tile  # two local crops and the thumbnail
        grid = int(round(per_tile ** 0.5))
        thumb = image_pos[2 * per_tile:][_thumbnail_object_tokens(sample, grid)]

        def edit(module, args, kwargs):
            kwargs["inputs_embeds"] = kwargs["inputs_embeds"].clone()
            kwargs["inputs_embeds"][0, thumb] = mean.to(kwargs["inputs_embeds"].dtype)
            return args, kwargs

        handle = model.model.language_model.register_forward_pre_hook(edit, with_kwargs=True)
        try:
            with torch.no_grad():
                logits = model(**batch.inputs).logits[:, -1].float()
        finally:
            handle.remove()
        p_yes = float(yes_probability(ad, torch.log_softmax(logits, -1))[0])
        rows = df[df.sample_id == sample.sample_id].set_index("condition")
        assert int(rows.loc["object_tokens:view=global", "n_edited"]) == len(thumb) > 0
        assert float(rows.loc["object_tokens:view=global", "p_yes"]) == pytest.approx(p_yes, abs=1e-5)
        assert abs(p_yes - float(rows.loc["baseline", "p_yes"])) > 1e-6  # the edit moves P(yes)
