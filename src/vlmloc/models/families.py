"""The family table: what differs between VLM families as data, not code branches.

One `Family` per supported architecture: which transformers class and config `model_type` it is,
how its processor is built, the image placeholder its prompts carry before the processor expands
it, and the named sites the engine hooks, as module paths from the model root:

| site | module |
|---|---|
| `lm` | the decoder stack (its input is the LM input; `lm.layers[L]` each LM layer) |
| `lm.layers` | the decoder's layer list |
| `projector` | the vision-to-LM projector |
| `vision` | the vision encoder |
| `vision.layers` | the vision encoder's layer list |

Each layer of `lm.layers` has `self_attn` (attention knockout) and `self_attn.o_proj` (its input
holds the heads' outputs, head-major). Adding a family is an entry here plus an adapter
(prompts, box parsing, the visual layout), see `vlmloc.models.adapter`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn


@dataclass(frozen=True)
class Family:
    """Facts of one VLM family (see the module docstring)."""

    name: str
    model_type: str  # config.json model_type of a transformers-native checkpoint
    model_class: str  # transformers class name
    image_processor: str  # transformers PIL image-processor class name
    image_placeholder: str  # one image in a prompt, before the processor expands it
    sites: Mapping[str, str]  # site -> dotted module path from the model root
    # (features keyword, visual-mask keyword) of the decoder stack's call when visual features also
    # enter the LM after its first layers (Qwen3-VL's DeepStack: a list of [n_visual, hidden] added
    # at the positions where the [batch, seq] mask is True); None when the LM input is the only entry.
    lm_visual_features: tuple[str, str] | None = None
    # Dynamic resolution: the processor resizes each image to its own token grid (multiples of
    # patch x merge px within the pixel budget), so there is no fixed grid per tile. Position probes
    # fix one: every probe image is fitted to `experiment.image_grid` (`vlmloc.probe_training`).
    dynamic_resolution: bool = False
    # The vision encoder's patches come in blocks of `vision_config.spatial_merge_size`^2, one block
    # per LM token in the LM tokens' order, row-major inside a block (the processor's patchify
    # order, which the merger concatenates); False: row-major over each tile's patch grid.
    vision_merge_blocks: bool = False
    # Generation may start from a filled KV cache of the image prefix (every token up to the image's
    # end, shared by a sample's rows: `vlmloc.engine.prefix.share_image_prefix`), the prompt's
    # other tokens and the answer computed per row. Checked equal to full recomputation for LLaVA
    # and InternVL (tests/test_prefix.py); not yet for Qwen-VL, whose M-RoPE positions generate
    # builds from the image grid at its first step, so those rows are computed in full.
    image_prefix_cache: bool = False


FAMILIES: dict[str, Family] = {
    "llava": Family(
        name="llava",
        model_type="llava",
        model_class="LlavaForConditionalGeneration",
        image_processor="LlavaImageProcessorPil",
        image_placeholder="<image>",
        sites={
            "lm": "model.language_model",
            "lm.layers": "model.language_model.layers",
            "projector": "model.multi_modal_projector",
            "vision": "model.vision_tower",
            "vision.layers": "model.vision_tower.encoder.layers",  # CLIP
        },
        image_prefix_cache=True,
    ),
    "internvl": Family(
        name="internvl",
        model_type="internvl",
        model_class="InternVLForConditionalGeneration",
        image_processor="GotOcr2ImageProcessorPil",
        image_placeholder="<IMG_CONTEXT>",
        sites={
            "lm": "model.language_model",
            "lm.layers": "model.language_model.layers",
            "projector": "model.multi_modal_projector",
            "vision": "model.vision_tower",
            "vision.layers": "model.vision_tower.encoder.layer",  # InternViT
        },
        image_prefix_cache=True,
    ),
    # Qwen2.5-VL: ViT with window attention (full attention in `fullatt_block_indexes`), a 2x2 patch
    # merger as projector, Qwen2 LM with M-RoPE. Its blocks and merger see the merge blocks in window
    # order (the merger's output is put back in order; `QwenVLAdapter.projector_rows`).
    "qwen2_5vl": Family(
        name="qwen2_5vl",
        model_type="qwen2_5_vl",
        model_class="Qwen2_5_VLForConditionalGeneration",
        image_processor="Qwen2VLImageProcessorPil",
        image_placeholder="<|image_pad|>",
        sites={
            "lm": "model.language_model",
            "lm.layers": "model.language_model.layers",
            "projector": "model.visual.merger",
            "vision": "model.visual",
            "vision.layers": "model.visual.blocks",
        },
        dynamic_resolution=True,
        vision_merge_blocks=True,
    ),
    # Qwen3-VL: ViT with full attention and learned position embeddings, a 2x2 merger, DeepStack
    # (merged features of some ViT layers added to the first LM layers' visual positions), Qwen3 LM
    # with interleaved M-RoPE.
    "qwen3vl": Family(
        name="qwen3vl",
        model_type="qwen3_vl",
        model_class="Qwen3VLForConditionalGeneration",
        image_processor="Qwen2VLImageProcessorPil",
        image_placeholder="<|image_pad|>",
        sites={
            "lm": "model.language_model",
            "lm.layers": "model.language_model.layers",
            "projector": "model.visual.merger",
            "vision": "model.visual",
            "vision.layers": "model.visual.blocks",
        },
        lm_visual_features=("deepstack_visual_embeds", "visual_pos_masks"),
        dynamic_resolution=True,
        vision_merge_blocks=True,
    ),
}


def family(name: str) -> Family:
    """The table entry of `model.family`, or a clear error naming the known ones."""
    if name not in FAMILIES:
        raise ValueError(f"model.family={name!r} is not one of {sorted(FAMILIES)}")
    return FAMILIES[name]


def site(model: nn.Module, fam: Family, name: str) -> Any:
    """The module at site `name` of `model` (a `fam` model); a clear error if the path is absent."""
    module: Any = model
    for part in fam.sites[name].split("."):
        if not hasattr(module, part):
            raise ValueError(f"{type(model).__name__} has no {fam.sites[name]!r} (site {name!r} of family "
                             f"{fam.name!r}): a transformers release that renamed it?")
        module = getattr(module, part)
    return module
