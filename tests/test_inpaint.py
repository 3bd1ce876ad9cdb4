"""Inpainting backends: mask dilation, OpenCV changes only the dilated hole, the oracle re-renders
the scene without the object, the LaMa wrapper pads / crops / passes the mask as 1 = hole, and
bad checkpoints fail with clear errors."""

from __future__ import annotations

import hashlib
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import compose_cfg
from vlmloc.data import load_samples
from vlmloc.data.synthetic import OBJECT_INDEX_KEY, SCENE_KEY, render_scene
from vlmloc.inpaint import InpaintError, build_inpainter, dilate_mask
from vlmloc.inpaint.lama import BIG_LAMA_MD5, pad_to_multiple

SMALL = {"n_images": 4, "width": [120, 200], "height": [100, 160], "seed": 5}


# --------------------------------------------------------------------------- dilation


def test_dilate_mask_grows_a_disc_of_the_margin():
    m = np.zeros((41, 41), bool)
    m[20, 20] = True
    d = dilate_mask(m, 5)
    yy, xx = np.nonzero(d)
    r = np.hypot(yy - 20, xx - 20)
    assert r.max() <= 5 + 1e-9 and d[20, 15] and d[15, 20] and d[25, 20] and d[20, 25]
    assert not d[15, 15]  # a square kernel would reach the diagonal corner
    np.testing.assert_array_equal(dilate_mask(m, 0), m)
    with pytest.raises(InpaintError, match="dilate_px"):
        dilate_mask(m, -1)


# --------------------------------------------------------------------------- opencv


def _scene_with_halo(h: int = 60, w: int = 80):
    """Gradient background, a red square (the mask) and a 2 px yellow halo outside the mask, as
    an annotation one or two pixels too tight would leave."""
    x = np.linspace(40, 200, w)[None, :, None]
    img = np.broadcast_to(np.concatenate([x, x[..., :1] * 0 + 90, 255 - x], -1), (h, w, 3)).astype(np.uint8).copy()
    mask = np.zeros((h, w), bool)
    mask[20:40, 30:50] = True
    img[18:42, 28:52] = (255, 255, 0)
    img[mask] = (255, 0, 0)
    return Image.fromarray(img), mask


@pytest.mark.parametrize("method", ["telea", "ns"])
def test_opencv_changes_the_dilated_hole_and_nothing_else(method):
    image, mask = _scene_with_halo()
    inp = build_inpainter({"backend": "opencv", "method": method, "radius": 3, "dilate_px": 4})
    (out,) = inp.inpaint([image], [mask])
    a, b = np.asarray(image).astype(int), np.asarray(out).astype(int)
    hole = dilate_mask(mask, 4)
    assert out.size == image.size and out.mode == "RGB"
    np.testing.assert_array_equal(b[~hole], a[~hole])  # no pixel outside the hole changes
    assert (np.abs(b - a).sum(-1)[mask] > 0).all()  # every object pixel changes
    # neither the object colour nor its halo survives anywhere in the hole
    for colour in ((255, 0, 0), (255, 255, 0)):
        assert (np.abs(b[hole] - colour).sum(-1) > 60).all(), colour


def test_opencv_without_margin_leaves_the_halo():
    """The reason for the margin: with dilate_px=0 the object's edge (the halo) survives."""
    image, mask = _scene_with_halo()
    (out,) = build_inpainter({"backend": "opencv", "dilate_px": 0}).inpaint([image], [mask])
    b = np.asarray(out).astype(int)
    assert (np.abs(b - (255, 255, 0)).sum(-1) == 0).sum() > 50


def test_opencv_config_errors():
    with pytest.raises(InpaintError, match="method"):
        build_inpainter({"backend": "opencv", "method": "magic"})
    with pytest.raises(InpaintError, match="backend"):
        build_inpainter({"backend": "photoshop"})
    image, mask = _scene_with_halo()
    with pytest.raises(InpaintError, match="mask of shape"):
        build_inpainter({"backend": "opencv"}).inpaint([image], [mask[:10]])


# --------------------------------------------------------------------------- oracle


