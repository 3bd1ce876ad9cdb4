"""The in-place KV cache: generation equals transformers' own concatenating cache, step by step."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from conftest import compose_cfg, noise_image
from vlmloc.engine.hooks import cache_argument
from vlmloc.engine.kv_cache import InPlaceLayer, SharedPrefixLayer, grow_in_place, share_rows
from vlmloc.engine.readout import generate
from vlmloc.models import load_adapter


def test_in_place_layer_holds_what_concatenation_holds():
    """Updates of 5, 1, 1 and 3 positions into a buffer of 6 (so it doubles once), then a batch
    selection (a copy, as batch_select_indices makes) and one more update."""
    from transformers import LlamaConfig

    config = LlamaConfig(num_hidden_layers=1, hidden_size=8, num_attention_heads=2, num_key_value_heads=2)
    cache = grow_in_place(DynamicCache(config=config), 6)
    plain = DynamicCache(config=config)
    g = torch.Generator().manual_seed(0)
    for n in (5, 1, 1, 3):
        k, v = torch.randn(3, 2, n, 4, generator=g), torch.randn(3, 2, n, 4, generator=g)
        got = cache.update(k, v, 0)
        want = plain.update(k, v, 0)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert isinstance(cache.layers[0], InPlaceLayer) and cache.get_seq_length() == 10
    idx = torch.tensor([2, 0])
    cache.batch_select_indices(idx)
    plain.batch_select_indices(idx)
    k, v = torch.randn(2, 2, 1, 4, generator=g), torch.randn(2, 2, 1, 4, generator=g)
    got, want = cache.update(k, v, 0), plain.update(k, v, 0)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]) and cache.get_seq_length() == 11


@pytest.mark.parametrize("family", ["tiny_llava", "tiny_internvl", "tiny_qwen2_5vl"])
def test_generation_with_the_in_place_cache_equals_the_concatenating_cache(family):
    ad = load_adapter(compose_cfg(f"model={family}").model)
    images = [noise_image(448, 448, 1), noise_image(336, 448, 2)]
    batch = ad.prepare(images, [ad.prompt("localization", "cat"), ad.prompt("localization", "traffic light")])
    n = 12
    tok = ad.tokenizer
    plain = ad.model.generate(**batch.inputs, max_new_tokens=n, do_sample=False, num_beams=1,
                              pad_token_id=tok.pad_token_id, output_scores=True, return_dict_in_generate=True,
                              **cache_argument(ad.model, DynamicCache(config=ad.text_config)))
    cache = grow_in_place(DynamicCache(config=ad.text_config), batch.seq_len + n)
    fast = ad.model.generate(**batch.inputs, max_new_tokens=n, do_sample=False, num_beams=1,
                             pad_token_id=tok.pad_token_id, output_scores=True, return_dict_in_generate=True,
                             **cache_argument(ad.model, cache))
    assert all(isinstance(layer, InPlaceLayer) for layer in cache.layers) and len(cache.layers) == ad.n_layers
    assert torch.equal(plain.sequences, fast.sequences)
    assert max(float((a - b).abs().max()) for a, b in zip(plain.scores, fast.scores)) < 1e-5
    assert len(set(generate(ad, batch, n))) == 2  # the project's generate runs on it too


def test_shared_rows_hold_each_prefix_once_and_grow_their_own_positions_alike():
    from transformers import LlamaConfig

    config = LlamaConfig(num_hidden_layers=2, hidden_size=8, num_attention_heads=2, num_key_value_heads=2)
    g = torch.Generator().manual_seed(1)
    a = DynamicCache(config=config)
    prefix = []
    for layer in range(2):
        prefix.append((torch.randn(2, 2, 5, 4, generator=g), torch.randn(2, 2, 5, 4, generator=g)))
        a.update(*prefix[-1], layer)
    idx = torch.tensor([1, 1, 0, 1])
    share_rows(a, idx, 2)
    own: list[list[torch.Tensor]] = [[], []]
    for step in range(3):  # 3 > 2: the third step doubles the rows' buffers
        for layer in range(2):
            k, v = torch.randn(4, 2, 1, 4, generator=g), torch.randn(4, 2, 1, 4, generator=g)
            own[layer].append(k)
            got = a.update(k, v, layer)
            assert torch.equal(got[0], torch.cat(own[layer], dim=2)) and got[1].shape == (4, 2, step + 1, 4)
    for layer, (k, v) in zip(a.layers, prefix):
        assert isinstance(layer, SharedPrefixLayer) and torch.equal(layer.prefix_keys, k) and torch.equal(layer.prefix_values, v)
        assert layer.slot.tolist() == [0, 1, 0, 2] and layer.rows_per_unit == 3
    assert a.get_seq_length() == 8 and a.get_seq_length(1) == 8
