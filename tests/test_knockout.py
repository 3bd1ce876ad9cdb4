"""Attention knockout: exact zero weights, sdpa = eager, no-op and refusal cases, generated
positions blocked, per-row batching, and experiment=knockout end to end."""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import compose_cfg, noise_image
from vlmloc import app, runner
from vlmloc.data.sample import Sample
from vlmloc.engine.knockout import Knockout, knockout, post_image_queries
from vlmloc.engine.readout import generate
from vlmloc.conditions import Resources, realize
from vlmloc.evaluation import evaluate
from vlmloc.experiments import knockout as ko_exp
from vlmloc.experiments.knockout import layer_sets

SHORT, LONG = "cat", "a rather long traffic light"


def _sample(tmp_path, sid="1-1", category=SHORT, w=300, h=200, box=(60, 40, 90, 80), seed=3) -> Sample:
    path = tmp_path / f"{sid}.png"
    noise_image(w, h, seed).save(path)
    x, y, bw, bh = box
    poly = [[x, y, x + bw, y, x + bw, y + bh, x, y + bh]]
    return Sample(sid, int(sid.split("-")[0]), int(sid.split("-")[1]), path, w, h, category, 1, (x, y, bw, bh), poly, bw * bh)


def _padded_batch(ad, task="classification"):
    """Two rows, the first left padded (shorter prompt)."""
    batch = ad.prepare([noise_image(300, 200, 0), noise_image(300, 200, 1)], [ad.prompt(task, SHORT), ad.prompt(task, LONG)])
    assert batch.inputs["attention_mask"][0, 0] == 0 and batch.inputs["attention_mask"][1].all()
    return batch


def _logits(ad, batch, specs=None, **kw):
    with torch.no_grad(), knockout(ad, specs or []):
        return ad.model(**batch.inputs, **kw)


def test_blocked_pairs_get_zero_weight_and_sdpa_agrees_with_eager(tiny_llava):
    ad = tiny_llava
    eager = type(ad)(copy.deepcopy(ad.model), ad.processor, ad.cfg, ad.device)
    eager.model.set_attn_implementation("eager")
    batch = _padded_batch(ad)
    T = batch.seq_len
    lay0, lay1 = batch.layouts
    specs = [
        Knockout.make(post_image_queries(lay0.positions, T), lay0.positions[100:160], [0, 1]),
        Knockout.make(post_image_queries(lay1.positions, T), lay1.positions[:300], [1]),
    ]
    out = _logits(eager, batch, specs, output_attentions=True)
    for row, spec in enumerate(specs):
        q, k = torch.as_tensor(spec.queries), torch.as_tensor(spec.keys)
        for layer in range(ad.n_layers):
            weights = out.attentions[layer][row][:, q][:, :, k]  # [heads, |q|, |k|]
            if layer in spec.layers:
                assert torch.count_nonzero(weights) == 0, (row, layer)
            else:
                assert (weights > 0).all(), "unblocked pairs attend: the check above can fail"
        # the knocked-out rows still attend somewhere: each row sums to 1
        for layer in spec.layers:
            torch.testing.assert_close(out.attentions[layer][row][:, q].sum(-1), torch.ones(ad.n_heads, len(q)))
    sdpa = _logits(ad, batch, specs).logits
    clean = _logits(ad, batch).logits
    real = batch.inputs["attention_mask"].bool()
    torch.testing.assert_close(sdpa[real], out.logits[real], atol=1e-4, rtol=1e-4)
    assert (sdpa[real] - clean[real]).abs().max() > 1e-3, "the knockout must change the logits"


def test_empty_knockout_equals_the_clean_run(tiny_llava):
    ad = tiny_llava
    batch = _padded_batch(ad)
    lay = batch.layouts[0]
    clean = _logits(ad, batch).logits
    q = post_image_queries(lay.positions, batch.seq_len)
    for specs in ([Knockout.none(), Knockout.none()],
                  [Knockout.make(q, [], [0, 1]), Knockout.make([], lay.positions, [0])],
                  [Knockout.make(q, lay.positions, []), Knockout.none()]):
        assert torch.equal(_logits(ad, batch, specs).logits, clean)
    # a knockout whose pairs are already causally masked (keys after every query) changes nothing
    future = Knockout.make(lay.positions[:10], post_image_queries(lay.positions, batch.seq_len), [0, 1])
    real = batch.inputs["attention_mask"].bool()
    torch.testing.assert_close(_logits(ad, batch, [future, Knockout.none()]).logits[real], clean[real], atol=1e-5, rtol=1e-5)


def test_knockout_blocking_every_key_of_a_query_raises(tiny_llava):
    ad = tiny_llava
    batch = _padded_batch(ad)
    q = batch.seq_len - 1
    every_key = Knockout.make([q], range(batch.seq_len), [1])
    with pytest.raises(ValueError, match="every key"):
        _logits(ad, batch, [every_key, Knockout.none()])
    # one key left (the last token attends to itself): fine
    _logits(ad, batch, [Knockout.make([q], range(q), [1]), Knockout.none()])


