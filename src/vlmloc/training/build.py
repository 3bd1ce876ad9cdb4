"""Fresh (untrained) demo models: the real LLaVA / InternVL classes at a trainable size.

The configs, tokenizers and processors come from `vlmloc.models.tiny` (the same builders the
tiny test models use, so the geometry is the real one); the weights are then re-drawn with the
transformers default initialisation (std = initializer_range), which trains, instead of the tiny
models' large random init, which only makes random answers input dependent.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from transformers import PreTrainedModel, ProcessorMixin

from vlmloc.models.families import family
from vlmloc.models.loading import prompt_corpus
from vlmloc.models.tiny import build_tiny

# Extra strings the InternVL tokenizer should learn merges for (its answer and grounding tags);
# digits stay single tokens in both families, as in the real Llama and Qwen vocabularies.
_INTERNVL_TAGS = ("<box>[[", "]]</box>", "<ref>", "</ref>", "<box>", "</box>", "[[", "]]")


def tokenizer_corpus(model_cfg: Any, categories: Sequence[str]) -> list[str]:
    """Texts the demo tokenizer's BPE is trained on: every prompt of every category, the answer words.

    No numbers: boxes are spelled digit by digit (the real Llama / Qwen tokenizers split digits too).
    """
    placeholder = family(str(model_cfg.family)).image_placeholder
    texts = prompt_corpus(model_cfg, categories)
    prefix = str(model_cfg.classification.answer_prefix)
    words = list(model_cfg.classification.yes_words) + list(model_cfg.classification.no_words)
    texts += [str(model_cfg.prompts.template).format(image=placeholder, question="q") + prefix + w for w in words] * 20
    if str(model_cfg.family) == "internvl":
        texts += list(_INTERNVL_TAGS) * 20
    return texts * 4


def build_demo(
    model_cfg: Any, arch: Mapping[str, Any], categories: Sequence[str], seed: int
) -> tuple[PreTrainedModel, ProcessorMixin]:
    """An untrained demo model and its processor (float32, eval mode off).

    arch: {tokenizer_vocab_size, vision: {...}, text: {...}} as in configs/train/*.yaml.
    """
    family = str(model_cfg.family)
    tiny = {"seed": int(seed), "tokenizer_vocab_size": int(arch["tokenizer_vocab_size"]),
            "vision": dict(arch["vision"]), "text": dict(arch["text"])}
    shell, processor = build_tiny(family, tiny, tokenizer_corpus(model_cfg, categories))
    if family == "internvl":
        # The image processor's own tiling bounds follow the model config (the adapter passes them
        # per call too); saved into preprocessor_config.json.
        processor.image_processor.max_patches = int(model_cfg.max_tiles)
        processor.image_processor.min_patches = int(model_cfg.min_tiles)
    torch.manual_seed(int(seed))
    model = type(shell)._from_config(shell.config, dtype=torch.float32)  # transformers' default init
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    return model, processor


def n_parameters(model: torch.nn.Module) -> dict[str, int]:
    """Parameter counts of the vision tower, projector, language model (with lm_head) and total."""
    inner = model.model
    counts = {
        "vision_tower": sum(p.numel() for p in inner.vision_tower.parameters()),
        "projector": sum(p.numel() for p in inner.multi_modal_projector.parameters()),
        "language_model": sum(p.numel() for p in inner.language_model.parameters())
        + sum(p.numel() for p in model.lm_head.parameters()),
    }
    counts["total"] = sum(p.numel() for p in model.parameters())
    return counts
