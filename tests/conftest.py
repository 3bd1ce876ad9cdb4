"""Shared fixtures: composed configs and tiny adapters (built once per test session)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from PIL import Image

from vlmloc.__main__ import config_dir

CONFIG_DIR = str(config_dir())
torch.set_num_threads(min(2, os.cpu_count() or 1))


def compose_cfg(*overrides: str, data_dir: Path | None = None) -> DictConfig:
    """The root config with overrides, as `python -m vlmloc` would compose it."""
    extra = [f"paths.data_dir={data_dir}"] if data_dir is not None else []
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("config", overrides=[*overrides, *extra])


@pytest.fixture(scope="session")
def tiny_llava():
    from vlmloc.models import load_adapter

    return load_adapter(compose_cfg("model=tiny_llava").model)


@pytest.fixture(scope="session")
def tiny_internvl():
    from vlmloc.models import load_adapter

    return load_adapter(compose_cfg("model=tiny_internvl").model)


def noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def hand_object_tokens(sample, grid: int = 24) -> list[int]:
    """Row-major token indices whose cell of LLaVA's padded square overlaps a mask pixel, brute force."""
    mask = sample.mask()
    h, w = mask.shape
    side = max(w, h)
    left, top = (side - w) // 2, (side - h) // 2
    cell = side / grid
    out = []
    for r in range(grid):
        for c in range(grid):
            x0, x1 = c * cell - left, (c + 1) * cell - left  # the cell in original pixels
            y0, y1 = r * cell - top, (r + 1) * cell - top
            cols = [j for j in range(w) if j + 1 > x0 + 1e-9 and j < x1 - 1e-9]
            rows = [i for i in range(h) if i + 1 > y0 + 1e-9 and i < y1 - 1e-9]
            if cols and rows and mask[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].any():
                out.append(r * grid + c)
    return out
