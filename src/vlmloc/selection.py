"""Token selection strategies (Table 1): which visual tokens of a row an intervention targets.

Every strategy returns sequence positions of one row ([k] int64, ascending), computed from the
row's VisualLayout, so they are valid with left padding and across InternVL tiles.
"""

from __future__ import annotations


import numpy as np

from vlmloc.data.sample import Sample
from vlmloc.models.layout import VisualLayout


def object_positions(layout: VisualLayout, sample: Sample, pad: int = 0, view: str | None = None) -> np.ndarray:
    """Positions of the object's tokens (any-pixel overlap), grown/shrunk by `pad` rings, optionally one view."""
    selected = layout.object_tokens(sample.mask(), pad)
    if view is not None:
        selected &= layout.in_view(view)
    return layout.positions[selected]


RANDOM_FROM = ("image", "all")


def random_positions(
    layout: VisualLayout, count: int, rng: np.random.Generator, sample: Sample | None = None, among: str = "all"
) -> np.ndarray:
    """`count` distinct visual-token positions drawn uniformly from `among`: every visual token
    ("all"), or those whose cell covers some pixel of `sample`'s image ("image": a padded LLaVA
    square's grey border is left out, so the random control ablates image content as the object
    tokens do)."""
    if among not in RANDOM_FROM:
        raise ValueError(f"random tokens are drawn from one of {list(RANDOM_FROM)}, got {among!r}")
    pool = layout.positions
    if among == "image":
        if sample is None:
            raise ValueError("random tokens from the image area need the sample")
        pool = pool[layout.object_tokens(np.ones((sample.height, sample.width), dtype=bool), 0)]
    count = min(int(count), len(pool))
    return np.sort(rng.choice(pool, size=count, replace=False))


def top_k_positions(layout: VisualLayout, scores: np.ndarray, k: int) -> np.ndarray:
    """Positions of the k highest scores ([n_visual] in layout order); ties broken by position."""
    k = min(int(k), layout.n_visual)
    order = np.lexsort((layout.positions, -np.asarray(scores, dtype=float)))
    return np.sort(layout.positions[order[:k]])