@pytest.fixture(scope="module")
def synthetic_samples(tmp_path_factory):
    root = tmp_path_factory.mktemp("syn")
    cfg = {"kind": "synthetic", "root": str(root), "split": "heldout", "synthetic": SMALL,
           "filters": {"min_area_frac": 0.0, "min_box_fill": 0.0}}
    return load_samples(cfg)[0]


def test_oracle_is_the_scene_rendered_without_that_object(synthetic_samples):
    samples = synthetic_samples[:4]
    inp = build_inpainter(compose_cfg("inpaint=oracle").inpaint)
    out = inp.inpaint([s.load_image() for s in samples], [s.mask() for s in samples], samples)
    for s, im in zip(samples, out):
        spec, k = s.meta[SCENE_KEY], s.meta[OBJECT_INDEX_KEY]
        want = np.asarray(render_scene(spec, skip_objects=[k]))
        np.testing.assert_array_equal(np.asarray(im), want)
        changed = (np.asarray(im) != np.asarray(s.load_image())).any(-1)
        assert changed.any() and not changed[~s.mask()].any()  # only the object's pixels changed
        others = [j for j in range(len(spec["objects"])) if j != k]
        if others:  # the other objects are still there
            assert not np.array_equal(want, np.asarray(render_scene(spec, skip_objects=[k, others[0]])))


def test_oracle_refuses_photos(synthetic_samples):
    import dataclasses

    photo = dataclasses.replace(synthetic_samples[0], meta={})
    inp = build_inpainter({"backend": "oracle"})
    with pytest.raises(InpaintError, match="synthetic"):
        inp.check_samples([photo])
    with pytest.raises(InpaintError, match="synthetic"):
        inp.inpaint([photo.load_image()], [photo.mask()], [photo])


# --------------------------------------------------------------------------- lama


