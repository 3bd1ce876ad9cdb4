"""Batched runs equal running each sample alone (left padding, position ids, generation)."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import noise_image
from vlmloc.engine.readout import generate, next_token_logprobs, yes_probability


@pytest.mark.parametrize("family", ["tiny_llava", "tiny_internvl"])
def test_batched_equals_unbatched(family, request):
    ad = request.getfixturevalue(family)
    # Different sizes (InternVL: different tile counts) and prompt lengths -> heavy left padding.
    images = [noise_image(320, 240, 0), noise_image(200, 420, 1), noise_image(450, 450, 2)]
    cats = ["cat", "a rather long traffic light", "dog"]
    cls_texts = [ad.prompt("classification", c) for c in cats]
    loc_texts = [ad.prompt("localization", c) for c in cats]

    batch = ad.prepare(images, cls_texts)
    lp_batched = next_token_logprobs(ad, batch)
    p_batched = yes_probability(ad, lp_batched)
    gen_batched = generate(ad, ad.prepare(images, loc_texts), 10)
    for i in range(3):
        single = ad.prepare([images[i]], [cls_texts[i]])
        lp_single = next_token_logprobs(ad, single)
        np.testing.assert_allclose(lp_batched[i].numpy(), lp_single[0].numpy(), atol=2e-4)
        assert p_batched[i] == pytest.approx(yes_probability(ad, lp_single)[0], abs=1e-5)
        assert gen_batched[i] == generate(ad, ad.prepare([images[i]], [loc_texts[i]]), 10)[0]
    assert batch.inputs["attention_mask"].min() == 0, "the test must exercise left padding"


def test_yes_probability_is_the_normalised_yes_mass(tiny_llava):
    """p_yes = sum P(yes ids) / (sum P(yes ids) + sum P(no ids)), computed independently."""
    ad = tiny_llava
    batch = ad.prepare([noise_image(300, 300, 5)], [ad.prompt("classification", "cat")])
    lp = next_token_logprobs(ad, batch)
    p = lp[0].exp().double()
    want = p[ad.yes_ids].sum() / (p[ad.yes_ids].sum() + p[ad.no_ids].sum())
    assert yes_probability(ad, lp)[0] == pytest.approx(float(want), rel=1e-5)
    assert len(ad.yes_ids) == 2 and not set(ad.yes_ids) & set(ad.no_ids)
    assert ad.tokenizer.decode([ad.yes_ids[0]]).strip() == "Yes"
