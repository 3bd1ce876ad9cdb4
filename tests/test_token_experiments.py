"""Table 1 and Table 2 experiments end to end on tiny models (CPU), with resume."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from conftest import compose_cfg, hand_object_tokens
from vlmloc import app, runner
from vlmloc.experiments import token_ablation

FAST = ("experiment.integrated_gradients.steps=2", "experiment.integrated_gradients.batch_size=2",
        "model.localization.max_new_tokens=8")


@pytest.mark.parametrize("model", ["tiny_llava", pytest.param("tiny_internvl", marks=pytest.mark.slow)])
def test_token_ablation_end_to_end(model, tmp_path, monkeypatch):
    cfg = compose_cfg("experiment=token_ablation", f"model={model}", "data=synthetic", "data.n=2",
                      f"paths.cache_dir={tmp_path / 'cache'}", *FAST, data_dir=tmp_path / "data")
    run_dir = tmp_path / "run"
    app.run(cfg, run_dir)
    df = pd.read_parquet(run_dir / "results.parquet")
    names = [c.name for c in token_ablation.conditions(token_ablation.settings(cfg), int(cfg.seed))]
    assert list(pd.unique(df["condition"])) == names
    assert len(df) == 2 * 2 * len(names)
    frac = df.groupby("condition")["frac_edited"].mean()
    assert frac["baseline"] == 0
    # growing the mask ablates more tokens; random and IG ablate as many as the object
    assert frac["object_tokens:p=-2"] <= frac["object_tokens:p=-1"] <= frac["object_tokens"] < frac["object_tokens:p=+1"] < frac["object_tokens:p=+2"]
    assert frac["random_tokens"] == pytest.approx(frac["object_tokens"])
    assert frac["integrated_gradients"] == pytest.approx(frac["object_tokens"])
    table = (run_dir / "table1_token_ablation.md").read_text()
    assert "| object_tokens:p=+2" in table and "loc_delta" in table
    assert list((tmp_path / "cache" / "mean_embedding").glob("*.pt"))
    # IG's completeness per target; f(x) of a localization target equals a plain teacher-forced forward
    comp = pd.read_parquet(run_dir / "ig_completeness.parquet")
    assert len(comp) == 4 and set(comp["task"]) == {"classification", "localization"} and (comp["steps"] == 2).all()
    assert (comp["gap"] - (comp["attribution_sum"] - (comp["f_x"] - comp["f_b"]))).abs().max() < 1e-6
    assert (comp["f_x"] != comp["f_b"]).all()
    from vlmloc.data import load_samples
    from vlmloc.engine.readout import answer_logprobs
    from vlmloc.models import load_adapter

    ad = load_adapter(cfg.model)
    sample = load_samples(cfg.data)[0][0]
    clean = df[(df["condition"] == "baseline") & (df["task"] == "localization") & (df["sample_id"] == sample.sample_id)]
    prompt = ad.prompt("localization", sample.category)
    answer = str(ad.cfg.classification.answer_prefix) + clean["answer"].iloc[0]
    full = ad.prepare([sample.load_image()], [prompt + answer])
    n_answer = full.seq_len - ad.prepare([sample.load_image()], [prompt]).seq_len
    with torch.no_grad():
        logp = torch.log_softmax(ad.model(**full.inputs).logits.float(), dim=-1)
    want = float(answer_logprobs(logp, full.inputs["input_ids"][0, -n_answer:]).sum())
    got = comp[(comp["sample_id"] == sample.sample_id) & (comp["task"] == "localization")]["f_x"].iloc[0]
    assert got == pytest.approx(want, abs=1e-3)
    # rerun: nothing to do, the adapter is never built
    monkeypatch.setattr(runner, "load_adapter", lambda cfg: pytest.fail("a finished run must not load the model"))
    app.run(cfg, run_dir)
    pd.testing.assert_frame_equal(pd.read_parquet(run_dir / "results.parquet"), df)


def test_token_ablation_rows_equal_a_forward_edited_by_hand(tmp_path, tiny_llava):
    """The stored P(yes) of object_tokens and the register scores against the model's own modules,
    run here: the mean embedding over the first images, the object's tokens found by brute force,
    the projector output at those positions replaced, one forward."""
    import torch

    from vlmloc.engine.readout import yes_probability
    from vlmloc.resources import register_scores

    cfg = compose_cfg("experiment=token_ablation", "model=tiny_llava", "data=synthetic", "data.n=3",
                      "mean_embedding.n_images=2", f"paths.cache_dir={tmp_path / 'cache'}", *FAST,
                      data_dir=tmp_path / "data")
    app.run(cfg, tmp_path / "run", adapter=tiny_llava)
    df = pd.read_parquet(tmp_path / "run" / "results.parquet")
    ctx = runner.RunContext(cfg=cfg, run_dir=tmp_path / "run")
    samples = ctx.samples
    ad, model = tiny_llava, tiny_llava.model
    mcfg = model.config

    def features(sample) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """(vision features [576, d_v], projector output [576, hidden], the prepared inputs)."""
        batch = ad.prepare([sample.load_image()], [ad.prompt("classification", sample.category)])
        with torch.no_grad():
            vt = model.model.vision_tower(batch.inputs["pixel_values"], output_hidden_states=True)
            feats = vt.hidden_states[mcfg.vision_feature_layer][:, 1:]  # strategy "default": drop CLS
            return feats[0].float(), model.model.multi_modal_projector(feats)[0], batch.inputs

    firsts = list(dict.fromkeys(s.image_id for s in samples))[:2]
    ref = [next(s for s in samples if s.image_id == i) for i in firsts]
    mean = torch.cat([features(s)[1].double() for s in ref]).mean(0)
    scores = register_scores(ad, samples, batch_size=2)
    for sample in samples:
        feats, proj, inputs = features(sample)
        torch.testing.assert_close(torch.as_tensor(scores[sample.sample_id]), feats.norm(dim=-1), rtol=1e-4, atol=1e-5)
        ids = inputs["input_ids"][0]
        image_pos = torch.nonzero(ids == mcfg.image_token_id).flatten()
        assert len(image_pos) == 576
        with torch.no_grad():
            embeds = model.get_input_embeddings()(inputs["input_ids"]).clone()
            embeds[0, image_pos] = proj.to(embeds.dtype)
            obj = hand_object_tokens(sample)
            embeds[0, image_pos[obj]] = mean.to(embeds.dtype)
            logits = model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"]).logits[:, -1].float()
        p_yes = float(yes_probability(ad, torch.log_softmax(logits, -1))[0])
        row = df[(df.sample_id == sample.sample_id) & (df.task == "classification") & (df.condition == "object_tokens")]
        assert len(row) == 1 and int(row["n_edited"].iloc[0]) == len(obj) > 0
        assert float(row["p_yes"].iloc[0]) == pytest.approx(p_yes, abs=1e-5)


def test_shuffle_end_to_end(tmp_path):
    cfg = compose_cfg("experiment=shuffle", "model=tiny_internvl", "data=synthetic", "data.n=3",
                      "model.localization.max_new_tokens=8", data_dir=tmp_path / "data")
    app.run(cfg, tmp_path / "run")
    df = pd.read_parquet(tmp_path / "run" / "results.parquet")
    assert list(pd.unique(df["condition"])) == ["baseline", "shuffle:global", "shuffle:object"]
    frac = df.groupby("condition")["frac_edited"].mean()
    assert frac["shuffle:global"] == 1.0 and 0 < frac["shuffle:object"] < 1
    assert "| shuffle:object" in (tmp_path / "run" / "table2_shuffle.md").read_text()


def test_shuffle_rows_equal_a_forward_permuted_by_hand(tmp_path, tiny_llava):
    """The stored P(yes) of both shuffle scopes against one forward whose projector output the test
    permutes itself: global = every visual token moved by the sample's seeded draw, object = only the
    object's tokens (found by brute force) permuted among themselves, the rest in place."""
    import numpy as np
    import torch

    from vlmloc.engine.readout import yes_probability
    from vlmloc.seeds import row_rng

    cfg = compose_cfg("experiment=shuffle", "model=tiny_llava", "data=synthetic", "data.n=3", "tasks=[classification]",
                      data_dir=tmp_path / "data")
    app.run(cfg, tmp_path / "run", adapter=tiny_llava)
    df = pd.read_parquet(tmp_path / "run" / "results.parquet")
    ad, model = tiny_llava, tiny_llava.model
    mcfg = model.config
    seed = int(cfg.seed)
    for sample in runner.RunContext(cfg=cfg, run_dir=tmp_path / "run").samples:
        batch = ad.prepare([sample.load_image()], [ad.prompt("classification", sample.category)])
        inputs = batch.inputs
        image_pos = torch.nonzero(inputs["input_ids"][0] == mcfg.image_token_id).flatten()
        obj = np.asarray(hand_object_tokens(sample))
        assert 0 < len(obj) < 576
        perm_global = row_rng(seed, sample.sample_id, "shuffle", "global").permutation(576)
        perm_object = np.arange(576)
        perm_object[obj] = obj[row_rng(seed, sample.sample_id, "shuffle", "object").permutation(len(obj))]
        with torch.no_grad():
            vt = model.model.vision_tower(inputs["pixel_values"], output_hidden_states=True)
            proj = model.model.multi_modal_projector(vt.hidden_states[mcfg.vision_feature_layer][:, 1:])[0]
            for name, perm in (("shuffle:global", perm_global), ("shuffle:object", perm_object)):
                embeds = model.get_input_embeddings()(inputs["input_ids"]).clone()
                embeds[0, image_pos] = proj[torch.as_tensor(perm)].to(embeds.dtype)  # token i gets token perm[i]
                logits = model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"]).logits[:, -1].float()
                p_yes = float(yes_probability(ad, torch.log_softmax(logits, -1))[0])
                row = df[(df.sample_id == sample.sample_id) & (df.condition == name)]
                assert len(row) == 1
                assert float(row["p_yes"].iloc[0]) == pytest.approx(p_yes, abs=1e-5), name
                moved = int((perm != np.arange(576)).sum())
                assert int(row["n_edited"].iloc[0]) == (576 if name == "shuffle:global" else len(obj)), moved


