"""Position probes on Qwen2.5-VL / Qwen3-VL: every captured activation's (row, col) label against an
independent computation, the fitted probe grid, and the experiment end to end.

- Vision stages: with the first block made the identity, its captured output is the patch embedding
  itself, so the row labelled (r, c) must be the patch embedding computed by hand from the pixels at
  rows r*p..(r+1)*p, cols c*p..(c+1)*p of the image (Qwen2.5-VL's tower holds the patches in window
  order, so this fails unless the capture puts them back).
- Projector and LLM stages: the captured projector rows are the LM's input at the layout's
  positions, and their labels are the model's own 3-D rotary rows / columns (`get_rope_index`).
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import compose_cfg, noise_image
from vlmloc import app
from vlmloc.data.images import fit_square
from vlmloc.engine.capture import (
    LLM,
    PROJECTOR,
    VISION,
    VisualCapture,
    capture,
    model_stages,
    stage_tokens,
    token_pixels,
)
from vlmloc.errors import ConfigError
from vlmloc.experiments import position_probe as pp
from vlmloc.models import load_adapter
from vlmloc.probe_training import ImageGridSettings, grid_images, probe_prompt
from vlmloc.reports.position_probe import position_grid

FAMILIES = ["tiny_qwen2_5vl", "tiny_qwen3vl"]
GRID = 16  # LM tokens per side of the probe grid (the experiment's default)
_CACHE: dict = {}


def _ad(name: str):
    if name not in _CACHE:
        _CACHE[name] = load_adapter(compose_cfg(f"model={name}").model)
    return _CACHE[name]


def _fitted_batch(ad, sizes=((300, 200), (120, 260))):
    fit = grid_images(ad, ImageGridSettings(GRID, "crop"))
    images = [fit(noise_image(w, h, seed=i)) for i, (w, h) in enumerate(sizes)]
    return images, ad.prepare(images, [probe_prompt(ad, "Describe the image.")] * len(images))


def _hand_patch_embeddings(ad, image) -> torch.Tensor:
    """[rows, cols, d_vision] patch embeddings computed from the image's pixels by hand: the processor's
    normalisation, the patch's pixels repeated over the 2 temporal slots, the conv as a matmul."""
    ip = ad.processor.image_processor
    p = int(ad.model.config.vision_config.patch_size)
    x = (np.asarray(image, dtype=np.float32) / 255.0 - np.asarray(ip.image_mean)) / np.asarray(ip.image_std)
    x = torch.as_tensor(x, dtype=torch.float32).permute(2, 0, 1)  # [3, H, W]
    rows, cols = x.shape[1] // p, x.shape[2] // p
    patches = x.reshape(3, rows, p, cols, p).permute(1, 3, 0, 2, 4)  # [rows, cols, 3, p, p]
    t = int(ad.model.config.vision_config.temporal_patch_size)
    patches = patches[:, :, :, None].expand(rows, cols, 3, t, p, p).reshape(rows, cols, -1)  # (C, T, ph, pw)
    conv = ad.vision_tower.patch_embed.proj
    out = patches @ conv.weight.reshape(conv.weight.shape[0], -1).T
    return out if conv.bias is None else out + conv.bias


def _identity_first_block(ad):
    """A forward hook that makes vision block 0 return its input (registered before the capture's)."""
    def identity(_m, args, kwargs, _out):
        return args[0] if args else kwargs["hidden_states"]

    return ad.vision_layers[0].register_forward_hook(identity, with_kwargs=True)


