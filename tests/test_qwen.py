"""Qwen2.5-VL and Qwen3-VL: layouts, M-RoPE positions, boxes and the baseline, against the model's own code.

Every check compares with an independent computation: the model's `get_image_features` (its ordered
visual features) and `get_rope_index` (its 3-D positions), the processor's own patches, hand-built
box strings, and plain forward / generate calls.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from conftest import compose_cfg, noise_image
from vlmloc import geometry
from vlmloc.data.sample import Sample
from vlmloc.models import GLOBAL, load_adapter

FAMILIES = ["tiny_qwen2_5vl", "tiny_qwen3vl"]
SIZES = [(300, 200), (120, 260), (64, 64), (500, 90)]


@pytest.fixture(scope="module", params=FAMILIES)
def qwen(request):
    return load_adapter(compose_cfg(f"model={request.param}").model)


def _batch(ad, sizes=SIZES):
    images = [noise_image(w, h, i) for i, (w, h) in enumerate(sizes)]
    # prompts of different lengths and images of different sizes: every row but the longest is left padded
    texts = [ad.prompt("classification", "cat"), ad.prompt("localization", "a very long category name here"),
             ad.prompt("localization", "x"), ad.prompt("classification", "dog")]
    return images, ad.prepare(images, texts[: len(sizes)])


def test_layout_is_where_the_model_scatters_each_visual_embedding(qwen):
    ad = qwen
    images, batch = _batch(ad)
    mask = batch.inputs["attention_mask"]
    assert (mask == 0).any(1).sum() >= 2, "several rows must be left padded"
    seen = {}

    def grab(module, args, kwargs):
        seen["embeds"] = kwargs["inputs_embeds"].detach().clone()

    handle = ad.language_model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            ad.model(**batch.inputs)
            # the model's own visual features, in its order, one chunk per image
            feats = ad.model.model.get_image_features(batch.inputs["pixel_values"], batch.inputs["image_grid_thw"]).pooler_output
    finally:
        handle.remove()
    thw = batch.inputs["image_grid_thw"]
    for i, (im, lay) in enumerate(zip(images, batch.layouts)):
        t, gh, gw = (int(v) for v in thw[i])
        assert (lay.grids[GLOBAL].rows, lay.grids[GLOBAL].cols) == (gh // 2, gw // 2)
        assert lay.n_visual == t * gh * gw // 4 == ad.n_visual_tokens(im.width, im.height)
        assert torch.equal(seen["embeds"][i, torch.as_tensor(lay.positions)], feats[i])
        assert lay.positions[0] >= int((mask[i] == 0).sum())  # the pads come first


def test_layout_rows_and_cols_are_the_models_rope_rows_and_cols(qwen):
    """The model's own 3-D positions give every visual token its (row, col): both grids must agree."""
    ad = qwen
    _, batch = _batch(ad)
    pos, _ = ad.model.model.get_rope_index(batch.inputs["input_ids"], mm_token_type_ids=batch.inputs["mm_token_type_ids"],
                                           image_grid_thw=batch.inputs["image_grid_thw"],
                                           attention_mask=batch.inputs["attention_mask"])
    torch.testing.assert_close(batch.inputs["position_ids"], pos, rtol=0, atol=0)
    for i, lay in enumerate(batch.layouts):
        p = pos[:, i, torch.as_tensor(lay.positions)].numpy()
        np.testing.assert_array_equal(p[1] - p[1].min(), lay.row)
        np.testing.assert_array_equal(p[2] - p[2].min(), lay.col)
        assert (p[0] == p[0][0]).all()  # one temporal index for an image


def test_token_cells_are_the_resized_images_cells(qwen):
    """Token (r, c) is made of the processor's patches of the resized image's cell [r*f, (r+1)*f) x [c*f, (c+1)*f)."""
    ad = qwen
    im = noise_image(300, 200, 5)
    batch = ad.prepare([im], [ad.prompt("classification", "cat")])
    rw, rh = ad.resized_size(im.width, im.height)
    _, gh, gw = (int(v) for v in batch.inputs["image_grid_thw"][0])
    assert (rw, rh) == (gw * ad.patch_size, gh * ad.patch_size)
    ip = ad.processor.image_processor
    resized = np.asarray(im.resize((rw, rh), Image.Resampling.BICUBIC), dtype=np.float32) / 255
    norm = (resized - np.asarray(ip.image_mean)) / np.asarray(ip.image_std)  # [rh, rw, 3]
    pix = batch.inputs["pixel_values"].float().numpy()
    p, m, cols = ad.patch_size, ad.merge_size, gw // 2
    lay = batch.layouts[0]
    for j in (0, 7, lay.n_visual - 1):
        r, c = lay.row[j], lay.col[j]
        for k in range(m * m):  # the merge block's patches, row-major
            dr, dc = divmod(k, m)
            patch = pix[j * m * m + k].reshape(3, 2, p, p)[:, 0]  # channels x temporal x p x p; the two frames repeat
            y, x = (r * m + dr) * p, (c * m + dc) * p
            want = norm[y : y + p, x : x + p].transpose(2, 0, 1)
            assert np.abs(patch - want).max() < 0.05, (j, k)
    assert cols == lay.grids[GLOBAL].cols


