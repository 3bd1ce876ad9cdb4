"""Head ablation: right-aligned head means, a one-sample mean ablation reproduces the run, per-row
batching, MF ranking, random heads matched per layer, config errors, experiment=head_ablation end to end."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import compose_cfg, noise_image
from vlmloc import app, runner
from vlmloc.data.sample import Sample
from vlmloc.engine.head_means import head_means
from vlmloc.engine.heads import capture_heads, edit_heads
from vlmloc.conditions import BASELINE, AblateHeads, Condition, Resources, realize
from vlmloc.evaluation import evaluate
from vlmloc.experiments import head_ablation as ha
from vlmloc.experiments.head_ablation import Plan
from vlmloc.head_ranking import k_values, rank_heads, random_heads, top_heads

TASK = "classification"


def _ablate(ad, kind, means, heads, sample, layout, seq_len):
    """The head edits a condition ablating `heads` on TASK realizes to for one row."""
    cond = Condition("heads", (AblateHeads(((TASK, tuple(heads)),), kind),))
    return realize(cond, sample, layout, TASK, seq_len, Resources(adapter=ad, head_means=means)).heads


def _sample(tmp_path, sid: str, category: str, seed: int) -> Sample:
    path = tmp_path / f"{sid}.png"
    noise_image(300, 200, seed).save(path)
    x, y, bw, bh = 60, 40, 90, 80
    poly = [[x, y, x + bw, y, x + bw, y + bh, x, y + bh]]
    return Sample(sid, int(sid.split("-")[0]), 1, path, 300, 200, category, 1, (x, y, bw, bh), poly, bw * bh)


@pytest.fixture
def two_samples(tmp_path):
    """Two samples whose prompts differ in length: a batch of both left pads the first."""
    return [_sample(tmp_path, "1-1", "cat", 3), _sample(tmp_path, "2-1", "a rather long traffic light", 4)]


def _logits(ad, batch, edits=None):
    with torch.no_grad(), edit_heads(ad, edits or [[] for _ in range(batch.batch_size)]):
        return ad.model(**batch.inputs).logits


def mf_frame(values: dict[tuple[str, int, int], list[float]], positions: str = "all") -> pd.DataFrame:
    """A hand-made cma mf.parquet frame: (task, layer, head) -> MF per sample; NaN = invalid row."""
    rows = []
    for (task, layer, head), mfs in values.items():
        for i, mf in enumerate(mfs):
            valid = not np.isnan(mf)
            rows.append({"sample_id": f"s{i}", "image_id": i, "category": "circle", "task": task, "layer": layer,
                         "head": head, "positions": positions, "p_src": 0.9, "p_base": 0.1, "p_patched": 0.5,
                         "denominator": 0.8, "mf": mf, "valid": valid})
    df = pd.DataFrame(rows)
    df["layer"], df["head"] = df["layer"].astype("int64"), df["head"].astype("int64")
    return df


def tiny_mf(n_layers: int = 2, n_heads: int = 4) -> pd.DataFrame:
    """Every head of both tasks; classification favours layer 0, localization layer 1."""
    values = {}
    for task in ("classification", "localization"):
        for layer in range(n_layers):
            for head in range(n_heads):
                favoured = (layer == 0) == (task == "classification")
                values[(task, layer, head)] = [float(favoured) + 0.1 * head, 0.5 * head, np.nan]
    return pd.concat([mf_frame(values), mf_frame({k: [-1.0] for k in values}, positions="text")], ignore_index=True)


def test_head_means_average_positions_of_the_same_role(tiny_llava, two_samples):
    """Hand computation from each prompt's own run: the chat prefix aligned on the image start,
    the 576 visual tokens one by one, the text after the image aligned on the sequence end;
    generated tokens take the mean of the text positions (or of every prompt position)."""
    ad = tiny_llava
    runs = []
    for s in two_samples:
        batch = ad.prepare([s.load_image()], [ad.prompt(TASK, s.category)])
        lay = batch.layouts[0]
        x = capture_heads(ad, batch.inputs)[1][0].float()  # layer 1, [T_i, H*D]
        img0, img1 = int(lay.positions.min()), int(lay.positions.max()) + 1
        runs.append({"prefix": x[:img0], "image": x[img0:img1], "text": x[img1:], "all": x})
    short, long = runs
    assert len(long["text"]) > len(short["text"]) and len(short["prefix"]) == len(long["prefix"])
    for bs in (1, 2):
        m = head_means(ad, two_samples, TASK, 2, batch_size=bs)
        close = lambda a, b: torch.testing.assert_close(a.float(), b, atol=1e-5, rtol=1e-5)  # noqa: E731
        close(m.image[1][:576], (short["image"] + long["image"]) / 2)  # LLaVA: key = token index
        close(m.prefix[1][: len(short["prefix"])].flip(0), (short["prefix"] + long["prefix"]) / 2)
        n = len(short["text"])
        close(m.text[1][:n].flip(0), (short["text"] + long["text"][-n:]) / 2)
        close(m.text[1][len(long["text"]) - 1], long["text"][0])  # only the longer text reaches here
        close(m.tail[1], torch.cat([short["text"], long["text"]]).mean(0))
    prompt_tail = head_means(ad, two_samples, TASK, 2, answer_mean="prompt").tail[1]
    torch.testing.assert_close(prompt_tail.float(), torch.cat([short["all"], long["all"]]).mean(0), atol=1e-5, rtol=1e-5)
    # a left-padded row of a batch of both: each position takes its role's mean
    batch = ad.prepare([s.load_image() for s in two_samples], [ad.prompt(TASK, s.category) for s in two_samples])
    lay = batch.layouts[0]
    value, tail = m.row_value(1, lay, batch.seq_len)
    img0, img1 = int(lay.positions.min()), int(lay.positions.max()) + 1
    torch.testing.assert_close(value[img0:img1].float(), (short["image"] + long["image"]) / 2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(value[-1].float(), (short["text"][-1] + long["text"][-1]) / 2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(value[img0 - 1].float(), (short["prefix"][-1] + long["prefix"][-1]) / 2, atol=1e-5, rtol=1e-5)
    assert torch.equal(tail, m.tail[1])
    with pytest.raises(ValueError, match="answer_mean"):
        head_means(ad, two_samples, TASK, 2, answer_mean="all")


def test_mean_ablation_with_a_one_sample_mean_reproduces_that_run(tiny_llava, two_samples):
    ad = tiny_llava
    s1, s2 = two_samples
    heads = [(layer, head) for layer in range(ad.n_layers) for head in range(ad.n_heads)]
    own = {TASK: head_means(ad, [s1], TASK, 1)}
    single = ad.prepare([s1.load_image()], [ad.prompt(TASK, s1.category)])
    clean = _logits(ad, single)
    lay = single.layouts[0]
    assert torch.equal(_logits(ad, single, [_ablate(ad, "mean", own, heads, s1, lay, single.seq_len)]), clean)
    # another sample's mean, or zero, changes the run: the check above can fail
    other = {TASK: head_means(ad, [s2], TASK, 1)}
    assert (_logits(ad, single, [_ablate(ad, "mean", other, heads, s1, lay, single.seq_len)]) - clean).abs().max() > 1e-3
    assert (_logits(ad, single, [_ablate(ad, "zero", None, heads[:2], s1, lay, single.seq_len)]) - clean).abs().max() > 1e-4
    # left padded inside a batch (s1's prompt is the shorter one): still its own run at its real positions
    batch = ad.prepare([s1.load_image(), s2.load_image()], [ad.prompt(TASK, s.category) for s in two_samples])
    assert batch.seq_len > single.seq_len
    ablated = _logits(ad, batch, [_ablate(ad, "mean", own, heads, s1, batch.layouts[0], batch.seq_len), []])
    torch.testing.assert_close(ablated[0, -single.seq_len:], clean[0], atol=1e-5, rtol=1e-5)


def test_per_row_head_conditions_in_one_batch_equal_one_at_a_time(tiny_llava, two_samples):
    ad = tiny_llava
    st = ha.settings(compose_cfg("experiment=head_ablation", "experiment.cma_dir=unused", "experiment.ks=[1,3]"))
    plan = Plan({t: rank_heads(tiny_mf(), t) for t in ("classification", "localization")}, st)
    means = Resources(head_means={TASK: head_means(ad, two_samples, TASK, 2)})
    conds = ha.conditions(plan, ad.n_heads, seed=0)
    (cls3,) = [c for c in conds if c.name == "heads:cls_critical:k=3"]
    assert cls3.tasks == ("localization",) and cls3.interventions == (
        AblateHeads((("localization", tuple(top_heads(plan.ranks["classification"], 3))),), "mean"),)
    assert evaluate(ad, two_samples, [TASK], batch_size=8, conditions=[cls3], progress=False).empty
    # cls_critical is measured on localization only; here its heads are ablated on classification
    conds = [c for c in conds if c.name in (BASELINE.name, "heads:top:k=1", "heads:random:k=3")] + [
        Condition("cls_heads_on_cls", (AblateHeads(((TASK, tuple(top_heads(plan.ranks["classification"], 3))),)),))]
    together = evaluate(ad, two_samples, [TASK], batch_size=8, conditions=conds, progress=False, resources=means)
    alone = pd.concat([evaluate(ad, [s], [TASK], batch_size=1, conditions=[c], progress=False, resources=means)
                       for s in two_samples for c in conds])
    merged = together.merge(alone, on=["sample_id", "condition"], suffixes=("", "_alone"))
    assert len(merged) == 8
    np.testing.assert_allclose(merged["p_yes"], merged["p_yes_alone"], atol=1e-5)
    edited = together.set_index(["sample_id", "condition"])["heads_edited"]
    assert edited[("1-1", "heads:top:k=1")] == 1 and edited[("1-1", "heads:random:k=3")] == 3 and edited[("1-1", BASELINE.name)] == 0
    p = together.set_index(["sample_id", "condition"])["p_yes"]
    assert p[("1-1", "heads:random:k=3")] != p[("1-1", BASELINE.name)], "the ablation must change the answer"


def test_rank_heads_on_a_hand_made_frame():
    nan = float("nan")
    df = mf_frame({
        ("localization", 0, 0): [0.2, 0.4],          # mean 0.3
        ("localization", 0, 1): [0.9, nan],          # mean 0.9 (the invalid row is ignored)
        ("localization", 1, 0): [nan, nan],          # no valid row: last
        ("localization", 1, 3): [0.3, 0.3],          # ties (0, 0) at 0.3: layer 0 first
        ("classification", 1, 2): [5.0, 5.0],        # another task
    })
    huge_invalid = mf_frame({("localization", 1, 1): [100.0]})
    huge_invalid["valid"] = False  # an invalid row never counts, whatever its mf
    text_rows = mf_frame({("localization", 1, 2): [50.0]}, positions="text")
    r = rank_heads(pd.concat([df, huge_invalid, text_rows], ignore_index=True), "localization", "all")
    assert list(r.columns) == ["layer", "head", "mean_mf", "median_mf", "pooled_mf", "n"]
    assert list(zip(r["layer"], r["head"])) == [(0, 1), (0, 0), (1, 3), (1, 0), (1, 1)]
    np.testing.assert_allclose(r["mean_mf"].iloc[:3], [0.9, 0.3, 0.3])
    assert r["mean_mf"].iloc[3:].isna().all() and r["n"].tolist() == [1, 2, 2, 0, 0]
    assert rank_heads(text_rows, "localization", "text")[["layer", "head"]].values.tolist() == [[1, 2]]
    with pytest.raises(ValueError, match="no MF rows"):
        rank_heads(df, "localization", "text")
    assert k_values([1, 2, 50, "all"], 8) == [1, 2, 8]


def test_median_and_pooled_mf_rank_against_a_small_denominator():
    """Head 0: one pair with a tiny denominator and MF 2, two pairs with MF 0.025; head 1: MF 0.5
    three times. The mean ranks head 0 first (0.683 > 0.5); the median and the pooled MF (sums of
    numerators and denominators) rank head 1 first. Values computed by hand."""
    rows = []
    for head, pairs in ((0, [(0.10, 0.16, 0.22), (0.1, 0.9, 0.12), (0.1, 0.9, 0.12)]),   # (p_base, p_src, p_patched)
                        (1, [(0.1, 0.9, 0.5)] * 3)):
        for pb, ps, pp in pairs:
            rows.append({"task": "localization", "layer": 0, "head": head, "positions": "all", "p_base": pb, "p_src": ps,
                         "p_patched": pp, "mf": (pb - pp) / (pb - ps), "valid": True})
    df = pd.DataFrame(rows)
    r = rank_heads(df, "localization", "all", "mean").set_index("head")
    np.testing.assert_allclose(r.loc[[0, 1], "mean_mf"], [(2.0 + 0.025 + 0.025) / 3, 0.5])
    np.testing.assert_allclose(r.loc[[0, 1], "median_mf"], [0.025, 0.5])
    np.testing.assert_allclose(r.loc[[0, 1], "pooled_mf"], [(-0.12 - 0.02 - 0.02) / (-0.06 - 0.8 - 0.8), 0.5])
    assert rank_heads(df, "localization", "all", "mean")["head"].tolist() == [0, 1]
    for by in ("median", "pooled"):
        assert rank_heads(df, "localization", "all", by)["head"].tolist() == [1, 0]
    with pytest.raises(ValueError, match="ranked by one of"):
        rank_heads(df, "localization", "all", "max")


def test_random_heads_are_matched_per_layer():
    top = [(3, 1), (3, 5), (7, 0), (12, 6), (12, 2), (12, 3)]
    draws = [random_heads(top, 8, seed, "t") for seed in range(400)]
    for d in draws:
        assert Counter(layer for layer, _ in d) == Counter(layer for layer, _ in top)
        assert len(set(d)) == len(d) and all(0 <= h < 8 for _, h in d)
    assert len({tuple(d) for d in draws}) > 1
    assert random_heads(top, 8, 0, "t") == draws[0]
    # uniform within a layer: layer 12 takes 3 of 8 heads, so each head is drawn 3/8 of the time
    share = Counter(h for d in draws for layer, h in d if layer == 12)
    assert all(abs(share[h] / len(draws) - 3 / 8) < 0.1 for h in range(8))
    # nested: growing the top set by one head grows the random set by one head of the same layer
    for seed in range(20):
        sets = [set(random_heads(top[:k], 8, seed, "t")) for k in range(1, len(top) + 1)]
        for smaller, larger, added in zip(sets, sets[1:], top[1:]):
            assert smaller < larger and len(larger - smaller) == 1 and next(iter(larger - smaller))[0] == added[0]
    # the experiment's random set for k is matched to that task's top-k set, the same in every call
    st = ha.settings(compose_cfg("experiment=head_ablation", "experiment.cma_dir=unused"))
    plan = Plan({t: rank_heads(tiny_mf(4, 8), t) for t in ("classification", "localization")}, st)
    for task in ("classification", "localization"):
        for k in plan.ks:
            top_k, rnd = plan.heads("top", k, task, 8, 0), plan.heads("random", k, task, 8, 0)
            assert Counter(layer for layer, _ in rnd) == Counter(layer for layer, _ in top_k) and len(set(rnd)) == k
            assert rnd == plan.heads("random", k, task, 8, 0)
        sets = [set(plan.heads("random", k, task, 8, 0)) for k in plan.ks]
        assert all(a < b for a, b in zip(sets, sets[1:])), "the random sets nest as k grows"
    assert plan.heads("top", 4, "localization", 8, 0) != plan.heads("top", 4, "classification", 8, 0)
    assert plan.heads("cls_critical", 4, "localization", 8, 0) == plan.heads("top", 4, "classification", 8, 0)
    assert plan.ks == [1, 2, 5, 10, 20, 32]


def test_config_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match="needs experiment.cma_dir"):
        ha.check_config(compose_cfg("experiment=head_ablation"))
    with pytest.raises(FileNotFoundError, match="experiment=cma"):
        ha.check_config(compose_cfg("experiment=head_ablation", f"experiment.cma_dir={tmp_path}"))
    good = tiny_mf()
    for broken, match in ((good.drop(columns="valid"), "lacks column"), (good.assign(valid=good["valid"].astype(int)), "boolean"),
                          (good.assign(task="detection"), "unknown task"), (good.assign(valid=False), "no valid MF row")):
        broken.to_parquet(tmp_path / "mf.parquet")
        with pytest.raises(ValueError, match=match):
            ha.check_config(compose_cfg("experiment=head_ablation", f"experiment.cma_dir={tmp_path}"))
    (tmp_path / "mf.parquet").write_text("not parquet")
    with pytest.raises(ValueError, match="not a readable parquet"):
        ha.check_config(compose_cfg("experiment=head_ablation", f"experiment.cma_dir={tmp_path}"))
    good.to_parquet(tmp_path / "mf.parquet")
    ha.check_config(compose_cfg("experiment=head_ablation", f"experiment.cma_dir={tmp_path}"))
    for bad in ("experiment.ablation=resample", "experiment.ks=[0]", "experiment.head_sets=[top,best]", "experiment.mf_positions=image"):
        with pytest.raises(ValueError):
            ha.check_config(compose_cfg("experiment=head_ablation", f"experiment.cma_dir={tmp_path}", bad))
    (tmp_path / "run.json").write_text(json.dumps({"config": {"model": {"name": "llava7b"}}}))
    with pytest.raises(ValueError, match="used model=llava7b"):
        ha.check_config(compose_cfg("experiment=head_ablation", f"experiment.cma_dir={tmp_path}"))


@pytest.mark.parametrize("model", ["tiny_llava", pytest.param("tiny_internvl", marks=pytest.mark.slow)])
def test_head_ablation_end_to_end(model, request, tmp_path, monkeypatch):
    tiny = request.getfixturevalue(model)
    cma = tmp_path / "cma"
    cma.mkdir()
    tiny_mf().to_parquet(cma / "mf.parquet")
    cfg = compose_cfg("experiment=head_ablation", f"model={model}", f"experiment.cma_dir={cma}", "experiment.ks=[1,all]",
                      "experiment.mean_samples=2",
                      "data=synthetic", "data.n=2", "data.synthetic.n_images=4", "model.localization.max_new_tokens=4",
                      "batch_size=16", data_dir=tmp_path / "data")
    monkeypatch.setattr(runner, "load_adapter", lambda mcfg: type(tiny)(tiny.model, tiny.processor, mcfg, tiny.device))
    run_dir = tmp_path / "run"
    app.run(cfg, run_dir)
    df = pd.read_parquet(run_dir / "results.parquet")
    names = ["baseline", "heads:top:k=1", "heads:top:k=8", "heads:random:k=1", "heads:random:k=8",
             "heads:cls_critical:k=1", "heads:cls_critical:k=8"]
    assert list(pd.unique(df["condition"])) == names
    per_task = df.groupby("task")["condition"].nunique().to_dict()
    assert per_task == {"classification": 5, "localization": 7}  # cls_critical: localization only
    assert len(df) == 2 * (5 + 7)
    assert (df["heads_edited"] == df["k"]).all()
    assert set(df.loc[df["head_set"] == "cls_critical", "ranking"]) == {"classification"}
    text = (run_dir / "fig5_head_ablation.md").read_text()
    assert "| heads:cls_critical:k=8" in text and "Top 8 heads by mean MF: localization" in text
    assert (run_dir / "fig5_head_ablation.png").stat().st_size > 0
    info = json.loads((run_dir / "run.json").read_text())
    assert info["head_ablation"]["top_heads"]["localization"][0] == [1, 3]
    monkeypatch.setattr(runner, "load_adapter", lambda mcfg: pytest.fail("a finished run must not load the model"))
    app.run(cfg, run_dir)
    pd.testing.assert_frame_equal(pd.read_parquet(run_dir / "results.parquet"), df)


def test_head_ablation_rows_equal_a_forward_with_the_head_zeroed_by_hand(tiny_llava, tmp_path):
    """heads:top:k=1 with ablation=zero: classification's top head in the hand-made MF frame is
    (layer 0, head 3); its stored P(yes) equals a forward whose o_proj input slice of that head is
    zeroed at every position by a hook registered here."""
    from vlmloc.engine.readout import yes_probability

    cma = tmp_path / "cma"
    cma.mkdir()
    tiny_mf().to_parquet(cma / "mf.parquet")
    cfg = compose_cfg("experiment=head_ablation", "model=tiny_llava", f"experiment.cma_dir={cma}", "experiment.ks=[1]",
                      "experiment.ablation=zero", "tasks=[classification]", "data=synthetic", "data.n=2",
                      "data.synthetic.n_images=4", data_dir=tmp_path / "data")
    app.run(cfg, tmp_path / "run", adapter=tiny_llava)
    df = pd.read_parquet(tmp_path / "run" / "results.parquet")
    ad, model = tiny_llava, tiny_llava.model
    d = ad.head_dim
    o_proj = model.model.language_model.layers[0].self_attn.o_proj

    def zero_head_3(module, args):
        x = args[0].clone()
        x[..., 3 * d:4 * d] = 0
        return (x,)

    for sample in runner.RunContext(cfg=cfg, run_dir=tmp_path / "run").samples:
        batch = ad.prepare([sample.load_image()], [ad.prompt("classification", sample.category)])
        handle = o_proj.register_forward_pre_hook(zero_head_3)
        try:
            with torch.no_grad():
                logits = model(**batch.inputs).logits[:, -1].float()
        finally:
            handle.remove()
        with torch.no_grad():
            clean = model(**batch.inputs).logits[:, -1].float()
        p_zero, p_clean = (float(yes_probability(ad, torch.log_softmax(x, -1))[0]) for x in (logits, clean))
        rows = df[df.sample_id == sample.sample_id].set_index("condition")
        assert float(rows.loc["heads:top:k=1", "p_yes"]) == pytest.approx(p_zero, abs=1e-5)
        assert float(rows.loc["baseline", "p_yes"]) == pytest.approx(p_clean, abs=1e-5)
        assert abs(p_zero - p_clean) > 1e-5  # the ablation moves P(yes): the check can fail
