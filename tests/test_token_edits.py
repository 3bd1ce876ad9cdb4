"""LM-input token edits: equal to hand-edited inputs_embeds, permutations keep the multiset, batching is per row."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import noise_image
from vlmloc.data.sample import Sample
from vlmloc.engine.attribution import integrated_gradients
from vlmloc.engine.readout import generate, next_token_logprobs
from vlmloc.engine.token_edits import TokenEdit, apply_edits, edit_lm_input
from vlmloc.engine.visual_features import projector_io
from vlmloc.conditions import Resources, realize, select
from vlmloc.experiments.knockout import key_tokens
from vlmloc.experiments.shuffle import shuffle_condition
from vlmloc.experiments.token_ablation import ig_condition, object_condition, random_condition, register_condition


def _edits(cond, sample, layout, task, **named):
    """The LM-input edits `cond` realizes to for one row (named: the resources it reads)."""
    return realize(cond, sample, layout, task, 0, Resources(**named)).edits


def _embeds(adapter, batch):
    seen = {}

    def grab(module, args, kwargs):
        seen["e"] = kwargs["inputs_embeds"].detach().clone()

    h = adapter.language_model.register_forward_pre_hook(grab, with_kwargs=True)
    with torch.no_grad():
        out = adapter.model(**batch.inputs, logits_to_keep=1)
    h.remove()
    return seen["e"], out.logits[:, -1]


def _square_sample(tmp_path, w=300, h=200, box=(60, 40, 90, 80)) -> Sample:
    path = tmp_path / "im.png"
    noise_image(w, h, 3).save(path)
    x, y, bw, bh = box
    poly = [[x, y, x + bw, y, x + bw, y + bh, x, y + bh]]
    return Sample("1-1", 1, 1, path, w, h, "cat", 1, (x, y, bw, bh), poly, bw * bh)


@pytest.mark.parametrize("family", ["tiny_llava", "tiny_internvl"])
def test_hook_edit_equals_hand_edited_inputs_embeds(family, request, tmp_path):
    ad = request.getfixturevalue(family)
    sample = _square_sample(tmp_path)
    batch = ad.prepare([sample.load_image()] * 2, [ad.prompt("classification", "cat")] * 2)
    clean, _ = _embeds(ad, batch)
    mean = torch.randn(clean.shape[-1])
    pos = batch.layouts[0].positions[batch.layouts[0].object_tokens(sample.mask())]
    edits = [[TokenEdit.replace(pos, mean)], []]
    with edit_lm_input(ad, edits):
        edited, logits_hook = _embeds(ad, batch)
    hand = clean.clone()
    hand[0, torch.as_tensor(pos)] = mean
    assert torch.equal(edited, hand)
    with torch.no_grad():
        logits_hand = ad.model(inputs_embeds=hand, attention_mask=batch.inputs["attention_mask"],
                               position_ids=batch.inputs["position_ids"], logits_to_keep=1).logits[:, -1]
    torch.testing.assert_close(logits_hook, logits_hand)
    # row 1 was not edited: same as the clean run
    assert torch.equal(edited[1], clean[1])


def test_edits_apply_at_prefill_only_during_generation(tiny_llava, tmp_path):
    ad = tiny_llava
    sample = _square_sample(tmp_path)
    batch = ad.prepare([sample.load_image()], [ad.prompt("localization", "cat")])
    calls = []
    h = ad.language_model.register_forward_pre_hook(lambda m, a, k: calls.append(k["inputs_embeds"].shape[1]), with_kwargs=True)
    mean = torch.zeros(ad.text_config.hidden_size)
    with edit_lm_input(ad, [[TokenEdit.replace(batch.layouts[0].positions[:10], mean)]]):
        generate(ad, batch, 4)
    h.remove()
    assert calls[0] == batch.seq_len and all(c == 1 for c in calls[1:])  # decoding steps see one new token


def test_shuffle_keeps_the_multiset_and_one_token_object_is_unchanged(tiny_internvl, tmp_path):
    ad = tiny_internvl
    sample = _square_sample(tmp_path, 900, 300, (100, 100, 300, 100))
    batch = ad.prepare([sample.load_image()] * 2, [ad.prompt("classification", "cat")] * 2)
    clean, _ = _embeds(ad, batch)
    lay = batch.layouts[0]
    glob, obj = shuffle_condition("global", 0), shuffle_condition("object", 0)
    edits = [_edits(glob, sample, lay, "classification"), _edits(obj, sample, batch.layouts[1], "classification")]
    out = apply_edits(clean, edits)
    for row in (0, 1):
        before = clean[row, torch.as_tensor(lay.positions)]
        after = out[row, torch.as_tensor(lay.positions)]
        assert not torch.equal(before, after)
        # same multiset of rows: sort rows lexicographically by their first coordinates
        key = lambda t: t[torch.argsort(t[:, 0])]
        assert torch.equal(key(before), key(after))
    obj_pos = lay.positions[lay.object_tokens(sample.mask())]
    outside = np.setdiff1d(np.arange(clean.shape[1]), obj_pos)
    assert torch.equal(out[1, torch.as_tensor(outside)], clean[1, torch.as_tensor(outside)])
    # a one-token object: its "shuffle" is the identity
    tiny = _square_sample(tmp_path, 448, 448, (30, 30, 4, 4))  # inside token (1, 1) of the single 28 px tile cell
    b1 = ad.prepare([tiny.load_image()], [ad.prompt("classification", "cat")])
    e1 = _edits(obj, tiny, b1.layouts[0], "classification")
    assert e1[0].n == 1
    c1, _ = _embeds(ad, b1)
    assert torch.equal(apply_edits(c1, [e1]), c1)


def test_object_shuffle_keeps_each_token_in_its_own_tile(tiny_internvl, tmp_path):
    """A 900x300 object over several local crops and the thumbnail: every destination takes a
    source of its own tile (and so its own view); within=image mixes tiles."""
    ad = tiny_internvl
    sample = _square_sample(tmp_path, 900, 300, (100, 60, 600, 180))
    lay = ad.prepare([sample.load_image()], [ad.prompt("classification", "cat")]).layouts[0]
    tile_at = dict(zip(lay.positions.tolist(), lay.tile.tolist()))
    sel = lay.object_tokens(sample.mask())
    assert len(set(lay.tile[sel].tolist())) >= 3 and "global" in set(lay.view[sel].tolist())
    (edit,) = _edits(shuffle_condition("object", 0), sample, lay, "classification")
    assert sorted(edit.dst.tolist()) == sorted(lay.positions[sel].tolist())
    assert [tile_at[p] for p in edit.src.tolist()] == [tile_at[p] for p in edit.dst.tolist()]
    assert (edit.src != edit.dst).mean() > 0.5  # a real permutation inside each tile
    for t in set(lay.tile[sel].tolist()):  # the same multiset per tile
        in_t = [i for i, p in enumerate(edit.dst.tolist()) if tile_at[p] == t]
        assert sorted(edit.src[in_t].tolist()) == sorted(edit.dst[in_t].tolist())
    (mixed,) = _edits(shuffle_condition("object", 0, within="image"), sample, lay, "classification")
    assert any(tile_at[s] != tile_at[d] for s, d in zip(mixed.src.tolist(), mixed.dst.tolist()))
    with pytest.raises(ValueError, match="within"):
        shuffle_condition("object", 0, within="view")


def test_per_row_conditions_in_one_batch_equal_one_at_a_time(tiny_llava, tmp_path):
    ad = tiny_llava
    sample = _square_sample(tmp_path)
    mean = torch.randn(ad.text_config.hidden_size)
    conds = [object_condition(0), object_condition(2), random_condition(0), shuffle_condition("global", 0)]
    image, text = sample.load_image(), ad.prompt("classification", "cat")
    batch = ad.prepare([image] * len(conds), [text] * len(conds))
    edits = [_edits(c, sample, lay, "classification", mean_embedding=mean) for c, lay in zip(conds, batch.layouts)]
    with edit_lm_input(ad, edits):
        together = next_token_logprobs(ad, batch)
    for i, c in enumerate(conds):
        single = ad.prepare([image], [text])
        with edit_lm_input(ad, [_edits(c, sample, single.layouts[0], "classification", mean_embedding=mean)]):
            alone = next_token_logprobs(ad, single)
        torch.testing.assert_close(together[i], alone[0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(together[0], together[1])  # the conditions really differ


def test_selection_counts_and_register_rule(tiny_llava, tmp_path):
    ad = tiny_llava
    sample = _square_sample(tmp_path)
    lay = ad.prepare([sample.load_image()], [ad.prompt("classification", "cat")]).layouts[0]
    mean = torch.zeros(1)
    obj = _edits(object_condition(0), sample, lay, "classification", mean_embedding=mean)[0]
    # padded square 300x300 (offset 50 in y), cell 12.5 px: box x 60..150 -> cols 4..11 (150 is an edge),
    # y 40..120 -> 90..170 on the square -> rows 7..13
    assert obj.n == 8 * 7
    rnd = _edits(random_condition(0), sample, lay, "classification", mean_embedding=mean)[0]
    assert rnd.n == obj.n and len(set(rnd.dst)) == obj.n
    assert np.array_equal(rnd.dst, _edits(random_condition(0), sample, lay, "classification", mean_embedding=mean)[0].dst)
    assert not np.array_equal(rnd.dst, _edits(random_condition(1), sample, lay, "classification", mean_embedding=mean)[0].dst)
    # random tokens come from the image area: 300x200 on the 300x300 square, y offset 50, cells of
    # 12.5 px, so token rows 4..19 hold image pixels and rows 0-3, 20-23 only the grey padding
    row_of = dict(zip(lay.positions.tolist(), lay.row.tolist()))
    image_rows, anywhere = set(), set()
    for seed in range(30):
        image_rows |= {row_of[p] for p in _edits(random_condition(seed), sample, lay, "classification", mean_embedding=mean)[0].dst.tolist()}
        anywhere |= {row_of[p] for p in _edits(random_condition(seed, "all"), sample, lay, "classification", mean_embedding=mean)[0].dst.tolist()}
        keys = select(key_tokens("random", seed), sample, lay, "classification", Resources())
        assert len(keys) == obj.n and {row_of[p] for p in keys.tolist()} <= set(range(4, 20))
    assert image_rows == set(range(4, 20)) and anywhere > image_rows
    with pytest.raises(ValueError, match="image"):
        _edits(random_condition(0, "padding"), sample, lay, "classification")
    scores = np.ones(576)
    scores[[3, 100, 200]] = [10.0, 2.9, 3.0]  # median 1: factor 3 keeps norms >= 3
    reg = _edits(register_condition(3.0), sample, lay, "classification", mean_embedding=mean,
                 register_scores={sample.sample_id: scores})
    assert reg[0].dst.tolist() == sorted(lay.positions[[3, 200]].tolist())
    ig = _edits(ig_condition(), sample, lay, "classification", mean_embedding=mean,
                integrated_gradients={(sample.sample_id, "classification"): -np.arange(576.0)})
    assert ig[0].dst.tolist() == lay.positions[:56].tolist()


@pytest.mark.parametrize("family", ["tiny_llava", "tiny_internvl"])
def test_integrated_gradients_completeness(family, request):
    """sum of attributions ~= f(input) - f(baseline) (midpoint rule, mean-embedding baseline)."""
    ad = request.getfixturevalue(family)
    _, outs = projector_io(ad, ad.prepare([noise_image(300, 200, 5)], [ad.prompt("classification", "x")]))
    mean = outs[0].mean(0)
    im = noise_image(448, 448, 1)
    for answer, task in ((None, "classification"), (" [0.12, 0.30, 0.55, 0.80]", "localization")):
        attr, f_x, f_b = integrated_gradients(ad, im, ad.prompt(task, "cat"), answer=answer, baseline=mean, steps=16, batch_size=16)
        assert attr.shape == (ad.n_visual_tokens(448, 448),)
        assert abs(f_x - f_b) > 0.05, "the test needs a non-trivial difference"
        assert attr.sum() == pytest.approx(f_x - f_b, rel=0.02, abs=1e-3)
