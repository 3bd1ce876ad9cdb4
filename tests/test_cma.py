"""Causal mediation per head: MF 0 without a patch, 1 with the full patch, batched = one at a time, end to end."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from conftest import compose_cfg, noise_image
from vlmloc import app, runner
from vlmloc.data import load_samples
from vlmloc.data.pairs import inpainted_name, read_manifest, sample_record, write_manifest
from vlmloc.engine.heads import HeadEdit, capture_heads, capture_layer_inputs, edit_heads, head_slice, run_from_layer
from vlmloc.engine.mediation import Target, answer_probability, head_mediation, mediation_fraction
from vlmloc.engine.readout import next_token_logprobs, yes_probability
from vlmloc.experiments.cma import check_pairs_model

ANSWER = " [0.12, 0.30, 0.55, 0.80]"


def _pair(ad, task):
    text = ad.prompt(task, "cat") + (ANSWER if task == "localization" else "")
    # square images: one InternVL tile keeps the many full forwards of these tests fast
    src = ad.prepare([noise_image(448, 448, 1)], [text])
    base = ad.prepare([noise_image(448, 448, 2)], [text])
    n = 0 if task == "classification" else src.seq_len - ad.prepare([noise_image(448, 448, 1)], [ad.prompt(task, "cat")]).seq_len
    return src, base, Target(n)


@pytest.mark.parametrize("family", ["tiny_llava", "tiny_internvl"])
@pytest.mark.parametrize("task", ["classification", "localization"])
def test_mf_is_zero_without_patch_and_one_with_full_patch(family, task, request):
    ad = request.getfixturevalue(family)
    src, base, target = _pair(ad, task)
    ids = base.inputs["input_ids"][0]
    with torch.no_grad():
        p_src = float(answer_probability(ad, ad.model(**src.inputs).logits, ids, target)[0])
        p_base = float(answer_probability(ad, ad.model(**base.inputs).logits, ids, target)[0])
        with edit_heads(ad, [[]]):  # patching no head gives the base run
            p_none = float(answer_probability(ad, ad.model(**base.inputs).logits, ids, target)[0])
    S = capture_heads(ad, src.inputs)
    start = int(base.layouts[0].positions.max()) + 1
    text_pos = np.arange(start, base.seq_len)
    every = [[HeadEdit(L, h, S[L][0, :, head_slice(ad, h)], text_pos) for L in range(ad.n_layers) for h in range(ad.n_heads)]]
    with edit_heads(ad, every), torch.no_grad():
        logits = ad.model(**base.inputs).logits
    # patching every head of every layer at every text position gives the source logits at text positions
    with torch.no_grad():
        src_logits = ad.model(**src.inputs).logits
    torch.testing.assert_close(logits[0, start:], src_logits[0, start:], atol=1e-4, rtol=1e-4)
    p_full = float(answer_probability(ad, logits, ids, target)[0])
    mf = mediation_fraction(p_src, p_base, np.array([p_none, p_full]), 0.0)
    assert mf[0] == pytest.approx(0.0, abs=1e-6) and mf[1] == pytest.approx(1.0, abs=1e-3)


@pytest.mark.parametrize("family", ["tiny_llava", "tiny_internvl"])
def test_batched_restart_equals_one_head_at_a_time(family, request):
    """Per-row patching from a restarted layer (all positions, and text-only with the prefix cache)
    equals a full forward with one head patched."""
    ad = request.getfixturevalue(family)
    src, base, target = _pair(ad, "localization")
    ids = base.inputs["input_ids"][0]
    for text_only in (False, True):
        p_src, p_base, patched = head_mediation(ad, src, base, target, text_only=text_only, heads_per_pass=3)
        S = capture_heads(ad, src.inputs)
        start = int(base.layouts[0].positions.max()) + 1
        pos = np.arange(start, base.seq_len) if text_only else None
        for layer in range(ad.n_layers):
            for head in range(ad.n_heads):
                with edit_heads(ad, [[HeadEdit(layer, head, S[layer][0, :, head_slice(ad, head)], pos)]]), torch.no_grad():
                    ref = float(answer_probability(ad, ad.model(**base.inputs).logits, ids, target)[0])
                assert patched[layer, head] == pytest.approx(ref, rel=1e-4, abs=1e-7)
    # restarting at a layer with no edit reproduces the clean run (prefix reuse equals recomputation)
    clean = capture_layer_inputs(ad, base.inputs)
    torch.testing.assert_close(run_from_layer(ad, clean, 1, 1, start=start)[0], clean.logits[0, start:], atol=1e-5, rtol=1e-5)


def test_small_denominator_is_reported_not_divided():
    assert np.isnan(mediation_fraction(0.5, 0.52, np.array([0.3, 0.4]), 0.05)).all()
    np.testing.assert_allclose(mediation_fraction(0.9, 0.1, np.array([0.1, 0.5, 0.9]), 0.05), [0.0, 0.5, 1.0])


def _make_pairs_dir(tmp_path, data_dir, n=2):
    """Pairs from synthetic scenes, the object removed by re-rendering the scene without it (oracle)."""
    from vlmloc.data.synthetic import render_scene
    import json

    samples, _ = load_samples(compose_cfg("data=synthetic", f"data.n={n}", data_dir=data_dir).data)
    pairs_dir = tmp_path / "pairs_run"
    (pairs_dir / "pairs").mkdir(parents=True)
    rows = []
    inst = json.loads((samples[0].image_path.parent.parent / "instances.json").read_text())
    specs = {im["id"]: im["vlmloc_scene"] for im in inst["images"]}
    obj_index = {a["id"]: a["vlmloc_object_index"] for a in inst["annotations"]}
    for s in samples:
        render_scene(specs[s.image_id], skip_objects=[obj_index[s.ann_id]]).save(pairs_dir / inpainted_name(s.sample_id))
        rows.append({**sample_record(s), "inpainted_path": inpainted_name(s.sample_id), "mask_margin_px": 0,
                     "hole_frac": 0.0, "inpaint_backend": "oracle", "inpaint_key": "test", "kept": True})
    write_manifest(pairs_dir, pd.DataFrame(rows))
    return pairs_dir, samples


def test_cma_end_to_end_and_resume(tmp_path, monkeypatch, tiny_llava):
    pairs_dir, samples = _make_pairs_dir(tmp_path, tmp_path / "data")
    cfg = compose_cfg("experiment=cma", "model=tiny_llava", "data=pairs", f"data.pairs_dir={pairs_dir}",
                      "model.localization.max_new_tokens=6", "experiment.min_denominator=0.0",
                      "experiment.localization_source_min_iou=null")  # keep every pair: a random model's boxes miss
    run_dir = tmp_path / "run"
    app.run(cfg, run_dir)
    mf = pd.read_parquet(run_dir / "mf.parquet")
    n_layers, n_heads = 2, 4
    assert len(mf) == len(samples) * 2 * n_layers * n_heads
    assert set(mf["task"]) == {"classification", "localization"}
    # the stored P columns against forwards run here, head patched by hand, and MF from those
    ad = tiny_llava
    for (layer, head) in ((0, 1), (1, 3)):
        row = mf[(mf["task"] == "classification") & (mf["layer"] == layer) & (mf["head"] == head)].iloc[0]
        sample = next(s for s in samples if s.sample_id == row["sample_id"])
        prompt = ad.prompt("classification", sample.category)
        src = ad.prepare([sample.load_image()], [prompt])
        base = ad.prepare([Image.open(pairs_dir / inpainted_name(sample.sample_id)).convert("RGB")], [prompt])
        with torch.no_grad():
            p_src = yes_probability(ad, next_token_logprobs(ad, src))[0]
            p_base = yes_probability(ad, next_token_logprobs(ad, base))[0]
            S = capture_heads(ad, src.inputs)
            with edit_heads(ad, [[HeadEdit(layer, head, S[layer][0, :, head_slice(ad, head)])]]):
                p_patched = yes_probability(ad, next_token_logprobs(ad, base))[0]
        assert (row["p_src"], row["p_base"], row["p_patched"]) == pytest.approx((p_src, p_base, p_patched), abs=1e-5)
        assert row["mf"] == pytest.approx((p_base - p_patched) / (p_base - p_src), rel=1e-3, abs=1e-5)
    summary = (run_dir / "cma_summary.md").read_text()
    assert "top 10 heads" in summary and "overlap between tasks" in summary and "critical: mean MF >= 0.1" in summary
    assert (run_dir / "fig4_cma_heatmaps.png").stat().st_size > 0
    monkeypatch.setattr(runner, "load_adapter", lambda cfg: pytest.fail("a finished run must not load the model"))
    app.run(cfg, run_dir)
    pd.testing.assert_frame_equal(pd.read_parquet(run_dir / "mf.parquet"), mf)


def test_localization_uses_only_pairs_whose_source_box_hits(tmp_path, monkeypatch):
    pairs_dir, samples = _make_pairs_dir(tmp_path, tmp_path / "data", n=4)
    # the trained demo model: its boxes hit some objects and miss others
    args = ("model=demo_llava", "data=pairs", f"data.pairs_dir={pairs_dir}")
    # the source answers' IoU as the evaluation scores them, on the original images
    app.run(compose_cfg("experiment=baseline", *args[:3], "tasks=[localization]"), tmp_path / "base")
    iou = pd.read_parquet(tmp_path / "base" / "results.parquet").set_index("sample_id")["iou"]
    assert iou.nunique() > 1, "the check below needs hits and misses"
    need = float(np.sort(iou.to_numpy())[len(iou) // 2])  # keeps the pairs at or above the median IoU
    run_dir = tmp_path / "run"
    cfg = compose_cfg("experiment=cma", *args, f"experiment.localization_source_min_iou={need}")
    app.run(cfg, run_dir)
    dropped = pd.read_parquet(run_dir / "excluded_pairs.parquet")
    mf = pd.read_parquet(run_dir / "mf.parquet")
    missed = sorted(iou.index[iou < need])
    assert missed and sorted(dropped["sample_id"]) == missed and set(dropped["task"]) == {"localization"}
    np.testing.assert_allclose(dropped.set_index("sample_id").loc[missed, "source_iou"], iou[missed], atol=1e-9)
    loc = mf[mf["task"] == "localization"]
    assert sorted(loc["sample_id"].unique()) == sorted(iou.index[iou >= need])
    assert set(mf.loc[mf["task"] == "classification", "sample_id"]) == set(iou.index)  # classification keeps all
    assert f"localization: {len(missed)} pairs dropped before patching because the source box missed" in (run_dir / "cma_summary.md").read_text()
    monkeypatch.setattr(runner, "load_adapter", lambda cfg: pytest.fail("a finished run must not load the model"))
    app.run(cfg, run_dir)  # the dropped pairs count as done


def test_pairs_kept_by_another_model_are_refused(tmp_path, monkeypatch, caplog):
    pairs_dir, _ = _make_pairs_dir(tmp_path, tmp_path / "data")
    manifest = read_manifest(pairs_dir)
    write_manifest(pairs_dir, manifest.assign(model="demo_llava@0123456789ab"))
    monkeypatch.setattr(runner, "load_adapter", lambda cfg: pytest.fail("the model must not load"))
    args = ("experiment=cma", "model=tiny_llava", "data=pairs", f"data.pairs_dir={pairs_dir}")
    with pytest.raises(ValueError, match=r"kept by the answers of model demo_llava, not model=tiny_llava"):
        app.run(compose_cfg(*args), tmp_path / "run")
    check_pairs_model(compose_cfg(*args, "model=demo_llava"))  # the model that made them
    with caplog.at_level("WARNING"):
        check_pairs_model(compose_cfg(*args, "experiment.other_model_pairs=warn"))
    assert "kept by the answers of model demo_llava" in caplog.text


def test_cma_needs_pairs():
    with pytest.raises(ValueError, match="experiment=cma needs source/base pairs"):
        app.run(compose_cfg("experiment=cma", "model=tiny_llava", "data=synthetic"), "/tmp/unused")


@pytest.mark.parametrize("family", ["tiny_llava", "tiny_internvl"])
def test_restart_shortcuts_equal_the_full_layers(family, request):
    """keep_last (last layer's MLP on kept positions only) and reuse_attention (the restart layer's
    attention taken from the clean run) reproduce the clean logits, at start 0 and after the image."""
    ad = request.getfixturevalue(family)
    _, base, _ = _pair(ad, "localization")
    clean = capture_layer_inputs(ad, base.inputs)
    text_start = int(base.layouts[0].positions.max()) + 1
    for start in (0, text_start):
        for layer in range(ad.n_layers):
            out = run_from_layer(ad, clean, layer, 2, start=start, keep_last=3, reuse_attention=True)
            assert out.shape[:2] == (2, 3)
            torch.testing.assert_close(out, clean.logits[:, -3:].expand(2, -1, -1), atol=1e-5, rtol=1e-5)
    # the reused attention output is really read: perturbing it changes the result
    clean.heads[0] = clean.heads[0] + 1.0
    out = run_from_layer(ad, clean, 0, 1, keep_last=3, reuse_attention=True)
    assert (out - clean.logits[:, -3:]).abs().max() > 1e-3


def test_product_probability_of_a_long_answer_is_finite_and_its_mf_exact(tiny_llava):
    """A 35-token answer at log P ~ -3.2 per token: P = e^-112, zero in float32. P and MF against
    float64 hand computations."""
    ad, n, vocab = tiny_llava, 35, 50
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (n + 5,), generator=gen)
    logits = torch.randn(3, n + 5, vocab, generator=gen) * 0.5
    p = answer_probability(ad, logits, ids, Target(n, "product")).numpy()
    logp = torch.log_softmax(logits.double(), -1).numpy()
    hand = [math.exp(sum(logp[r, -n - 1 + i, int(ids[-n + i])] for i in range(n))) for r in range(3)]
    assert all(0 < v < 1e-40 for v in hand), "the premise: each P is below float32's range"
    np.testing.assert_allclose(p, hand, rtol=1e-5)
    p_src, p_base, p_patched = p[0], p[1], p[2:]
    mf = mediation_fraction(p_src, p_base, p_patched, 0.0)
    np.testing.assert_allclose(mf, [(hand[1] - hand[2]) / (hand[1] - hand[0])], rtol=1e-4)


def test_cma_sharded_by_pair_merges_to_the_single_process_result(tmp_path, tiny_llava, monkeypatch):
    from vlmloc.shards import shard_of

    pairs_dir, samples = _make_pairs_dir(tmp_path, tmp_path / "data", n=5)
    base = ("experiment=cma", "model=tiny_llava", "data=pairs", f"data.pairs_dir={pairs_dir}",
            "model.localization.max_new_tokens=4", "experiment.min_denominator=0.0",
            "experiment.localization_source_min_iou=0.5")  # a random model's boxes miss: pairs are left out
    key = ["sample_id", "task", "layer", "head"]

    def run(count: int, name: str) -> tuple[pd.DataFrame, pd.DataFrame, str]:
        for index in range(count):  # one after another, in this process
            app.run(compose_cfg(*base, f"shard.count={count}", f"shard.index={index}", data_dir=tmp_path / "data"),
                    tmp_path / name, adapter=tiny_llava)
        d = tmp_path / name
        mf = pd.read_parquet(d / "mf.parquet").sort_values(key).reset_index(drop=True)
        left = pd.read_parquet(d / "excluded_pairs.parquet").sort_values(["sample_id", "task"]).reset_index(drop=True)
        return mf, left, (d / "cma_summary.md").read_text()

    one_mf, one_left, one_summary = run(1, "one")
    assert one_mf["sample_id"].nunique() == len(samples) and len(one_left) > 0
    mf, left, summary = run(2, "two")
    pd.testing.assert_frame_equal(mf, one_mf, check_dtype=False, atol=1e-6)
    pd.testing.assert_frame_equal(left, one_left, check_dtype=False)
    assert summary == one_summary
    # after a crash before the merge, shard.merge_only=true merges and reports, computing nothing
    for name in ("mf.parquet", "cma_summary.md"):
        (tmp_path / "two" / name).unlink()
    monkeypatch.setattr(runner, "load_adapter", lambda cfg: pytest.fail("a merge must not load the model"))
    app.run(compose_cfg(*base, "shard.count=2", "shard.merge_only=true", data_dir=tmp_path / "data"), tmp_path / "two",
            adapter=None)
    again = pd.read_parquet(tmp_path / "two" / "mf.parquet").sort_values(key).reset_index(drop=True)
    pd.testing.assert_frame_equal(again, mf)
    assert (tmp_path / "two" / "cma_summary.md").read_text() == one_summary
    # each shard analysed only its own pairs
    for i in range(2):
        own = pd.read_parquet(tmp_path / "two" / f"mf.shard-{i}-of-2.parquet")
        assert set(own["sample_id"]) == {s.sample_id for s in samples if shard_of(s.sample_id, 2) == i}
