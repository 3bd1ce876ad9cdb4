"""Interventions across generation's decode steps and cache restarts, on whatever transformers is
installed (CI runs this file on the lowest and the newest supported release).

Each intervention is checked against a reference that uses no hook and no KV cache: the whole
generated sequence run once, with the knockout written into an explicit 4-D attention mask, or with
the token edits written into `inputs_embeds` by hand. The unpadded batches matter: there
transformers passes no mask at decode steps, so a hook that misreads the cache skips them silently.
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
import transformers
from packaging.version import Version
from transformers import DynamicCache

from conftest import noise_image
from vlmloc.engine.heads import HeadEdit, capture_heads, capture_layer_inputs, edit_heads, head_slice, run_from_layer
from vlmloc.engine.hooks import CACHE_KEYWORDS, Call, Hooks, cache_argument
from vlmloc.engine.knockout import Knockout, knockout, post_image_queries
from vlmloc.engine.mediation import Target, answer_probability, head_mediation
from vlmloc.engine.token_edits import TokenEdit, edit_lm_input

NEW = 4  # generated tokens: one prefill and three decode steps


def _unpadded(ad, n_rows: int, task: str = "localization"):
    batch = ad.prepare([noise_image(300, 200, s) for s in range(n_rows)], [ad.prompt(task, "cat")] * n_rows)
    assert bool(batch.inputs["attention_mask"].all()), "the rows must share one length: no padding"
    return batch


@torch.no_grad()
def _generate(ad, batch):
    """Greedy sequences [rows, T + NEW] and per-step logits [rows, NEW, vocab], through the model's generate."""
    out = ad.model.generate(**batch.inputs, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, num_beams=1,
                            pad_token_id=ad.tokenizer.pad_token_id, output_logits=True, return_dict_in_generate=True)
    return out.sequences, torch.stack(out.logits, 1)


def _image_inputs(batch) -> dict:
    return {k: v for k, v in batch.inputs.items() if k not in ("input_ids", "attention_mask", "position_ids")}


@pytest.mark.parametrize("n_rows", [1, 3])
def test_knockout_at_decode_steps_equals_a_no_cache_run_with_an_explicit_mask(tiny_llava, n_rows):
    ad = tiny_llava
    batch = _unpadded(ad, n_rows)
    T = batch.seq_len
    # a different key set per row, every layer blocked, queries include the generated positions
    specs = [Knockout.make(post_image_queries(lay.positions, T, NEW), lay.positions[60 * i : 60 * i + 200], range(ad.n_layers))
             for i, lay in enumerate(batch.layouts)]
    with knockout(ad, specs):
        seq, steps = _generate(ad, batch)
    _, clean_steps = _generate(ad, batch)

    L = T + NEW - 1  # the last generated token is never fed back
    allow = torch.tril(torch.ones(L, L, dtype=torch.bool)).repeat(n_rows, 1, 1, 1)
    for i, spec in enumerate(specs):
        q = torch.as_tensor(spec.queries[spec.queries < L])
        allow[i, 0, q[:, None], torch.as_tensor(spec.keys)[None, :]] = False
    with torch.no_grad():
        ref = ad.model(input_ids=seq[:, :L], attention_mask=allow, position_ids=torch.arange(L).expand(n_rows, -1),
                       **_image_inputs(batch)).logits[:, T - 1 :]
    torch.testing.assert_close(steps, ref, atol=1e-4, rtol=1e-4)
    # the decode steps themselves differ from the clean run: the check above sees the knockout there
    assert (steps[:, 1:] - clean_steps[:, 1:]).abs().amax() > 0.1


@pytest.mark.parametrize("n_rows", [1, 3])
def test_token_edits_apply_at_prefill_only_against_hand_edited_embeddings(tiny_llava, n_rows):
    ad = tiny_llava
    batch = _unpadded(ad, n_rows)
    T = batch.seq_len
    embeds: list[torch.Tensor] = []
    with torch.no_grad(), Hooks().before(ad.language_model, lambda call: embeds.append(call.inputs_embeds.clone())):
        ad.model(**batch.inputs, logits_to_keep=1)
    value = torch.randn(ad.text_config.hidden_size, generator=torch.Generator().manual_seed(0))
    # row i: its first 100 + 50 i visual tokens take one vector; positions up to T-1, never a 1-token decode input
    edits = [[TokenEdit.replace(lay.positions[: 100 + 50 * i], value)] for i, lay in enumerate(batch.layouts)]
    with edit_lm_input(ad, edits):
        seq, steps = _generate(ad, batch)

    hand = embeds[0].clone()
    for i, lay in enumerate(batch.layouts):
        hand[i, torch.as_tensor(lay.positions[: 100 + 50 * i])] = value
    L = T + NEW - 1
    full = torch.cat([hand, ad.model.get_input_embeddings()(seq[:, T:L])], dim=1)
    with torch.no_grad():
        ref = ad.model(inputs_embeds=full, attention_mask=torch.ones(n_rows, L, dtype=torch.long),
                       position_ids=torch.arange(L).expand(n_rows, -1)).logits[:, T - 1 :]
    torch.testing.assert_close(steps, ref, atol=1e-4, rtol=1e-4)