def test_knockout_blocks_generated_positions_at_decode_steps(tiny_llava, tmp_path):
    ad = tiny_llava
    sample = _sample(tmp_path)
    (cond,) = [c for c in ko_exp.conditions(1, ko_exp.settings(compose_cfg("experiment=knockout")), seed=0)
               if c.name == "knockout:object:layer=0"]
    images = [sample.load_image(), noise_image(300, 200, 1)]
    batch = ad.prepare(images, [ad.prompt("localization", SHORT), ad.prompt("localization", LONG)])
    T = batch.seq_len
    spec = realize(cond, sample, batch.layouts[0], "localization", T, Resources(new_tokens={"localization": 4})).knockout
    assert set(range(T, T + 4)) <= set(spec.queries.tolist())
    assert spec.layers == {0} and len(spec.keys) == 56
    seen: dict[int, list[torch.Tensor]] = {0: [], 1: []}

    def spy(layer):
        def hook(module, args, kwargs):
            mask = kwargs["attention_mask"]
            if kwargs["hidden_states"].shape[1] == 1:  # a decoding step: the query is a generated token
                seen[layer].append(mask.clone())
        return hook

    with knockout(ad, [spec, Knockout.none()]):
        handles = [ad.self_attn(i).register_forward_pre_hook(spy(i), with_kwargs=True) for i in (0, 1)]
        try:
            generate(ad, batch, 4)
        finally:
            for h in handles:
                h.remove()
    assert len(seen[0]) == 3 and len(seen[1]) == 3  # 4 tokens: prefill + 3 decoding steps
    keys = torch.as_tensor(spec.keys)
    for step, (m0, m1) in enumerate(zip(seen[0], seen[1])):
        assert m0.dtype == torch.bool and m0.shape[-1] == T + step + 1
        assert not m0[0, 0, 0, keys].any(), "layer 0, row 0: the object's keys are blocked for the generated query"
        assert m0[1, 0, 0, keys].all(), "row 1 has no knockout"
        assert m1[0, 0, 0, keys].all(), "layer 1 is not knocked out"
        assert m0[0, 0, 0, T:].all(), "generated keys stay visible"


def test_per_row_knockout_conditions_in_one_batch_equal_one_at_a_time(tiny_llava, tmp_path):
    ad = tiny_llava
    samples = [_sample(tmp_path, "1-1", SHORT), _sample(tmp_path, "2-1", LONG, box=(150, 100, 120, 90), seed=4)]
    conds = [c for c in ko_exp.conditions(2, ko_exp.settings(compose_cfg("experiment=knockout")), seed=0)
             if c.name in ("baseline", "knockout:object:layers=0-1", "knockout:random:layers=0-1")]
    assert len(conds) == 3
    together = evaluate(ad, samples, ["classification"], batch_size=8, conditions=conds, progress=False)
    alone = pd.concat([evaluate(ad, [s], ["classification"], batch_size=1, conditions=[c], progress=False) for s in samples for c in conds])
    merged = together.merge(alone, on=["sample_id", "condition"], suffixes=("", "_alone"))
    assert len(merged) == 6
    np.testing.assert_allclose(merged["p_yes"], merged["p_yes_alone"], atol=1e-5)
    assert (merged["knockout_keys"] == merged["knockout_keys_alone"].fillna(0)).all()  # baseline alone: no knockout column
    p = together.set_index(["sample_id", "condition"])["p_yes"]
    assert p[("1-1", "baseline")] != p[("1-1", "knockout:object:layers=0-1")], "the knockout must change the answer"
    keys = together.set_index(["sample_id", "condition"])["knockout_keys"]
    assert keys[("1-1", "knockout:random:layers=0-1")] == keys[("1-1", "knockout:object:layers=0-1")] == 56
    assert keys[("1-1", "baseline")] == 0


def test_layer_sets_and_condition_names():
    windows = ["layers=0-5", "layers=6-11", "layers=12-17", "layers=18-23", "layers=24-29", "layers=30-31"]
    assert [s.label for s in layer_sets(32, 6, False)] == windows
    assert [s.label for s in layer_sets(36, 6, False)][-1] == "layers=30-35"
    sets = layer_sets(3, 2, True)
    assert [s.label for s in sets] == ["layers=0-1", "layers=2-2", "layer=0", "layer=1", "layer=2"]
    assert list(sets[1].layers) == [2]
    st = ko_exp.settings(compose_cfg("experiment=knockout"))
    names = [c.name for c in ko_exp.conditions(32, st, seed=0)]
    assert len(names) == 1 + 2 * (6 + 32) and names[1] == "knockout:object:layers=0-5" and names[-1] == "knockout:random:layer=31"
    for bad in ("experiment.key_sets=[object,nearby]", "experiment.window=0", "experiment.query_set=all",
                "model.attn_implementation=flash_attention_2"):
        with pytest.raises(ValueError):
            ko_exp.check_config(compose_cfg("experiment=knockout", bad))