@pytest.mark.parametrize("family", ["tiny_llava", "tiny_internvl"])
def test_integrated_gradients_batched_across_targets_equal_each_target_alone(family, request):
    """Passes that mix path points of several targets (different images, so InternVL's tile counts
    and sequence lengths differ and rows are left padded; yes/no, list and box answers) give each
    target the attribution and f values it gets alone, within float32 tolerance."""
    import numpy as np
    import torch

    from conftest import noise_image
    from vlmloc.engine.attribution import Target, integrated_gradients, integrated_gradients_batch

    ad = request.getfixturevalue(family)
    mean = torch.randn(ad.text_config.hidden_size, generator=torch.Generator().manual_seed(0)) * 0.1
    targets = [
        Target(noise_image(448, 448, 1), ad.prompt("classification", "cat"), None),
        Target(noise_image(900, 300, 2), ad.prompt("localization", "dog"), " [0.12, 0.30, 0.55, 0.80]"),
        Target(noise_image(300, 500, 3), ad.prompt("classification", "traffic light"), " circle, square, a cat"),
        Target(lambda: noise_image(640, 480, 4), ad.prompt("localization", "cat"), " [0.5, 0.5, 0.9, 0.9]"),
    ]
    steps = 6
    alone = [integrated_gradients(ad, t.image if not callable(t.image) else t.image(), t.prompt, answer=t.answer,
                                  baseline=mean, steps=steps, batch_size=steps) for t in targets]
    # 6 points per target in passes of 4 rows: every pass but the middle ones straddles two targets
    mixed = integrated_gradients_batch(ad, targets, baseline=mean, steps=steps, batch_size=4, endpoints=True)
    assert len(mixed) == len(targets)
    for (a_attr, a_fx, a_fb), (m_attr, m_fx, m_fb) in zip(alone, mixed):
        assert m_attr.shape == a_attr.shape
        scale = float(np.abs(a_attr).max())
        np.testing.assert_allclose(m_attr, a_attr, rtol=0, atol=1e-4 * scale)
        assert m_fx == pytest.approx(a_fx, rel=1e-5, abs=1e-5) and m_fb == pytest.approx(a_fb, rel=1e-5, abs=1e-5)
    # without endpoints only the attributions come back (f values NaN), the same ones
    plain = integrated_gradients_batch(ad, targets, baseline=mean, steps=steps, batch_size=4)
    for (p_attr, p_fx, _), (m_attr, _, _) in zip(plain, mixed):
        assert np.array_equal(p_attr, m_attr) and np.isnan(p_fx)