def test_object_tokens_use_the_resized_frame(qwen):
    """A mask on the left half covers exactly the token columns whose cell (in original pixels) meets it."""
    ad = qwen
    w, h = 300, 200
    lay = ad.prepare([noise_image(w, h)], [ad.prompt("classification", "x")]).layouts[0]
    g = lay.grids[GLOBAL]
    rw, rh = ad.resized_size(w, h)
    assert (g.rows, g.cols) == (rh // ad.factor, rw // ad.factor)
    mask = np.zeros((h, w), bool)
    mask[:, :150] = True
    sel = lay.object_tokens(mask).reshape(g.rows, g.cols)
    cell_w = w / g.cols  # one token spans factor resized pixels = factor * W / W' original pixels
    want_cols = [c for c in range(g.cols) if c * cell_w < 150 - 1e-9]
    assert sel.all(0).tolist() == [c in want_cols for c in range(g.cols)]
    assert sel.any(0).tolist() == sel.all(0).tolist()


# --------------------------------------------------------------------------- boxes


@pytest.mark.parametrize("family, frame", [("tiny_qwen2_5vl", "resized"), ("tiny_qwen3vl", "1000")])
def test_box_answers_map_to_original_pixels(family, frame, request):
    ad = load_adapter(compose_cfg(f"model={family}").model)
    w, h = 640, 480
    rw, rh = ad.resized_size(w, h)
    sx, sy = (rw, rh) if frame == "resized" else (1000, 1000)
    answer = '```json\n[\n\t{"bbox_2d": [%d, %d, %d, %d], "label": "cat"}\n]\n```' % (sx // 4, sy // 2, sx // 2, sy)
    box = ad.parse_box(answer, w, h)
    assert box == pytest.approx((sx // 4 / sx * w, sy // 2 / sy * h, sx // 2 / sx * w, h))
    # the plain-list form and single quotes parse the same
    assert ad.parse_box(f"[{sx // 4}, {sy // 2}, {sx // 2}, {sy}]", w, h) == box
    assert ad.parse_box("{'bbox_2d': [%d, %d, %d, %d]}" % (sx // 4, sy // 2, sx // 2, sy), w, h) == box
    # the bbox_2d key wins over an earlier list of four numbers
    assert ad.parse_box('[1, 2, 3, 4] {"bbox_2d": [%d, %d, %d, %d]}' % (sx // 4, sy // 2, sx // 2, sy), w, h) == box
    assert ad.parse_box("no box here", w, h) is None


_ADAPTERS: dict = {}


def _adapter(name):
    if name not in _ADAPTERS:
        _ADAPTERS[name] = load_adapter(compose_cfg(f"model={name}").model)
    return _ADAPTERS[name]


@settings(max_examples=60, deadline=None)
@given(
    name=st.sampled_from(FAMILIES),
    w=st.integers(32, 2000),
    h=st.integers(32, 2000),
    fr=st.lists(st.floats(0, 1, allow_nan=False), min_size=4, max_size=4),
)
def test_box_round_trip(name, w, h, fr):
    """format then parse returns the box within the frame's rounding (half a unit of the answer frame)."""
    if max(w, h) / min(w, h) > 100:
        return
    ad = _adapter(name)
    x1, x2 = sorted(fr[:2])
    y1, y2 = sorted(fr[2:])
    box = (x1 * w, y1 * h, x2 * w, y2 * h)
    got = ad.parse_box(ad.format_box(box, w, h), w, h)
    sx, sy = ad._frame(w, h)
    tol = (0.5 / sx * w + 1e-6, 0.5 / sy * h + 1e-6)
    assert got is not None
    for k in range(4):
        assert abs(got[k] - box[k]) <= tol[k % 2]


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=200))
def test_box_parsing_never_raises(text):
    for name in FAMILIES:
        out = _adapter(name).parse_box(text, 640, 480)
        assert out is None or (len(out) == 4 and all(math.isfinite(v) for v in out))


@settings(max_examples=100, deadline=None)
@given(nums=st.lists(st.one_of(st.integers(-10**6, 10**6), st.floats(allow_nan=True, allow_infinity=True)), min_size=4, max_size=4),
       key=st.booleans())
def test_box_parsing_of_numbers_never_raises_and_clips(nums, key):
    body = "[" + ", ".join(str(v) for v in nums) + "]"
    text = '[{"bbox_2d": ' + body + "}]" if key else body
    for name in FAMILIES:
        out = _adapter(name).parse_box(text, 640, 480)
        if out is not None:
            assert all(0 <= v <= s for v, s in zip(out, (640, 480, 640, 480)))


# --------------------------------------------------------------------------- batching and positions


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_batched_with_left_padding_equals_each_row_alone(qwen, attn):
    ad = qwen
    ad.model.set_attn_implementation(attn)
    try:
        images, batch = _batch(ad)
        with torch.no_grad():
            logits = ad.model(**batch.inputs).logits
            mask = batch.inputs["attention_mask"].bool()
            texts = [ad.prompt("classification", "cat"), ad.prompt("localization", "a very long category name here"),
                     ad.prompt("localization", "x"), ad.prompt("classification", "dog")]
            for i, (im, text) in enumerate(zip(images, texts)):
                one = ad.prepare([im], [text])
                alone = ad.model(**one.inputs).logits[0]
                torch.testing.assert_close(logits[i, mask[i]], alone, atol=2e-4, rtol=2e-4)
            # the test can fail: 1-D positions (LLaVA's) give other logits
            wrong = dict(batch.inputs, position_ids=(batch.inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0))
            assert (ad.model(**wrong).logits[mask] - logits[mask]).abs().max() > 1e-3
    finally:
        ad.model.set_attn_implementation("sdpa")


def test_generation_with_our_positions_equals_the_models_own(qwen):
    """Greedy answers with the prepared 3-D positions equal transformers' generate computing its own."""
    ad = qwen
    _, batch = _batch(ad)
    own = {k: v for k, v in batch.inputs.items() if k != "position_ids"}
    with torch.no_grad():
        a = ad.model.generate(**batch.inputs, max_new_tokens=5, do_sample=False, pad_token_id=ad.tokenizer.pad_token_id)
        b = ad.model.generate(**own, max_new_tokens=5, do_sample=False, pad_token_id=ad.tokenizer.pad_token_id)
    assert torch.equal(a, b)


# --------------------------------------------------------------------------- baseline evaluation


def _sample(tmp_path, i: int, w: int, h: int) -> Sample:
    """A noise image with a rectangular object (COCO polygon) in its upper middle."""
    path = tmp_path / f"{i}.png"
    noise_image(w, h, i).save(path)
    x0, y0, x1, y1 = w // 3, h // 4, 2 * w // 3, h // 2
    poly = [[float(v) for v in (x0, y0, x1, y0, x1, y1, x0, y1)]]
    return Sample(f"s{i}", i, i, path, w, h, "cat", 1, (x0, y0, x1 - x0, y1 - y0), poly, float((x1 - x0) * (y1 - y0)))


def test_baseline_evaluation_equals_a_manual_forward_and_generate(qwen, tmp_path):
    from vlmloc.evaluation import evaluate

    ad = qwen
    samples = [_sample(tmp_path, 0, 300, 200), _sample(tmp_path, 1, 120, 260), _sample(tmp_path, 2, 200, 200)]
    rows = evaluate(ad, samples, ["classification", "localization"], batch_size=2, progress=False)
    assert len(rows) == 6
    for s in samples:
        im = s.load_image()
        with torch.no_grad():
            one = ad.prepare([im], [ad.prompt("classification", "cat")])
            lp = torch.log_softmax(ad.model(**one.inputs).logits[0, -1].float(), -1)
            p_yes = torch.sigmoid(torch.logsumexp(lp[ad.yes_ids], -1) - torch.logsumexp(lp[ad.no_ids], -1)).item()
            loc = ad.prepare([im], [ad.prompt("localization", "cat")])
            n = int(ad.cfg.localization.max_new_tokens)
            out = ad.model.generate(**{k: v for k, v in loc.inputs.items() if k != "position_ids"}, max_new_tokens=n,
                                    do_sample=False, pad_token_id=ad.tokenizer.pad_token_id)[0, loc.seq_len :].tolist()
        eos = ad.tokenizer.eos_token_id
        out = out[: out.index(eos)] if eos in out else out
        answer = ad.tokenizer.decode([t for t in out if t != ad.tokenizer.pad_token_id], skip_special_tokens=False).strip()
        cls = rows[(rows.sample_id == s.sample_id) & (rows.task == "classification")].iloc[0]
        locr = rows[(rows.sample_id == s.sample_id) & (rows.task == "localization")].iloc[0]
        assert cls.p_yes == pytest.approx(p_yes, abs=1e-4)
        assert locr.answer == answer
        pred = ad.parse_box(answer, s.width, s.height)
        assert locr.iou == pytest.approx(geometry.box_iou(pred, s.box_xyxy))
