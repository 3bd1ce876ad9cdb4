"""Image+text processors built from a checkpoint's files without torchvision.

transformers' InternVLProcessor insists on a video processor, and the video processor needs
torchvision; the PIL image-processor backends need neither. The experiments only feed images,
so the project uses an image-only processor with the same text expansion
(`<img>` + 256 x tiles `<IMG_CONTEXT>` + `</img>`). The PIL backends also reproduce the
original models' PIL-based preprocessing, which the torchvision backends only approximate.
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