def test_integrated_gradients_split_a_pass_that_runs_out_of_memory_and_keep_the_result(tiny_llava, monkeypatch, caplog):
    """A pass of more than 2 path points raises CUDA's out-of-memory error (as InternVL-8B's 3.3k-token
    prompts at 8 points did on an H200): the points are retried in halves, later passes keep 2, the
    retry is logged, and every target's attribution equals a plain run at 2 points per pass."""
    import logging

    import numpy as np
    import torch

    from conftest import noise_image
    from vlmloc.engine import attribution
    from vlmloc.engine.attribution import Target, integrated_gradients_batch

    ad = tiny_llava
    targets = [Target(noise_image(448, 448, 1), ad.prompt("classification", "cat"), None),
               Target(noise_image(900, 300, 2), ad.prompt("localization", "dog"), " [0.12, 0.30, 0.55, 0.80]")]
    want = integrated_gradients_batch(ad, targets, steps=6, batch_size=2)
    real, sizes = attribution._path_gradients, []

    def tight(adapter, chunk, *args):
        sizes.append(len(chunk))
        if len(chunk) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (test)")
        return real(adapter, chunk, *args)

    monkeypatch.setattr(attribution, "_path_gradients", tight)
    with caplog.at_level(logging.WARNING, logger="vlmloc.engine"):
        got = integrated_gradients_batch(ad, targets, steps=6, batch_size=8)
    assert sizes == [8, 4, 2, 2, 2, 2, 2, 2]  # 12 points: 8 fails, its halves of 4 fail, then passes of 2
    assert sum("out of GPU memory on 8 path points" in r.message for r in caplog.records) == 1
    for (g, _, _), (w, _, _) in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-5 * float(np.abs(w).max()))

    def never(adapter, chunk, *args):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (test)")

    monkeypatch.setattr(attribution, "_path_gradients", never)
    with pytest.raises(torch.cuda.OutOfMemoryError):  # one point that does not fit is the caller's error
        integrated_gradients_batch(ad, targets[:1], steps=2, batch_size=2)


