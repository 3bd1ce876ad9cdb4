"""Activation capture: the hooks return exactly what a manual run gives, at the layouts' token positions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from conftest import noise_image
from vlmloc.engine.capture import (
    LLM,
    PROJECTOR,
    VISION,
    Stage,
    VisualCapture,
    capture,
    model_stages,
    stage_tokens,
)


def _batch(adapter, sizes):
    images = [noise_image(w, h, seed=i) for i, (w, h) in enumerate(sizes)]
    # Different prompt lengths and (InternVL) tile counts: rows are left padded differently.
    texts = [("word " * i) + adapter.prompt("classification", "cat") for i in range(len(images))]
    return adapter.prepare(images, texts)


def _manual(adapter, batch):
    """Hidden states from the models' own output_hidden_states, no hooks."""
    with torch.no_grad():
        lm = adapter.model.model(**batch.inputs, output_hidden_states=True, use_cache=False).hidden_states
        vision = adapter.vision_tower(pixel_values=batch.inputs["pixel_values"], output_hidden_states=True).hidden_states
    rows = torch.cat([torch.full((lay.n_visual,), i) for i, lay in enumerate(batch.layouts)])
    pos = torch.cat([torch.as_tensor(lay.positions) for lay in batch.layouts])
    return lm, vision, rows, pos


@pytest.mark.parametrize("family, sizes", [("llava", [(320, 240), (200, 400)]), ("internvl", [(448, 448), (900, 300)])])
def test_capture_equals_manual_hidden_states(family, sizes, tiny_llava, tiny_internvl):
    adapter = tiny_llava if family == "llava" else tiny_internvl
    batch = _batch(adapter, sizes)
    assert batch.inputs["attention_mask"].min() == 0, "the batch should exercise left padding"
    stages = model_stages(adapter)
    acts = capture(adapter, batch, stages)
    lm, vision, rows, pos = _manual(adapter, batch)
    n_llm = adapter.n_layers
    assert [s.name for s in stages] == [f"vision.{i}" for i in range(len(vision) - 1)] + ["projector"] + [f"llm.{i}" for i in range(n_llm)]
    assert [s.index for s in stages] == list(range(len(stages)))
    # projector output == the LM's input embeddings at the image-token positions
    torch.testing.assert_close(acts["projector"], lm[0][rows, pos], rtol=0, atol=0)
    for i in range(n_llm - 1):
        torch.testing.assert_close(acts[f"llm.{i}"], lm[i + 1][rows, pos], rtol=0, atol=0)
    # HF's last hidden state is after the final norm; the capture is the residual stream before it
    last = acts[f"llm.{n_llm - 1}"]
    torch.testing.assert_close(adapter.language_model.norm(last), lm[-1][rows, pos], rtol=1e-6, atol=1e-6)
    assert not torch.allclose(last, lm[-1][rows, pos])
    for i in range(len(vision) - 1):
        expected = vision[i + 1][:, 1:].reshape(-1, vision[i + 1].shape[-1])  # CLS dropped, tiles in order
        torch.testing.assert_close(acts[f"vision.{i}"], expected, rtol=0, atol=0)


def test_stage_tokens_follow_each_stage_grid(tiny_llava, tiny_internvl):
    # LLaVA: vision grid == token grid (24x24), row-major
    batch = _batch(tiny_llava, [(300, 200)])
    for stage in model_stages(tiny_llava):
        meta = stage_tokens(stage, batch.layouts)
        assert stage.grid == 24 and len(meta) == 576
        assert (meta.row * 24 + meta.col == np.arange(576)).all()
    # InternVL: 3 local crops + thumbnail (last); ViT layers on 32x32 per tile, the rest on 16x16
    batch = _batch(tiny_internvl, [(448, 448), (900, 300)])
    lay = batch.layouts[1]
    n_tiles = sum(x.n_tiles for x in batch.layouts)
    for stage in model_stages(tiny_internvl):
        meta = stage_tokens(stage, batch.layouts)
        if stage.kind == VISION:
            assert stage.grid == 32 and len(meta) == n_tiles * 1024
            second = meta.batch_row == 1
            assert (meta.tile[second] == np.repeat(np.arange(lay.n_tiles), 1024)).all()
            views = meta.view[second].reshape(lay.n_tiles, 1024)
            assert (views[-1] == "global").all() and (views[:-1] == "local").all()
            assert meta.row[1024 + 33] == 1 and meta.col[1024 + 33] == 1  # tile 0 of row 1, patch 33
        else:
            assert stage.kind in (PROJECTOR, LLM) and stage.grid == 16
            assert len(meta) == sum(x.n_visual for x in batch.layouts)
            assert (meta.view[meta.batch_row == 1] == lay.view).all()
            assert (meta.row[meta.batch_row == 1] == lay.row).all() and (meta.col[meta.batch_row == 1] == lay.col).all()


def test_hooks_removed_and_missing_stage_is_an_error(tiny_llava):
    batch = _batch(tiny_llava, [(300, 200)])
    stages = model_stages(tiny_llava)
    # transformers may keep its own (output-recording) hooks on these modules: count ours only
    before = {s.name: len(s.module._forward_hooks) for s in stages}
    with VisualCapture(tiny_llava, batch, stages) as acts:
        with torch.no_grad():
            tiny_llava.model(**batch.inputs)  # the full model (with lm_head) works too
    assert set(acts) == {s.name for s in stages}
    assert {s.name: len(s.module._forward_hooks) for s in stages} == before
    stray = Stage("llm.99", LLM, 99, 99, 24, nn.Linear(2, 2))  # a module the forward never runs
    with pytest.raises(RuntimeError, match="llm.99 was not captured"):
        capture(tiny_llava, batch, [stray])


def test_capture_stops_after_the_last_requested_stage(tiny_llava):
    batch = _batch(tiny_llava, [(300, 200), (200, 300)])
    stages = model_stages(tiny_llava)
    full = capture(tiny_llava, batch, stages)
    ran = []
    handle = tiny_llava.layers[0].register_forward_hook(lambda *_: ran.append(True))
    try:
        part = capture(tiny_llava, batch, [stages[0], stages[2]])  # vision.0 and the projector
    finally:
        handle.remove()
    assert not ran, "the LLM should not run when no LLM stage is requested"
    assert set(part) == {"vision.0", "projector"}
    torch.testing.assert_close(part["projector"], full["projector"], rtol=0, atol=0)