def _pair(ad):
    answer = " [0.12, 0.30, 0.55, 0.80]"
    prompt = ad.prompt("localization", "cat")
    src = ad.prepare([noise_image(448, 448, 1)], [prompt + answer])
    base = ad.prepare([noise_image(448, 448, 2)], [prompt + answer])
    return src, base, Target(src.seq_len - ad.prepare([noise_image(448, 448, 1)], [prompt]).seq_len)


@pytest.mark.parametrize("heads_per_pass", [1, None])
def test_cma_restarts_equal_a_full_forward_for_any_pass_size(tiny_llava, heads_per_pass):
    """MF inputs from restarted layers (one head per pass, or a whole layer per pass) against a full
    forward with one head patched and no cache."""
    ad = tiny_llava
    src, base, target = _pair(ad)
    ids = base.inputs["input_ids"][0]
    S = capture_heads(ad, src.inputs)
    start = int(base.layouts[0].positions.max()) + 1
    for text_only in (False, True):
        _, _, patched = head_mediation(ad, src, base, target, text_only=text_only, heads_per_pass=heads_per_pass)
        pos = np.arange(start, base.seq_len) if text_only else None
        for layer in range(ad.n_layers):
            for head in range(ad.n_heads):
                with edit_heads(ad, [[HeadEdit(layer, head, S[layer][0, :, head_slice(ad, head)], pos)]]), torch.no_grad():
                    ref = float(answer_probability(ad, ad.model(**base.inputs).logits, ids, target)[0])
                assert patched[layer, head] == pytest.approx(ref, rel=1e-4, abs=1e-7), (text_only, layer, head)


def test_prefix_restart_uses_this_releases_cache_keyword(tiny_llava):
    """The captured layer call carries the cache under the keyword this transformers release uses
    (`cache` from 5.24, `past_key_values` before), and a restart from the prefix cache reproduces
    the clean run's logits at every recomputed position."""
    ad = tiny_llava
    _, base, _ = _pair(ad)
    expected = "cache" if Version(transformers.__version__) >= Version("5.24.0") else "past_key_values"
    assert expected in inspect.signature(type(ad.layers[0]).forward).parameters
    clean = capture_layer_inputs(ad, base.inputs)
    assert clean.layer_call.cache_keyword == expected
    assert isinstance(clean.layer_call.cache, DynamicCache) and clean.layer_call.cache.get_seq_length() == base.seq_len
    start = int(base.layouts[0].positions.max()) + 1
    for layer in (0, 1):
        out = run_from_layer(ad, clean, layer, 2, start=start)
        for row in range(2):
            torch.testing.assert_close(out[row], clean.logits[0, start:], atol=1e-5, rtol=1e-5)
    # the clean run's own cache is read, never written, by restarts
    assert clean.cache.get_seq_length() == base.seq_len


@pytest.mark.parametrize("keyword", CACHE_KEYWORDS)
def test_call_reads_and_writes_the_cache_under_the_keyword_it_came_with(keyword):
    cache = DynamicCache()
    call = Call((torch.zeros(1, 3, 4),), {keyword: cache, "attention_mask": None})
    assert call.cache is cache and call.cache_keyword == keyword and call.is_prefill and call.past_length(0) == 0
    cache.update(torch.zeros(1, 2, 5, 8), torch.zeros(1, 2, 5, 8), 0)
    assert call.past_length(0) == 5 and not call.is_prefill
    other = DynamicCache()
    moved = call.replace(cache=other, hidden=torch.ones(1, 3, 4))
    assert set(moved.kwargs) == {keyword, "attention_mask"} and moved.kwargs[keyword] is other
    assert moved.hidden.sum() == 12 and call.cache is cache  # the original call is unchanged
    assert Call((), {"hidden_states": torch.ones(2)}).replace(hidden=torch.zeros(2)).kwargs["hidden_states"].sum() == 0
    assert Call((), {}).cache is None and Call((), {}).is_prefill
    shared = Call((), {"hidden_states": torch.ones(2), keyword: cache}).shared()
    assert shared.args == () and set(shared.kwargs) == {keyword} and shared.cache is cache


def test_cache_argument_follows_the_callee_signature():
    class New(torch.nn.Module):
        def forward(self, x, cache=None):
            return x

    class Old(torch.nn.Module):
        def forward(self, x, past_key_values=None):
            return x

    assert cache_argument(New(), 1) == {"cache": 1}
    assert cache_argument(Old(), 1) == {"past_key_values": 1}


def test_hooks_are_removed_on_exit_and_after_an_error():
    lin = torch.nn.Linear(2, 2)
    seen = []
    hooks = Hooks().before(lin, lambda call: seen.append("before")).after(lin, lambda call, out: out * 0)
    with hooks:
        assert lin(torch.ones(2)).abs().sum() == 0  # the after hook replaced the output
    assert seen == ["before"] and lin(torch.ones(2)).abs().sum() > 0
    with pytest.raises(RuntimeError), Hooks().before(lin, lambda call: seen.append("again")):
        raise RuntimeError
    lin(torch.ones(2))
    assert seen == ["before"] and not lin._forward_pre_hooks and not lin._forward_hooks