@pytest.mark.parametrize("family", ["tiny_llava", "tiny_internvl"])
def test_vision_once_per_image_gives_the_outputs_of_every_row_encoded(family, request):
    """A batch with repeated images (InternVL: repeated tiles of several images) under
    vision_once_per_image: the encoder sees each distinct pixel row once, and the logits and
    generated answers equal those of the plain batch."""
    import torch

    from conftest import noise_image
    from vlmloc.engine.hooks import Hooks
    from vlmloc.engine.readout import generate
    from vlmloc.engine.shared_images import vision_once_per_image

    ad = request.getfixturevalue(family)
    a, b = noise_image(448, 448, 1), noise_image(900, 300, 2)
    batch = ad.prepare([a, b, a, a, b], [ad.prompt("localization", c) for c in ("cat", "dog", "dog", "cat", "cat")])
    seen: list[int] = []

    def count(call, _out) -> None:
        pixels = call.args[0] if call.args else call.kwargs["pixel_values"]
        seen.append(int(pixels.shape[0]))

    with torch.no_grad():
        plain = ad.model(**batch.inputs).logits
        with vision_once_per_image(ad), Hooks().after(ad.vision_tower, count):
            shared = ad.model(**batch.inputs).logits
    n_rows = int(batch.inputs["pixel_values"].shape[0])
    tiles_a, tiles_b = (ad.prepare([im], [ad.prompt("localization", "cat")]).inputs["pixel_values"].shape[0]
                        for im in (a, b))
    assert n_rows == 3 * tiles_a + 2 * tiles_b and seen == [tiles_a + tiles_b]
    torch.testing.assert_close(shared, plain, rtol=1e-5, atol=1e-5)
    with vision_once_per_image(ad):
        answers = generate(ad, batch, 6)
    assert answers == generate(ad, batch, 6)


