"""Reusing the image prefix's KV cache equals recomputing every condition in full."""

from __future__ import annotations

import pytest

from conftest import compose_cfg, noise_image
from vlmloc.engine.knockout import Knockout, knockout, post_image_queries
from vlmloc.engine.prefix import first_post_image_position, run_prefix, suffix_next_token_logprobs
from vlmloc.engine.readout import next_token_logprobs
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
