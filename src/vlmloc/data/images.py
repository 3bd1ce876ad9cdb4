"""Image-folder data: every jpg/jpeg/png under a folder, split into train / test deterministically.

Used by experiments that need images but no annotations (the position probes). Works on the
ImageNet layout (`<root>/train/<wnid>/*.JPEG`) or on any folder of images, and on the project's
generated datasets (synthetic scenes, photo fixture), whose image folders are made on first use.

    split = load_image_split(cfg.data)      # ImageSplit(train=[Path...], test=[Path...], ...)
    image = open_rgb(split.train[0])
    loader = DataLoader(ImageFiles(split.train), batch_size=16, num_workers=8, collate_fn=list)

Determinism: the files are listed recursively and sorted by their path relative to the folder
(POSIX form, so the order is the same on every machine), then one seeded permutation
(`numpy.random.default_rng(seed)`) picks the test images first and the train images after them.
Changing `n_train` therefore never changes the test set. Both lists are returned sorted.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from vlmloc.data.coco import DataError

# Compared lower-cased: ImageNet ships ".JPEG".
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
# Data kinds an image split can be taken from: a plain folder, or a generated dataset's images.
IMAGE_KINDS = ("images", "synthetic", "fixture")


@dataclass(frozen=True)
class ImageSplit:
    """Train / test image paths (each sorted) drawn from `folder`, which holds `n_available` images."""

    folder: Path
    train: list[Path]
    test: list[Path]
    n_available: int
    seed: int

    def describe(self) -> dict[str, Any]:
        return {
            "folder": str(self.folder),
            "n_available": self.n_available,
            "n_train": len(self.train),
            "n_test": len(self.test),
            "seed": self.seed,
        }


def list_images(folder: str | os.PathLike) -> list[Path]:
    """All images under `folder` (recursive), sorted by relative POSIX path. DataError if none."""
    folder = Path(folder).expanduser()
    if not folder.exists():
        raise DataError(f"image folder {folder} does not exist: pass data.root=/path/to/images")
    if not folder.is_dir():
        raise DataError(f"image folder {folder} is not a folder: pass data.root=/path/to/images")
    found: list[str] = []
    # os.walk is much faster than Path.rglob on the 1.28M files of ImageNet's train split.
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel = os.path.relpath(dirpath, folder)
        for name in filenames:
            if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS):
                found.append(name if rel == "." else f"{Path(rel).as_posix()}/{name}")
    if not found:
        raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {folder}")
    return [folder / p for p in sorted(found)]


def split_images(
    paths: list[Path], n_train: int | None, n_test: int | None, seed: int, test_frac: float = 0.2
) -> tuple[list[Path], list[Path]]:
    """Seeded disjoint (train, test) subsets of `paths`, each sorted.

    n_test None -> round(test_frac * len(paths)) (at least 1); n_train None -> all the rest.
    """
    n = len(paths)
    if n_test is None:
        if not 0.0 < float(test_frac) < 1.0:
            raise DataError(f"data.test_frac must be in (0, 1), got {test_frac}")
        n_test = max(1, round(float(test_frac) * n))
    if n_train is None:
        n_train = n - n_test
    n_train, n_test = int(n_train), int(n_test)
    if n_train < 1 or n_test < 1:
        raise DataError(
            f"need at least one train and one test image, got n_train={n_train}, n_test={n_test} ({n} images)")
    if n_train + n_test > n:
        raise DataError(
            f"data.n_train={n_train} + data.n_test={n_test} exceeds the {n} images found; "
            "lower them or point data.root at a larger folder"
        )
    perm = np.random.default_rng(int(seed)).permutation(n)
    test = sorted(paths[i] for i in perm[:n_test])
    train = sorted(paths[i] for i in perm[n_test : n_test + n_train])
    return train, test


def image_folder(data_cfg: Mapping[str, Any]) -> Path:
    """The folder to list for a data config of kind images | synthetic | fixture (generated on first use)."""
    kind = data_cfg.get("kind")
    if kind == "images":
        folder = data_cfg.get("images") or data_cfg.get("root")
        if folder in (None, "", "???"):
            raise DataError("data.root is required for an image folder: pass data.root=/path/to/images")
        return Path(str(folder)).expanduser()
    if kind == "synthetic":
        from vlmloc.data.synthetic import ensure_synthetic

        ann = ensure_synthetic(data_cfg["root"], data_cfg.get("split", "heldout"), data_cfg.get("synthetic"))
        return ann.parent / "images"
    if kind == "fixture":
        from vlmloc.data.fixture import ensure_fixture

        return ensure_fixture(data_cfg["root"]).parent / "images"
    raise DataError(
        f"an image split needs data.kind in {list(IMAGE_KINDS)}, got {kind!r} (e.g. data=imagenet or data=images)")


def load_image_split(data_cfg: Any) -> ImageSplit:
    """`data` config -> ImageSplit. Keys: kind, root / images, n_train, n_test, test_frac, seed.

    Data configs without the split keys (synthetic, fixture) get the defaults: 20% test, rest train.
    """
    from vlmloc.data import plain_config  # the package imports this module lazily: no cycle

    cfg = plain_config(data_cfg, "an image split")
    folder = image_folder(cfg)
    paths = list_images(folder)
    seed = int(cfg.get("seed") or 0)
    train, test = split_images(paths, cfg.get("n_train"), cfg.get("n_test"), seed, cfg.get("test_frac", 0.2))
    return ImageSplit(folder=folder, train=train, test=test, n_available=len(paths), seed=seed)


def open_rgb(path: str | os.PathLike) -> Image.Image:
    """The image as RGB (ImageNet holds some greyscale and CMYK JPEGs), fully decoded."""
    with Image.open(path) as im:
        return im.convert("RGB")


SQUARE_FITS = ("crop", "pad")


def fit_square(image: Image.Image, side: int, fit: str, fill: tuple[int, int, int] = (0, 0, 0)) -> Image.Image:
    """The image as a side x side square: `crop` takes the centred square of the short side, `pad`
    centres the image on a square of the long side filled with `fill`; then a bicubic resize to
    `side` (the Qwen-VL processors' own resampling). An image already side x side comes back as is."""
    if fit not in SQUARE_FITS:
        raise ValueError(f"fit must be one of {SQUARE_FITS}, got {fit!r}")
    w, h = image.size
    if (w, h) == (side, side):
        return image
    if fit == "crop":
        s = min(w, h)
        left, top = (w - s) // 2, (h - s) // 2
        square = image.crop((left, top, left + s, top + s))
    else:
        s = max(w, h)
        square = Image.new("RGB", (s, s), tuple(fill))
        square.paste(image, ((s - w) // 2, (s - h) // 2))
    return square.resize((side, side), Image.Resampling.BICUBIC)


class ImageFiles:
    """Images decoded on access, a map-style dataset for `torch.utils.data.DataLoader`: with
    workers, JPEG decoding runs in them instead of on the GPU's critical path, and so does
    `transform` (image -> image; picklable, e.g. a `functools.partial` of `fit_square`) if given."""

    def __init__(
        self, paths: Sequence[str | os.PathLike], transform: Callable[[Image.Image], Image.Image] | None = None
    ) -> None:
        self.paths = list(paths)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Image.Image:
        image = open_rgb(self.paths[i])
        return image if self.transform is None else self.transform(image)
