"""Oracle inpainting for synthetic scenes: re-render the scene without the object.

The result is the exact background under the object (objects never overlap and are drawn last),
so it isolates the model's response to the object's absence from any inpainting artefact.
Needs the scene spec the synthetic loader puts in `Sample.meta` ("vlmloc_scene",
"vlmloc_object_index").
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

from vlmloc.data.synthetic import OBJECT_INDEX_KEY, SCENE_KEY, render_scene
from vlmloc.inpaint import InpaintError, Inpainter


class OracleInpainter(Inpainter):
    backend = "oracle"

    def check_samples(self, samples: Any) -> None:
        bad = [s.sample_id for s in samples if SCENE_KEY not in s.meta or OBJECT_INDEX_KEY not in s.meta]
        if bad:
            raise InpaintError(
                f"inpaint=oracle needs synthetic scenes (data=synthetic); {len(bad)} sample(s) have no "
                f"scene spec, e.g. {bad[:3]}. Use inpaint=opencv or inpaint=lama for photos."
            )

    def _fill(self, images: list[Image.Image], holes: list[np.ndarray], samples: list[Any]) -> list[Image.Image]:
        if any(s is None for s in samples):
            raise InpaintError("inpaint=oracle needs the samples (their scene specs), got none")
        self.check_samples(samples)
        out = []
        for im, s in zip(images, samples):
            clean = render_scene(s.meta[SCENE_KEY], skip_objects=[int(s.meta[OBJECT_INDEX_KEY])])
            if clean.size != im.size:
                raise InpaintError(f"{s.sample_id}: scene spec renders {clean.size}, image is {im.size}")
            out.append(clean)
        return out
