"""Visual layouts agree with where the model's own masked_scatter puts every projector output."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import noise_image
from vlmloc import geometry
from vlmloc.models import GLOBAL, LOCAL


def _capture(adapter, batch):
    """(inputs_embeds at the LM input [B, T, D], projector output [n_images_or_tiles, n_tok, D])."""
    seen = {}

    def grab_embeds(module, args, kwargs):
        seen["embeds"] = kwargs["inputs_embeds"].detach().clone()

    def grab_proj(module, args, out):
        seen["proj"] = out.detach().clone()

    h1 = adapter.language_model.register_forward_pre_hook(grab_embeds, with_kwargs=True)
    h2 = adapter.projector.register_forward_hook(grab_proj)
    try:
        with torch.no_grad():
            adapter.model(**batch.inputs)
    finally:
        h1.remove()
        h2.remove()
    return seen["embeds"], seen["proj"]


def test_llava_layout_matches_masked_scatter_with_left_padding(tiny_llava):
    ad = tiny_llava
    images = [noise_image(300, 200, 0), noise_image(120, 260, 1)]
    # Different prompt lengths force left padding on the shorter row.
    texts = [ad.prompt("classification", "cat"), ad.prompt("localization", "a very long category name here")]
    batch = ad.prepare(images, texts)
    assert (batch.inputs["attention_mask"][0] == 0).any(), "row 0 should be left padded"
    embeds, proj = _capture(ad, batch)
    for i, lay in enumerate(batch.layouts):
        assert lay.n_visual == 576 and lay.n_tiles == 1
        assert torch.equal(embeds[i, torch.as_tensor(lay.positions)], proj[i])
        np.testing.assert_array_equal(lay.row * 24 + lay.col, np.arange(576))
        assert set(lay.view) == {GLOBAL}
        # padding shifts the image span: positions are contiguous and start after the pads
        pads = int((batch.inputs["attention_mask"][i] == 0).sum())
        assert lay.positions[0] >= pads and np.all(np.diff(lay.positions) == 1)


def test_internvl_layout_matches_masked_scatter_with_tiles_and_padding(tiny_internvl):
    ad = tiny_internvl
    images = [noise_image(900, 300, 0), noise_image(448, 448, 1), noise_image(300, 500, 2)]
    texts = [ad.prompt("classification", "cat")] * 3
    batch = ad.prepare(images, texts)
    embeds, proj = _capture(ad, batch)
    offset = 0
    tiles_seen = []
    for i, (im, lay) in enumerate(zip(images, batch.layouts)):
        feats = proj[offset : offset + lay.n_tiles].reshape(-1, proj.shape[-1])
        offset += lay.n_tiles
        assert torch.equal(embeds[i, torch.as_tensor(lay.positions)], feats)
        n_cols, n_rows = geometry.internvl_tiling(im.width, im.height, max_tiles=int(ad.cfg.max_tiles))
        tiles_seen.append((n_cols, n_rows, lay.n_tiles))
    assert offset == proj.shape[0]
    # 900x300 -> 3x1 crops + thumbnail; 448x448 -> one tile, no thumbnail; 300x500 (aspect 0.6) -> 2x3 + thumbnail
    assert tiles_seen == [(3, 1, 4), (1, 1, 1), (2, 3, 7)]
    wide = batch.layouts[0]
    assert (wide.view[: 3 * 256] == LOCAL).all() and (wide.view[3 * 256 :] == GLOBAL).all()
    # token 17 of tile 2 sits on canvas row 1, col 2*16 + 1
    j = 2 * 256 + 17
    assert (wide.tile[j], wide.row[j], wide.col[j], wide.canvas_row[j], wide.canvas_col[j]) == (2, 1, 1, 1, 33)
    # padding: the single-tile row is shortest, so it is left padded
    assert (batch.inputs["attention_mask"][1] == 0).sum() > 0


def test_internvl_tiles_are_the_crops_the_layout_assumes(tiny_internvl):
    """Tile k of the processor output is crop (k // n_cols, k % n_cols) of the resized image; thumbnail last."""
    ad = tiny_internvl
    im = noise_image(900, 300, 3)
    batch = ad.prepare([im], [ad.prompt("classification", "cat")])
    pix = batch.inputs["pixel_values"].float()
    ip = ad.processor.image_processor
    resized = im.resize((3 * 448, 448), Image.Resampling.BICUBIC)
    mean = torch.tensor(ip.image_mean).view(3, 1, 1)
    std = torch.tensor(ip.image_std).view(3, 1, 1)

    def norm(img):
        return (torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).permute(2, 0, 1) - mean) / std

    for k in range(3):
        crop = norm(resized.crop((k * 448, 0, (k + 1) * 448, 448)))
        assert torch.allclose(pix[k], crop, atol=0.05), f"tile {k} is not crop {k}"
    thumb = norm(im.resize((448, 448), Image.Resampling.BICUBIC))
    assert torch.allclose(pix[3], thumb, atol=0.05)