class FakeLama(torch.nn.Module):
    """Same signature as big-lama's TorchScript: fills the hole (mask 1) with 0.25, checks inputs."""

    def forward(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        assert image.shape[-2] % 8 == 0 and image.shape[-1] % 8 == 0, "not padded to a multiple of 8"
        assert image.shape[1] == 3 and mask.shape[1] == 1 and mask.shape[0] == image.shape[0]
        assert mask.shape[-2:] == image.shape[-2:]
        assert image.dtype == torch.float32 and mask.dtype == torch.float32
        assert bool(image.min() >= 0.0) and bool(image.max() <= 1.0), "image must be in [0, 1]"
        assert bool(((mask == 0) | (mask == 1)).all()), "mask must be 0/1"
        return image * (1.0 - mask) + mask * 0.25


class CornerLama(torch.nn.Module):
    """Fills everything with the bottom-right pixel of the PADDED image: shows the padding mode."""

    def forward(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return image[:, :, -1:, -1:].expand(image.shape[0], 3, image.shape[2], image.shape[3]).contiguous()


class SingleLama(torch.nn.Module):
    """Rejects batches (as a trace specialised to batch 1 would)."""

    def forward(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if image.shape[0] != 1:
            raise RuntimeError("batch of more than one")
        return image * (1.0 - mask) + mask * 0.25


def _script(module: torch.nn.Module, path) -> str:
    torch.jit.script(module).save(str(path))
    return str(path)


def _noise(w: int, h: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _lama(path: str, **kw):
    return build_inpainter({"backend": "lama", "checkpoint": path, "device": "cpu", "dilate_px": 0, **kw})


def test_pad_to_multiple_is_numpy_symmetric():
    x = torch.arange(2 * 13 * 21, dtype=torch.float32).reshape(1, 2, 13, 21)
    got = pad_to_multiple(x, 8)
    want = np.pad(x.numpy(), ((0, 0), (0, 0), (0, 3), (0, 3)), mode="symmetric")
    assert got.shape == (1, 2, 16, 24)
    np.testing.assert_array_equal(got.numpy(), want)
    assert pad_to_multiple(x[..., :8, :16], 8).shape == (1, 2, 8, 16)  # already a multiple: untouched


def test_lama_pads_crops_back_and_fills_only_the_hole(tmp_path):
    inp = _lama(_script(FakeLama(), tmp_path / "fake.pt"), batch_size=2)
    images = [_noise(21, 13, 0), _noise(16, 16, 1), _noise(21, 13, 2)]
    masks = [np.zeros((im.height, im.width), bool) for im in images]
    for m in masks:
        m[3:9, 4:12] = True
    masks[0][-2:, -5:] = True  # a hole touching the bottom-right border
    out = inp.inpaint(images, masks)
    for im, m, o in zip(images, masks, out):
        a, b = np.asarray(im), np.asarray(o)
        assert o.size == im.size
        assert (b[m] == 64).all()  # 0.25 * 255, where mask = 1 (1 = hole)
        np.testing.assert_array_equal(b[~m], a[~m])


def test_lama_padding_is_symmetric_like_lamas_own(tmp_path):
    inp = _lama(_script(CornerLama(), tmp_path / "corner.pt"))
    im = _noise(21, 13, 3)
    mask = np.ones((13, 21), bool)
    (out,) = inp.inpaint([im], [mask])
    # padded 13x21 -> 16x24 symmetrically: padded row 15 = row 10, padded col 23 = col 18
    assert (np.asarray(out) == np.asarray(im)[10, 18]).all()


def test_lama_falls_back_to_single_images_when_batches_fail(tmp_path, caplog):
    inp = _lama(_script(SingleLama(), tmp_path / "single.pt"), batch_size=3)
    images = [_noise(16, 16, i) for i in range(3)]
    masks = [np.eye(16, dtype=bool)] * 3
    with caplog.at_level(logging.WARNING, logger="vlmloc.inpaint"):
        out = inp.inpaint(images, masks)
    assert "one image at a time" in caplog.text
    assert all((np.asarray(o)[np.eye(16, dtype=bool)] == 64).all() for o in out)


def test_lama_records_md5_and_warns_on_unknown_checkpoint(tmp_path, caplog):
    path = _script(FakeLama(), tmp_path / "fake.pt")
    with caplog.at_level(logging.WARNING, logger="vlmloc.inpaint"):
        inp = _lama(path)
    md5 = hashlib.md5(open(path, "rb").read()).hexdigest()
    assert inp.info()["checkpoint_md5"] == md5 != BIG_LAMA_MD5
    assert BIG_LAMA_MD5 in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="vlmloc.inpaint"):
        _lama(path, expected_md5=md5)
    assert caplog.text == ""
    assert inp.key() != build_inpainter({"backend": "opencv", "dilate_px": 0}).key()


def test_lama_bad_checkpoints_fail_clearly(tmp_path):
    with pytest.raises(InpaintError, match="not found.*big-lama"):
        _lama(str(tmp_path / "nope.pt"))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"this is not a zip archive" * 10)
    with pytest.raises(InpaintError, match="not a loadable TorchScript"):
        _lama(str(junk))
    state = tmp_path / "state.pt"
    torch.save({"w": torch.zeros(2)}, state)
    with pytest.raises(InpaintError, match="not a loadable TorchScript"):
        _lama(str(state))
    with pytest.raises(InpaintError, match="inpaint.checkpoint"):
        _lama(None)


# --------------------------------------------------------------------------- configs


def test_inpaint_configs_compose():
    assert "inpaint" not in compose_cfg()  # only experiments that inpaint carry the group
    assert compose_cfg("experiment=make_pairs").inpaint.backend == "opencv"
    cfg = compose_cfg("experiment=make_pairs", "inpaint=lama", "inpaint.checkpoint=/ckpt/big-lama.pt")
    assert cfg.inpaint.backend == "lama" and cfg.inpaint.checkpoint == "/ckpt/big-lama.pt"
    assert cfg.inpaint.expected_md5 == BIG_LAMA_MD5 and cfg.inpaint.pad_multiple == 8
    assert compose_cfg("experiment=make_pairs", "inpaint=oracle").inpaint.backend == "oracle"
    with pytest.raises(InpaintError, match=r"inpaint\.checkpoint is required"):
        build_inpainter(compose_cfg("experiment=make_pairs", "inpaint=lama").inpaint)