@pytest.mark.parametrize("model", ["tiny_llava", pytest.param("tiny_internvl", marks=pytest.mark.slow)])
def test_knockout_end_to_end(model, request, tmp_path, monkeypatch):
    tiny = request.getfixturevalue(model)
    cfg = compose_cfg("experiment=knockout", f"model={model}", "data=synthetic", "data.n=2", "data.synthetic.n_images=4",
                      "model.localization.max_new_tokens=4", "batch_size=16", data_dir=tmp_path / "data")
    # the session's tiny model with this run's model config (saves building it again)
    monkeypatch.setattr(runner, "load_adapter", lambda mcfg: type(tiny)(tiny.model, tiny.processor, mcfg, tiny.device))
    run_dir = tmp_path / "run"
    app.run(cfg, run_dir)
    df = pd.read_parquet(run_dir / "results.parquet")
    names = [c.name for c in ko_exp.conditions(2, ko_exp.settings(cfg), seed=0)]
    assert names == ["baseline", "knockout:object:layers=0-1", "knockout:object:layer=0", "knockout:object:layer=1",
                     "knockout:random:layers=0-1", "knockout:random:layer=0", "knockout:random:layer=1"]
    assert list(pd.unique(df["condition"])) == names
    assert len(df) == 2 * 2 * len(names)
    keys = df.groupby(["sample_id", "keys"])["knockout_keys"].mean().unstack()
    assert (keys["object"] == keys["random"]).all() and (keys["object"] > 0).all() and (keys["none"] == 0).all()
    assert set(df.loc[df["keys"] == "object", "layers"]) == {"0-1", "0", "1"}
    table = (run_dir / "fig3_knockout.md").read_text()
    assert "| knockout:random:layer=1" in table and "loc_delta" in table and "cls_delta" in table
    assert (run_dir / "fig3_knockout.png").stat().st_size > 0
    monkeypatch.setattr(runner, "load_adapter", lambda mcfg: pytest.fail("a finished run must not load the model"))
    app.run(cfg, run_dir)
    pd.testing.assert_frame_equal(pd.read_parquet(run_dir / "results.parquet"), df)


def test_knockout_rows_equal_a_forward_with_a_hand_built_mask(tiny_llava, tmp_path):
    """knockout:object:layers=0-1 blocks every layer of the tiny model: its stored P(yes) equals a
    forward whose 4-D mask, built here, hides the object's tokens (found by brute force) from
    every position after the image."""
    import torch

    from conftest import hand_object_tokens
    from vlmloc.engine.readout import yes_probability

    cfg = compose_cfg("experiment=knockout", "model=tiny_llava", "data=synthetic", "data.n=2",
                      "data.synthetic.n_images=4", "model.localization.max_new_tokens=4", "tasks=[classification]",
                      data_dir=tmp_path / "data")
    app.run(cfg, tmp_path / "run", adapter=tiny_llava)
    df = pd.read_parquet(tmp_path / "run" / "results.parquet")
    ad, model = tiny_llava, tiny_llava.model
    for sample in runner.RunContext(cfg=cfg, run_dir=tmp_path / "run").samples:
        batch = ad.prepare([sample.load_image()], [ad.prompt("classification", sample.category)])
        ids = batch.inputs["input_ids"][0]
        image_pos = torch.nonzero(ids == model.config.image_token_id).flatten()
        keys = image_pos[hand_object_tokens(sample)]
        T = len(ids)
        allowed = torch.ones(T, T).tril().bool()
        allowed[int(image_pos.max()) + 1:, keys] = False
        mask = torch.zeros(1, 1, T, T).masked_fill(~allowed, torch.finfo(torch.float32).min)
        with torch.no_grad():
            logits = model(**{k: v for k, v in batch.inputs.items() if k != "attention_mask"},
                           attention_mask=mask).logits[:, -1].float()
            clean = model(**batch.inputs).logits[:, -1].float()
        p_yes, p_clean = (float(yes_probability(ad, torch.log_softmax(x, -1))[0]) for x in (logits, clean))
        rows = df[df.sample_id == sample.sample_id].set_index("condition")
        assert int(rows.loc["knockout:object:layers=0-1", "knockout_keys"]) == len(keys) > 0
        assert float(rows.loc["knockout:object:layers=0-1", "p_yes"]) == pytest.approx(p_yes, abs=1e-5)
        assert float(rows.loc["baseline", "p_yes"]) == pytest.approx(p_clean, abs=1e-5)
        assert abs(p_yes - p_clean) > 1e-4  # the block changes the answer's probability: the check can fail