def test_internvl_pixel_shuffle_keeps_row_major_2x2_blocks(tiny_internvl):
    """Token (r, c) of a tile carries ViT patches rows 2r..2r+1, cols 2c..2c+1."""
    ad = tiny_internvl
    n = 32  # 448 / 14 patches per side
    patch_id = torch.arange(n * n, dtype=torch.float32).view(1, n, n, 1)
    shuffled = ad.model.model.pixel_shuffle(patch_id, scale_factor=0.5)  # [1, 16, 16, 4]
    for r, c in [(0, 0), (3, 7), (15, 0), (9, 14)]:
        got = sorted(int(v) for v in shuffled[0, r, c])
        want = sorted((2 * r + dr) * n + 2 * c + dc for dr in (0, 1) for dc in (0, 1))
        assert got == want


@pytest.mark.parametrize("family", ["tiny_llava", "tiny_internvl"])
def test_patch_embedding_is_row_major(family, request):
    """Changing one 14x14 pixel patch changes exactly patch (row, col) = divmod(j, grid) of the ViT input."""
    ad = request.getfixturevalue(family)
    size = ad.model.config.vision_config.image_size
    size = size[0] if isinstance(size, (list, tuple)) else size
    n = size // 14
    pix = torch.zeros(1, 3, size, size)
    emb = ad.vision_tower.embeddings
    base = emb(pix)
    pix2 = pix.clone()
    pix2[..., 5 * 14 : 6 * 14, 9 * 14 : 10 * 14] = 1.0  # patch row 5, col 9
    diff = (emb(pix2) - base).abs().sum(-1)[0]
    diff = diff[-n * n :]  # drop CLS where present
    assert torch.nonzero(diff > 1e-6).flatten().tolist() == [5 * n + 9]


def test_object_tokens_on_layout(tiny_internvl, tiny_llava):
    """A mask on the left third of a 900x300 image: the right local tile and thumbnail columns >= 6 are empty."""
    mask = np.zeros((300, 900), bool)
    mask[100:200, 0:300] = True
    ad = tiny_internvl
    batch = ad.prepare([noise_image(900, 300)], [ad.prompt("classification", "x")])
    lay = batch.layouts[0]
    sel = lay.object_tokens(mask)
    assert sel[lay.tile == 0].sum() == 16 * 6  # rows 100..199 of 300 -> token rows 5..10 (any overlap) x 16 cols
    assert sel[(lay.tile == 1) | (lay.tile == 2)].sum() == 0
    thumb = sel[lay.tile == 3].reshape(16, 16)
    assert thumb[:, 6:].sum() == 0 and thumb[5:11, :6].all()
    grown = lay.object_tokens(mask, pad=1)
    assert grown[lay.tile == 1].reshape(16, 16)[:, 0].sum() == 8  # the ring crosses into tile 1
    # LLaVA: padded square 900x900, image rows 300..599 of the square; mask rows 400..499 -> token rows 10..13
    lb = tiny_llava.prepare([noise_image(900, 300)], [tiny_llava.prompt("classification", "x")])
    lsel = lb.layouts[0].object_tokens(mask).reshape(24, 24)
    assert np.array_equal(np.nonzero(lsel.any(1))[0], np.arange(10, 14))
    assert np.array_equal(np.nonzero(lsel.any(0))[0], np.arange(0, 8))


def test_object_tokens_of_a_sample_are_cached_per_segmentation_and_pad(tiny_llava):
    """The cached selection equals the layout's own on the decoded mask; a sample with the same ids
    but another segmentation, or another pad, is not served the cached masks."""
    from vlmloc.data.sample import Sample
    from vlmloc.selection import object_positions, object_tokens

    def sample(poly: list[float]) -> Sample:
        return Sample("s0", 1, 1, Path("img.png"), 900, 300, "x", 1, (0, 0, 1, 1), [poly])

    left = sample([0, 100, 300, 100, 300, 200, 0, 200])  # the left third, rows 100..199
    right = sample([600, 100, 900, 100, 900, 200, 600, 200])
    lay = tiny_llava.prepare([noise_image(900, 300)], [tiny_llava.prompt("classification", "x")]).layouts[0]
    mask = np.zeros((300, 900), bool)
    mask[100:200, 0:300] = True
    for pad in (0, 1, 0):
        assert np.array_equal(object_tokens(lay, left, pad), lay.object_tokens(mask, pad))
    hand = np.zeros((300, 900), bool)
    hand[100:200, 600:900] = True
    assert np.array_equal(object_tokens(lay, right), lay.object_tokens(hand))
    assert not object_tokens(lay, left)[object_tokens(lay, right)].any()
    assert np.array_equal(object_positions(lay, left), lay.positions[lay.object_tokens(mask)])
    whole = object_tokens(lay, left, whole_image=True).reshape(24, 24)  # image rows 300..599 of the 900 square
    assert np.array_equal(np.nonzero(whole.any(1))[0], np.arange(8, 16))