def test_distinct_rows_confirms_equal_sums_exactly():
    """Rows 0, 1, 3 share a sum but only 0 and 3 are equal; row 2 is alone; first occurrence order."""
    import torch

    from vlmloc.engine.shared_images import distinct_rows

    pixels = torch.tensor([[1.0, 2.0], [2.0, 1.0], [5.0, 5.0], [1.0, 2.0], [5.0, 5.0], [0.0, 3.0]]).view(6, 1, 2, 1)
    firsts, inverse = distinct_rows(pixels)
    assert firsts.tolist() == [0, 1, 2, 5]
    assert inverse.tolist() == [0, 1, 2, 0, 2, 3]


def test_ig_steps_check_reports_completeness_and_top_k_overlap_computed_by_hand(tmp_path):
    """check_steps=[1] against steps=3: the stored gap and overlap equal the engine's IG at 1 and 3
    steps, ranked by hand (numpy argsort over the layout's tokens, k = the object's token count)."""
    import numpy as np

    from vlmloc.data import load_samples
    from vlmloc.engine.attribution import integrated_gradients
    from vlmloc.models import load_adapter
    from vlmloc.selection import object_positions

    cfg = compose_cfg("experiment=token_ablation", "model=tiny_llava", "data=synthetic", "data.n=2",
                      f"paths.cache_dir={tmp_path / 'cache'}", "experiment.integrated_gradients.steps=3",
                      "experiment.integrated_gradients.check_steps=[1]", "experiment.integrated_gradients.check_samples=1",
                      "experiment.integrated_gradients.batch_size=4", "model.localization.max_new_tokens=8",
                      "experiment.strategies=[integrated_gradients]", "experiment.pads=[0]", data_dir=tmp_path / "data")
    run_dir = tmp_path / "run"
    app.run(cfg, run_dir)
    check = pd.read_parquet(run_dir / "ig_steps_check.parquet")
    assert sorted(check["steps"].unique().tolist()) == [1, 3] and len(check) == 4  # 1 sample x 2 tasks x 2
    assert (check.loc[check["steps"] == 3, "top_k_overlap"] == 1.0).all()
    assert "how many steps the ranking needs" in (run_dir / "ig_steps_check.md").read_text()
    ad = load_adapter(cfg.model)
    (sample,) = load_samples(cfg.data)[0][:1]
    mean = torch.load(next((tmp_path / "cache" / "mean_embedding").glob("*.pt")), map_location="cpu")
    rows = pd.read_parquet(run_dir / "results.parquet")
    lay = ad.prepare([sample.load_image()], [ad.prompt("localization", sample.category)]).layouts[0]
    k = len(object_positions(lay, sample))
    for task in ("classification", "localization"):
        answer = None
        if task == "localization" or ad.classification_mode != "yes_no":
            clean = rows[(rows["condition"] == "baseline") & (rows["task"] == task)]
            answer = str(ad.cfg.classification.answer_prefix) + clean["answer"].iloc[0]
        prompt = ad.prompt(task, sample.category)
        a3, _, _ = integrated_gradients(ad, sample.load_image(), prompt, answer=answer, baseline=mean, steps=3, batch_size=4)
        a1, fx, fb = integrated_gradients(ad, sample.load_image(), prompt, answer=answer, baseline=mean, steps=1, batch_size=4)
        top3, top1 = set(np.argsort(-a3, kind="stable")[:k]), set(np.argsort(-a1, kind="stable")[:k])
        got = check[(check["task"] == task) & (check["steps"] == 1)].iloc[0]
        assert got["k"] == k > 0
        assert got["top_k_overlap"] == pytest.approx(len(top3 & top1) / k)
        assert got["relative_gap"] == pytest.approx(abs(a1.sum() - (fx - fb)) / abs(fx - fb), rel=1e-3, abs=1e-4)
