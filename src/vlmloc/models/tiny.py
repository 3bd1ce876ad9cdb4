"""Random-weight tiny builds of the real LLaVA-1.5 and InternVL-3.5 classes, fully offline.

The tiny models keep every real code path (vision tower, projector, masked_scatter, the LM
decoder, generation); only the sizes differ. Their tokenizers are small BPEs trained in-process
on the prompts the configs produce, wrapped in the same tokenizer classes the real checkpoints
use (LlamaTokenizer, Qwen2Tokenizer), so prompts, special tokens and answers tokenize the way
the adapters expect.

Usage::

    model, processor = build_tiny("llava", cfg.tiny, corpus)
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    CLIPVisionConfig,
    GotOcr2ImageProcessorPil,
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLVisionConfig,
    LlamaConfig,
    LlamaTokenizer,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaImageProcessorPil,
    LlavaProcessor,
    PreTrainedModel,
    ProcessorMixin,
    Qwen2Tokenizer,
    Qwen3Config,
)
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from vlmloc.models.processors import InternVLImageProcessor

# Characters every tiny tokenizer can spell, so no prompt or answer ever hits <unk>.
_ALPHABET = [chr(c) for c in range(32, 127)] + ["\n"]
LLAVA_SPECIALS = {"unk": "<unk>", "bos": "<s>", "eos": "</s>", "image": "<image>"}
INTERNVL_SPECIALS = {
    "eos": "<|im_end|>",
    "pad": "<|endoftext|>",
    "start": "<|im_start|>",
    "img_start": "<img>",
    "img_end": "</img>",
    "img_context": "<IMG_CONTEXT>",
    "video": "<video>",
}


def _train_bpe(corpus: Iterable[str], vocab_size: int, metaspace: bool) -> tuple[dict[str, int], list]:
    """Train a small BPE; returns (vocab, merges) ready for the transformers tokenizer classes."""
    tok = Tokenizer(models.BPE())
    if metaspace:
        # Llama style: "▁" marks word starts; split=True keeps merges inside words.
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
        alphabet = [c if c != " " else "▁" for c in _ALPHABET]
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False, initial_alphabet=alphabet)
    tok.train_from_iterator(list(corpus), trainer)
    model = json.loads(tok.to_str())["model"]
    vocab = dict(sorted(model["vocab"].items(), key=lambda kv: kv[1]))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    return vocab, merges


def tiny_llava_tokenizer(corpus: Iterable[str], vocab_size: int) -> LlamaTokenizer:
    """LlamaTokenizer (byte fallback, metaspace) with `<image>` as a special token."""
    trained, merges = _train_bpe(corpus, vocab_size, metaspace=True)
    vocab = {LLAVA_SPECIALS["unk"]: 0, LLAVA_SPECIALS["bos"]: 1, LLAVA_SPECIALS["eos"]: 2}
    for b in range(256):  # byte-fallback tokens, as in the real Llama vocabulary
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for piece in trained:
        vocab.setdefault(piece, len(vocab))
    tok = LlamaTokenizer(
        vocab=vocab,
        merges=merges,
        extra_special_tokens={"image_token": LLAVA_SPECIALS["image"]},
    )
    tok.pad_token = LLAVA_SPECIALS["unk"]  # llava-hf pads with <unk> too
    tok.padding_side = "left"
    return tok


def tiny_internvl_tokenizer(corpus: Iterable[str], vocab_size: int) -> Qwen2Tokenizer:
    """Byte-level BPE as Qwen2Tokenizer, with InternVL's image special tokens."""
    vocab, merges = _train_bpe(corpus, vocab_size, metaspace=False)
    s = INTERNVL_SPECIALS
    tok = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        eos_token=s["eos"],
        pad_token=s["pad"],
        extra_special_tokens={
            "start_image_token": s["img_start"],
            "end_image_token": s["img_end"],
            "context_image_token": s["img_context"],
            "video_token": s["video"],
        },
    )
    tok.add_special_tokens({"additional_special_tokens": [s["start"], s["eos"]]})
    tok.padding_side = "left"
    return tok


def _vocab_size(tok: Any) -> int:
    # Round up so lm_head rows exist for every id, added tokens included.
    return ((len(tok) + 63) // 64) * 64


def build_tiny_llava(tiny: Mapping[str, Any], corpus: Iterable[str]) -> tuple[PreTrainedModel, ProcessorMixin]:
    """A LlavaForConditionalGeneration with LLaVA-1.5's geometry (336 px, patch 14, 24x24) and tiny widths."""
    tok = tiny_llava_tokenizer(corpus, int(tiny["tokenizer_vocab_size"]))
    vision = CLIPVisionConfig(image_size=336, patch_size=14, **dict(tiny["vision"]))
    text = LlamaConfig(
        vocab_size=_vocab_size(tok),
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        max_position_embeddings=2048,
        **dict(tiny["text"]),
    )
    cfg = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tok.image_token_id,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_seq_length=576,
        projector_hidden_act="gelu",
    )
    model = _init(LlavaForConditionalGeneration, cfg, int(tiny["seed"]))
    image_processor = LlavaImageProcessorPil(
        size={"shortest_edge": 336},
        crop_size={"height": 336, "width": 336},
        image_mean=OPENAI_CLIP_MEAN,
        image_std=OPENAI_CLIP_STD,
        do_pad=True,
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    return model, processor


def build_tiny_internvl(tiny: Mapping[str, Any], corpus: Iterable[str]) -> tuple[PreTrainedModel, ProcessorMixin]:
    """An InternVLForConditionalGeneration with InternVL-3.5's tiling geometry and a GQA Qwen3 LM."""
    tok = tiny_internvl_tokenizer(corpus, int(tiny["tokenizer_vocab_size"]))
    vision = InternVLVisionConfig(image_size=448, patch_size=14, **dict(tiny["vision"]))
    text = Qwen3Config(
        vocab_size=_vocab_size(tok),
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        max_position_embeddings=8192,
        tie_word_embeddings=False,
        **dict(tiny["text"]),
    )
    cfg = InternVLConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tok.context_image_token_id,
        image_seq_length=256,
        downsample_ratio=0.5,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    model = _init(InternVLForConditionalGeneration, cfg, int(tiny["seed"]))
    image_processor = GotOcr2ImageProcessorPil(
        size={"height": 448, "width": 448},
        crop_to_patches=True,
        min_patches=1,
        max_patches=12,
        image_mean=OPENAI_CLIP_MEAN,
        image_std=OPENAI_CLIP_STD,
    )
    processor = InternVLImageProcessor(image_processor=image_processor, tokenizer=tok, image_seq_length=256)
    return model, processor


def _init(cls: type[PreTrainedModel], cfg: Any, seed: int) -> PreTrainedModel:
    torch.manual_seed(seed)
    model = cls._from_config(cfg, dtype=torch.float32)
    # Tiny random weights give nearly flat logits; a larger init makes answers depend on the input.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.2)
    return model.eval()


def build_tiny(family: str, tiny: Mapping[str, Any], corpus: Iterable[str]) -> tuple[PreTrainedModel, ProcessorMixin]:
    """Dispatch on the model family ("llava" or "internvl")."""
    builders = {"llava": build_tiny_llava, "internvl": build_tiny_internvl}
    if family not in builders:
        raise ValueError(f"unknown model family {family!r}; expected one of {sorted(builders)}")
    return builders[family](tiny, corpus)