@pytest.mark.parametrize("name", FAMILIES)
def test_vision_stage_labels_locate_each_patch_by_its_pixels(name):
    ad = _ad(name)
    images, batch = _fitted_batch(ad)
    stage = model_stages(ad, GRID)[0]
    assert (stage.name, stage.grid, stage.patch_block) == ("vision.0", 2 * GRID, 2)
    pos_embed = getattr(ad.vision_tower, "pos_embed", None)  # Qwen3-VL adds learned positions before block 0
    saved = None if pos_embed is None else pos_embed.weight.detach().clone()
    raw = {}
    handles = [_identity_first_block(ad),
               ad.vision_layers[0].register_forward_hook(lambda _m, _a, out: raw.update(x=out.detach()))]
    try:
        if pos_embed is not None:
            with torch.no_grad():
                pos_embed.weight.zero_()
        acts = capture(ad, batch, [stage])["vision.0"]
    finally:
        for h in handles:
            h.remove()
        if saved is not None:
            with torch.no_grad():
                pos_embed.weight.copy_(saved)
    meta = stage_tokens(stage, batch.layouts)
    assert len(meta) == acts.shape[0] == len(images) * (2 * GRID) ** 2
    hand = torch.stack([_hand_patch_embeddings(ad, im) for im in images])  # [images, 32, 32, d]
    want = hand[torch.as_tensor(meta.batch_row), torch.as_tensor(meta.row), torch.as_tensor(meta.col)]
    torch.testing.assert_close(acts, want, atol=1e-4, rtol=1e-4)
    # every patch exactly once per image; the first token's 2x2 block first (merge-block order)
    for b in range(len(images)):
        sel = meta.batch_row == b
        assert len(set(zip(meta.row[sel], meta.col[sel]))) == (2 * GRID) ** 2
    assert list(zip(meta.row[:4], meta.col[:4])) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    windows = getattr(ad.model.config.vision_config, "window_size", None) is not None
    # the tower's own order is the window order on Qwen2.5-VL (the capture must undo it), the layout's on Qwen3-VL
    assert torch.equal(raw["x"], acts) != windows


@pytest.mark.parametrize("name", FAMILIES)
def test_projector_and_llm_labels_are_the_layouts_and_the_models_rope_grid(name):
    ad = _ad(name)
    _, batch = _fitted_batch(ad)
    stages = [s for s in model_stages(ad, GRID) if s.kind != VISION]
    assert [s.grid for s in stages] == [GRID] * len(stages)
    seen = {}

    def keep(_m, _a, kwargs):
        seen["embeds"] = kwargs["inputs_embeds"].detach()

    grab = ad.language_model.register_forward_pre_hook(keep, with_kwargs=True)
    try:
        with VisualCapture(ad, batch, stages) as acts, torch.no_grad():
            hidden = ad.model.model(**batch.inputs, use_cache=False, output_hidden_states=True).hidden_states
    finally:
        grab.remove()
    rows = torch.cat([torch.full((lay.n_visual,), i) for i, lay in enumerate(batch.layouts)])
    pos = torch.cat([torch.as_tensor(lay.positions) for lay in batch.layouts])
    # the projector rows are what the LM receives at the layout's positions (window order undone)
    torch.testing.assert_close(acts[PROJECTOR], seen["embeds"][rows, pos], rtol=0, atol=0)
    torch.testing.assert_close(acts[f"{LLM}.0"], hidden[1][rows, pos], rtol=0, atol=0)
    ins = batch.inputs
    rope, _ = ad.model.model.get_rope_index(ins["input_ids"], mm_token_type_ids=ins["mm_token_type_ids"],
                                            image_grid_thw=ins["image_grid_thw"], attention_mask=ins["attention_mask"])
    want_row = torch.cat([rope[1, i, torch.as_tensor(lay.positions)] - rope[1, i, lay.positions].min()
                          for i, lay in enumerate(batch.layouts)]).numpy()
    want_col = torch.cat([rope[2, i, torch.as_tensor(lay.positions)] - rope[2, i, lay.positions].min()
                          for i, lay in enumerate(batch.layouts)]).numpy()
    for s in stages:
        meta = stage_tokens(s, batch.layouts)
        np.testing.assert_array_equal(meta.row, np.concatenate([lay.row for lay in batch.layouts]))
        np.testing.assert_array_equal(meta.col, np.concatenate([lay.col for lay in batch.layouts]))
        np.testing.assert_array_equal(meta.row, want_row)
        np.testing.assert_array_equal(meta.col, want_col)
    assert want_row.max() == want_col.max() == GRID - 1


