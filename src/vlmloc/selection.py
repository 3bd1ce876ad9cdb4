"""Token selection strategies (Table 1): which visual tokens of a row an intervention targets.

Every strategy returns sequence positions of one row ([k] int64, ascending), computed from the
row's VisualLayout, so they are valid with left padding and across InternVL tiles.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import numpy as np

from vlmloc.data.sample import Sample
from vlmloc.models.layout import VisualLayout

# (sample, its segmentation, the layout's grids, pad) -> per view token masks. One sample's rows
# under many conditions (77 in experiment=knockout) share its layout's grids; without the cache
# each row decodes the segmentation and builds a summed-area table of the whole image again.
_VIEW_MASKS: OrderedDict[tuple[Any, ...], dict[str, np.ndarray]] = OrderedDict()
_VIEW_MASKS_MAX = 4096


def object_tokens(layout: VisualLayout, sample: Sample, pad: int = 0, *, whole_image: bool = False) -> np.ndarray:
    """bool [n_visual]: the layout's tokens covering the sample's object (whole_image: any pixel of
    its image), grown/shrunk by `pad` rings; `VisualLayout.object_tokens` of the sample's mask."""
    key = (sample.sample_id, sample.image_id, sample.ann_id, str(sample.image_path), sample.width, sample.height,
           None if whole_image else repr(sample.segmentation), tuple(sorted(layout.grids.items())), int(pad))
    masks = _VIEW_MASKS.get(key)
    if masks is None:
        pixels = np.ones((sample.height, sample.width), dtype=bool) if whole_image else sample.mask()
        masks = _VIEW_MASKS[key] = layout.view_token_masks(pixels, pad)
        if len(_VIEW_MASKS) > _VIEW_MASKS_MAX:
            _VIEW_MASKS.popitem(last=False)
    else:
        _VIEW_MASKS.move_to_end(key)
    return layout.tokens_of(masks)


def object_positions(layout: VisualLayout, sample: Sample, pad: int = 0, view: str | None = None) -> np.ndarray:
    """Positions of the object's tokens (any-pixel overlap), grown/shrunk by `pad` rings, optionally one view."""
    selected = object_tokens(layout, sample, pad)
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
        pool = pool[object_tokens(layout, sample, whole_image=True)]
    count = min(int(count), len(pool))
    return np.sort(rng.choice(pool, size=count, replace=False))


def top_k_positions(layout: VisualLayout, scores: np.ndarray, k: int) -> np.ndarray:
    """Positions of the k highest scores ([n_visual] in layout order); ties broken by position."""
    k = min(int(k), layout.n_visual)
    order = np.lexsort((layout.positions, -np.asarray(scores, dtype=float)))
    return np.sort(layout.positions[order[:k]])
