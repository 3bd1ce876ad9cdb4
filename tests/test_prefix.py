"""Reusing the image prefix's KV cache equals recomputing every condition in full: restarts for
next-token readouts, and generation from a shared prefix (one sample's rows under many conditions)."""

from __future__ import annotations

import pytest

from conftest import compose_cfg, noise_image
from vlmloc.engine.hooks import Hooks
from vlmloc.engine.knockout import Knockout, knockout, post_image_queries
from vlmloc.engine.kv_cache import SharedPrefixLayer
from vlmloc.engine.prefix import first_post_image_position, run_prefix, share_image_prefix, suffix_next_token_logprobs
from vlmloc.engine.readout import generate, next_token_logprobs
from vlmloc.models import load_adapter


@pytest.mark.parametrize("family", ["tiny_llava", "tiny_internvl", "tiny_qwen2_5vl", "tiny_qwen3vl"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_prefix_reuse_equals_full_recomputation_under_knockout(family, attn):
    """Qwen's 3-D rotary positions included: the suffix continues the prefix's M-RoPE positions."""
    ad = load_adapter(compose_cfg(f"model={family}", f"model.attn_implementation={attn}").model)
    image, text = noise_image(448, 448, 1), ad.prompt("classification", "cat")
    one = ad.prepare([image], [text])
    lay = one.layouts[0]
    q = post_image_queries(lay.positions, one.seq_len)
    specs = [Knockout.make(q, lay.positions[:50], [0]), Knockout.make(q, lay.positions[50:120], [1]),
             Knockout.none(), Knockout.make(q, lay.positions, [0, 1])]
    with knockout(ad, specs):
        full = next_token_logprobs(ad, ad.prepare([image] * 4, [text] * 4))
    prefix = run_prefix(ad, one, first_post_image_position(one))
    with knockout(ad, specs):
        fast = suffix_next_token_logprobs(ad, one, prefix, 4)
    assert (full - fast).abs().max() < 1e-4
    assert (full[2] - next_token_logprobs(ad, one)[0]).abs().max() < 1e-5  # empty knockout = clean run
    assert (full[0] - full[2]).abs().max() > 1e-3  # the knockout really changes the answer


def test_prefix_must_hold_the_image(tiny_llava):
    one = tiny_llava.prepare([noise_image(300, 300)], [tiny_llava.prompt("classification", "cat")])
    with pytest.raises(ValueError, match="whole image"):
        run_prefix(tiny_llava, one, 10)


# ----------------------------------------------------------------------------- shared prefix in generation


def _specs(batch, new_tokens: int) -> list[Knockout]:
    """Per row, from the row's own layout: knockouts of the queries after the image (answer included)."""
    out = []
    for r, lay in enumerate(batch.layouts):
        q = post_image_queries(lay.positions, batch.seq_len, new_tokens)
        keys = [lay.positions[:40], lay.positions[40:150], None, lay.positions][r % 4]
        out.append(Knockout.none() if keys is None else Knockout.make(q, keys, [r % 2]))
    return out


@pytest.mark.parametrize("family", ["tiny_llava", "tiny_internvl"])
def test_shared_prefix_generation_equals_full_recomputation(family):
    """Two images, two prompts of different lengths (the padding sits between prefix and prompt), five
    rows: the shared prefix's answers and next-token log-probabilities equal full left-padded rows."""
    ad = load_adapter(compose_cfg(f"model={family}").model)
    images = [noise_image(448, 448, 1), noise_image(448, 448, 2)]
    texts = [ad.prompt("localization", "cat"), ad.prompt("localization", "traffic light on a pole")]
    unit_of_row = [0, 0, 1, 1, 0]
    full = ad.prepare([images[u] for u in unit_of_row], [texts[u] for u in unit_of_row])
    assert int((full.inputs["attention_mask"] == 0).sum()) > 0  # the rows really differ in length
    new = 6
    seen = []
    with Hooks().before(ad.language_model, lambda call: seen.append(tuple(call.inputs_embeds.shape[:2]))):
        with knockout(ad, _specs(full, new)):
            want = generate(ad, full, new)
            want_lp = next_token_logprobs(ad, full)
        n_full = len(seen)
        shared = share_image_prefix(ad, ad.encode(images, texts), unit_of_row, new)
        with knockout(ad, _specs(shared.batch, new)):
            got = generate(ad, shared.batch, new, shared.cache)
    # each image's prefix is held once, not once per row; the rows' own positions (the rest of the
    # prompt, the answer) went into buffers sized for the call: generation never regrew them
    layer = shared.cache.layers[0]
    kv_heads = ad.text_config.num_key_value_heads
    assert isinstance(layer, SharedPrefixLayer) and layer.prefix_keys.shape[:3] == (2, kv_heads, shared.split)
    assert layer._buffers[0].shape[:3] == (5, kv_heads, shared.batch.seq_len - shared.split + new)
    assert shared.cache.get_seq_length() == shared.batch.seq_len + new - 1  # the last token is not fed back
    prefix_call, suffix_call = seen[n_full], seen[n_full + 1]
    # the prefix computed once per image, then only the rest of the prompt per row
    assert prefix_call == (2, shared.split) and suffix_call == (5, shared.batch.seq_len - shared.split)
    assert shared.split == int(full.layouts[0].positions.max()) + 1 - int((full.inputs["attention_mask"][0] == 0).sum())
    assert got == want
    assert len(set(want)) > 1  # the knockouts change answers: the comparison can fail
    again = share_image_prefix(ad, ad.prepare(images, texts), unit_of_row)  # a cache is consumed by its call
    with knockout(ad, _specs(again.batch, new)):
        got_lp = next_token_logprobs(ad, again.batch, again.cache)
    assert (got_lp - want_lp).abs().max() < 1e-4
    assert (want_lp[0] - want_lp[2]).abs().max() > 1e-3


@pytest.mark.parametrize("family,mode", [("tiny_llava", "yes_no"), ("tiny_llava", "list"), ("tiny_internvl", "list")])
def test_evaluate_with_a_shared_prefix_equals_every_row_in_full(family, mode, tmp_path):
    """The runner's path: knockout conditions of the paper, both tasks, prefix shared or not."""
    from vlmloc import evaluation
    from vlmloc.data import load_samples
    from vlmloc.experiments import knockout as ko_exp

    cfg = compose_cfg(f"model={family}", "data=synthetic", "data.n=3", "experiment=knockout",
                      f"model.classification.mode={mode}", data_dir=tmp_path)
    ad = load_adapter(cfg.model)
    samples, _ = load_samples(cfg.data)
    conds = ko_exp.conditions(ad.n_layers, ko_exp.settings(cfg), seed=0)
    calls = []
    real = evaluation.share_image_prefix

    def counted(*args, **kwargs):
        calls.append(len(args[2]))
        return real(*args, **kwargs)

    tasks = ["classification", "localization"]
    rows = 2 * len(conds) + 1  # calls that span samples: the padding sits between prefix and prompt
    plain = evaluation.evaluate(ad, samples, tasks, batch_size=rows, conditions=conds, progress=False)
    evaluation.share_image_prefix = counted
    try:
        fast = evaluation.evaluate(ad, samples, tasks, batch_size=rows, conditions=conds, progress=False,
                                   share_prefix=True)
    finally:
        evaluation.share_image_prefix = real
    assert sum(calls) == len(plain) and len(calls) >= 2  # every row went through a shared prefix
    key = ["sample_id", "task", "condition"]
    a, b = plain.sort_values(key).reset_index(drop=True), fast.sort_values(key).reset_index(drop=True)
    assert a[key].equals(b[key])
    assert a["answer"].tolist() == b["answer"].tolist()
    assert a["knockout_keys"].tolist() == b["knockout_keys"].tolist()
    if mode == "yes_no":
        cls = a["task"] == "classification"
        assert (a.loc[cls, "p_yes"] - b.loc[cls, "p_yes"]).abs().max() < 1e-5
    assert a["answer"].nunique() > 2