def test_probe_images_are_fitted_to_one_grid_within_the_pixel_budget(tiny_llava):
    ad = _ad("tiny_qwen2_5vl")
    assert token_pixels(ad) == 28 and token_pixels(_ad("tiny_qwen3vl")) == 32
    crop, pad = (grid_images(ad, ImageGridSettings(GRID, fit)) for fit in ("crop", "pad"))
    image = noise_image(300, 100, seed=3)
    for fitted in (crop(image), pad(image)):
        assert fitted.size == (448, 448) and ad.n_visual_tokens(*fitted.size) == GRID**2
    assert pad(image).getpixel((0, 0)) == (122, 116, 104)  # Qwen2.5-VL's (CLIP) mean colour
    square = fit_square(image, 100, "crop")
    assert np.array_equal(np.asarray(square), np.asarray(image.crop((100, 0, 200, 100))))
    assert fit_square(square, 100, "pad") is square
    assert grid_images(tiny_llava, ImageGridSettings(GRID, "crop")) is None  # its processor fixes the grid
    with pytest.raises(ConfigError, match="pixel budget"):  # 17 x 17 > the tiny build's 256 tokens
        grid_images(ad, ImageGridSettings(17, "crop"))
    with pytest.raises(ValueError, match="experiment.image_grid"):
        model_stages(ad)
    # images left at their own grids (4 x 21, 7 x 7 tokens) do not fit the probe grid: an error, not wrong labels
    for size in ((600, 100), (200, 200)):
        native = ad.prepare([noise_image(*size)], [probe_prompt(ad, "Describe the image.")])
        for stage in model_stages(ad, GRID)[:3]:
            with pytest.raises(ValueError, match="fitted to the probe grid"):
                stage_tokens(stage, native.layouts)


@pytest.mark.parametrize("name", FAMILIES)
def test_experiment_on_tiny_qwen_writes_a_row_per_stage(name, tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, (w, h) in enumerate([(300, 200), (120, 260), (448, 448), (500, 90), (200, 200)]):
        noise_image(w, h, seed=i).save(folder / f"img_{i}.png")
    cfg = compose_cfg(
        "experiment=position_probe", f"model={name}", "data=images", f"data.root={folder}", "data.n_train=3",
        "data.n_test=2", "batch_size=3", "experiment.probe.epochs=2", data_dir=tmp_path / "data",
    )
    assert cfg.experiment.image_grid.tokens_per_side == GRID
    run_dir = tmp_path / "run"
    app.run(cfg, run_dir, adapter=_ad(name))
    acc = pd.read_parquet(run_dir / pp.ACCURACY_FILE)
    assert list(acc.stage) == ["vision.0", "vision.1", "projector", "llm.0", "llm.1"]  # one row per stage
    assert list(acc.stage_index) == [0, 1, 2, 3, 4] and (acc.view == "all").all() and (acc.target == "position").all()
    assert acc.accuracy.between(0, 1).all()
    by = acc.set_index("stage")
    vision, lm = by.loc["vision.0"], by.loc["llm.1"]
    assert (vision.chance, vision.n_test_tokens, vision.n_train_tokens) == (pytest.approx(1 / 1024), 2 * 1024, 3 * 1024)
    assert (lm.chance, lm.n_test_tokens, lm.n_train_tokens) == (pytest.approx(1 / 256), 2 * 256, 3 * 256)
    per_pos = pd.read_parquet(run_dir / pp.PER_POSITION_FILE)
    assert position_grid(per_pos, "vision.1", "position").shape == (32, 32)
    assert position_grid(per_pos, "projector", "position").shape == (GRID, GRID)
    assert (per_pos[per_pos.stage == "llm.1"].n == 2).all()  # every test image has every cell once
    info = json.loads((run_dir / "run.json").read_text())["position_probe"]
    side = GRID * token_pixels(_ad(name))
    assert info["image_grid"] == {"tokens_per_side": GRID, "fit": "crop", "pixels": side}


def test_image_grid_enters_the_fingerprint_of_dynamic_resolution_families_only():
    """Changing the probe grid retrains Qwen-VL probes; LLaVA and InternVL ignore it, and their
    finished runs keep their fingerprints."""
    def fp(model, *more):
        return pp.fingerprint(compose_cfg("experiment=position_probe", f"model={model}", *more))

    other = "experiment.image_grid.tokens_per_side=8"
    assert fp("tiny_llava") == fp("tiny_llava", other) and fp("tiny_internvl") == fp("tiny_internvl", other)
    assert fp("tiny_qwen2_5vl") != fp("tiny_qwen2_5vl", other)
    assert fp("tiny_qwen3vl") != fp("tiny_qwen3vl", "experiment.image_grid.fit=pad")
