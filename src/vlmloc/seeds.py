"""Seeded draws that do not depend on batching: one generator per (seed, keys)."""

from __future__ import annotations

import hashlib

import numpy as np


def row_rng(seed: int, *keys: object) -> np.random.Generator:
    """A generator seeded by (seed, keys): the same sample and condition draw the same tokens in any batch."""
    digest = hashlib.sha256(repr((seed, *keys)).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))
