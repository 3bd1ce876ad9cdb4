"""Image+text processors built from a checkpoint's files without torchvision.

transformers' InternVLProcessor insists on a video processor, and the video processor needs
torchvision; the PIL image-processor backends need neither. The experiments only feed images,
so the project uses an image-only processor with the same text expansion
(`<img>` + 256 x tiles `<IMG_CONTEXT>` + `</img>`). The PIL backends also reproduce the
original models' PIL-based preprocessing, which the torchvision backends only approximate.
Qwen2.5-VL's and Qwen3-VL's processors want a video processor too; `qwen_image_processor` builds
them for images alone.
"""

from __future__ import annotations

import re

from transformers import InternVLProcessor
from transformers.processing_utils import ProcessorMixin


class InternVLImageProcessor(InternVLProcessor):
    """InternVLProcessor for images only: same tokens, same tiling, no video processor."""

    def __init__(self, image_processor=None, tokenizer=None, image_seq_length: int = 256, chat_template=None, **kwargs):
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template, **kwargs)
        self.image_seq_length = image_seq_length
        self.start_image_token = tokenizer.start_image_token
        self.end_image_token = tokenizer.end_image_token
        self.start_image_token_id = tokenizer.start_image_token_id
        self.end_image_token_id = tokenizer.end_image_token_id
        self.image_token = tokenizer.context_image_token
        self.video_token = getattr(tokenizer, "video_token", None) or "<video>"
        self.image_token_id = tokenizer.context_image_token_id
        self.multimodal_pattern = re.compile(
            f"(?P<image>{re.escape(self.image_token)})|(?P<video>{re.escape(self.video_token)})"
        )


def _image_only(base: type) -> type:
    """`base` (Qwen2_5_VLProcessor / Qwen3VLProcessor) for images only: the same expansion of
    `<|image_pad|>` into one token per merged 2x2 patch block, no video processor (it needs torchvision)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
        self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template, **kwargs)
        self.vision_start_token = getattr(tokenizer, "vision_start_token", None) or "<|vision_start|>"
        self.vision_end_token = getattr(tokenizer, "vision_end_token", None) or "<|vision_end|>"
        self.vision_start_token_id = tokenizer.convert_tokens_to_ids(self.vision_start_token)
        self.vision_end_token_id = tokenizer.convert_tokens_to_ids(self.vision_end_token)

    return type(f"{base.__name__}ImageOnly", (base,), {"__init__": __init__, "__doc__": _image_only.__doc__})


def qwen_image_processor(model_type: str, image_processor, tokenizer):
    """The image-only processor of a Qwen-VL family (`model_type` qwen2_5_vl or qwen3_vl)."""
    from transformers import Qwen2_5_VLProcessor, Qwen3VLProcessor

    bases = {"qwen2_5_vl": Qwen2_5_VLProcessor, "qwen3_vl": Qwen3VLProcessor}
    if model_type not in _QWEN_CLASSES:
        _QWEN_CLASSES[model_type] = _image_only(bases[model_type])
    return _QWEN_CLASSES[model_type](image_processor=image_processor, tokenizer=tokenizer)


_QWEN_CLASSES: dict[str, type] = {}
