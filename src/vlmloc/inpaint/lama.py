"""LaMa (big-lama) inpainting from its TorchScript checkpoint, the paper's object remover.

The checkpoint is the TorchScript export of big-lama (e.g. `big-lama.pt` of lama-cleaner /
simple-lama-inpainting; md5 e3aa4aaa15225a33ec84f9f4bc47e500). Its call convention:

    out = module(image, mask)   image float [B, 3, H, W] in [0, 1]; mask float [B, 1, H, W], 1 = hole
                                H, W multiples of 8; out float [B, 3, H, W] in [0, 1]

Padding: both image and mask are padded at the bottom/right to a multiple of `pad_multiple`
with *symmetric* (mirror) padding, as LaMa's own `pad_img_to_modulo` does. The mask must be
mirrored like the image: zero-padding it would hand the network mirrored object pixels as
known context wherever the object touches the bottom or right edge. The output is cropped
back to the input size; outside the hole the input pixels are restored exactly.
Batching: images are grouped by size (same size -> same padding, no extra context invented),
then run `batch_size` at a time.
"""

from __future__ import annotations

import hashlib
import logging
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from vlmloc.inpaint import InpaintError, Inpainter

log = logging.getLogger("vlmloc.inpaint")

BIG_LAMA_MD5 = "e3aa4aaa15225a33ec84f9f4bc47e500"


def file_md5(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.md5()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def resolve_device(name: str) -> torch.device:
    if str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(str(name))


def load_torchscript(path: str | Path | None, device: torch.device) -> torch.jit.ScriptModule:
    """torch.jit.load with errors that say what to do."""
    if path in (None, "", "???"):
        raise InpaintError("inpaint=lama needs inpaint.checkpoint=/path/to/big-lama.pt (the TorchScript file)")
    path = Path(str(path)).expanduser()
    if not path.is_file():
        raise InpaintError(
            f"LaMa checkpoint not found: {path}. Download big-lama.pt (TorchScript, md5 {BIG_LAMA_MD5}; "
            f"github.com/Sanster/models/releases, tag add_big_lama) and pass inpaint.checkpoint=<path>, "
            f"or use inpaint=opencv (no weights)."
        )
    try:
        module = torch.jit.load(str(path), map_location=device)
    except Exception as e:  # RuntimeError / zipfile errors / pickle errors, depending on the file
        raise InpaintError(
            f"{path} is not a loadable TorchScript module ({type(e).__name__}: {str(e).splitlines()[0][:200]}). "
            f"inpaint=lama needs the TorchScript export big-lama.pt, not a training checkpoint (.ckpt) "
            f"or a state dict; re-download it if the file is truncated."
        ) from e
    return module.eval()


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, C, H', W'] with H', W' the next multiples of `multiple`, padded at the
    bottom/right by mirroring (symmetric: the edge pixel is repeated, as numpy's 'symmetric')."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph == 0 and pw == 0:
        return x
    if ph > h or pw > w:  # tiny images: mirror more than once is not defined; repeat the edge
        return torch.nn.functional.pad(x, (0, pw, 0, ph), mode="replicate")
    # symmetric = flip of the last rows/cols including the edge row (torch's 'reflect' excludes it)
    if ph:
        x = torch.cat([x, x[..., h - ph :, :].flip(-2)], dim=-2)
    if pw:
        x = torch.cat([x, x[..., :, w - pw :].flip(-1)], dim=-1)
    return x


class LamaInpainter(Inpainter):
    backend = "lama"

    def __init__(
        self,
        checkpoint: str | Path | None,
        device: str = "auto",
        expected_md5: str | None = BIG_LAMA_MD5,
        pad_multiple: int = 8,
        **common: Any,
    ) -> None:
        super().__init__(**common)
        if int(pad_multiple) < 1:
            raise InpaintError(f"inpaint.pad_multiple must be >= 1, got {pad_multiple}")
        self.device = resolve_device(device)
        self.module = load_torchscript(checkpoint, self.device)
        self.checkpoint = str(Path(str(checkpoint)).expanduser().resolve())
        self.checkpoint_md5 = file_md5(Path(self.checkpoint))
        if expected_md5 and self.checkpoint_md5 != str(expected_md5):
            log.warning(
                "LaMa checkpoint %s has md5 %s, not the known big-lama.pt md5 %s: results may differ from the paper's",
                self.checkpoint, self.checkpoint_md5, expected_md5,
            )
        self.pad_multiple = int(pad_multiple)
        self._batched = True  # set False if the module rejects batches (see _forward)
        log.info("LaMa %s (md5 %s) on %s", self.checkpoint, self.checkpoint_md5, self.device)

    def info(self) -> dict[str, Any]:
        return {**super().info(), "checkpoint": self.checkpoint, "checkpoint_md5": self.checkpoint_md5,
                "pad_multiple": self.pad_multiple}

    def _fill(self, images: list[Image.Image], holes: list[np.ndarray], samples: list[Any]) -> list[Image.Image]:
        groups: dict[tuple[int, int], list[int]] = defaultdict(list)
        for i, im in enumerate(images):
            groups[(im.height, im.width)].append(i)
        out: list[Image.Image | None] = [None] * len(images)
        for idx in groups.values():
            for start in range(0, len(idx), self.batch_size):
                chunk = idx[start : start + self.batch_size]
                filled = self._run([images[i] for i in chunk], [holes[i] for i in chunk])
                for i, im in zip(chunk, filled):
                    out[i] = im
        return out  # type: ignore[return-value]

    @torch.inference_mode()
    def _run(self, images: list[Image.Image], holes: list[np.ndarray]) -> list[Image.Image]:
        """Same-size images -> filled images. image [B, 3, H, W] in [0, 1], mask [B, 1, H, W] 1 = hole."""
        h, w = holes[0].shape
        img = torch.from_numpy(np.stack([np.asarray(im) for im in images])).permute(0, 3, 1, 2)
        img = img.to(self.device, torch.float32) / 255.0
        mask = torch.from_numpy(np.stack(holes)[:, None].astype(np.float32)).to(self.device)
        img, mask = pad_to_multiple(img, self.pad_multiple), pad_to_multiple(mask, self.pad_multiple)
        res = self._forward(img, mask)
        if res.shape[0] != len(images) or res.shape[1] != 3 or res.shape[-2:] != img.shape[-2:]:
            raise InpaintError(
                f"LaMa module returned shape {tuple(res.shape)} for input {tuple(img.shape)}; "
                f"is {self.checkpoint} the big-lama TorchScript export?"
            )
        res = res[..., :h, :w].float().clamp(0, 1).mul(255).round().to(torch.uint8)
        return [Image.fromarray(a) for a in res.permute(0, 2, 3, 1).cpu().numpy()]

    def _forward(self, img: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self._batched or img.shape[0] == 1:
            try:
                return self.module(img, mask)
            except (RuntimeError, torch.jit.Error) as e:  # e.g. a trace specialised to batch 1, or out of memory
                if img.shape[0] == 1:
                    raise
                log.warning("LaMa failed on a batch of %d (%s); continuing one image at a time",
                            img.shape[0], str(e).splitlines()[0][:200])
                self._batched = False
                if img.is_cuda:
                    torch.cuda.empty_cache()
        return torch.cat([self.module(img[i : i + 1], mask[i : i + 1]) for i in range(img.shape[0])])
