"""Random-weight tiny builds of the real LLaVA-1.5, InternVL-3.5, Qwen2.5-VL and Qwen3-VL classes, fully offline.

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
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Tokenizer,
    Qwen2VLImageProcessorPil,
    Qwen3Config,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
)
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from vlmloc.models.processors import InternVLImageProcessor, qwen_image_processor

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
QWEN_SPECIALS = {
    "eos": "<|im_end|>",
    "pad": "<|endoftext|>",
    "start": "<|im_start|>",
    "vision_start": "<|vision_start|>",
    "vision_end": "<|vision_end|>",
    "image": "<|image_pad|>",
    "video": "<|video_pad|>",
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


def _byte_level_tokenizer(corpus: Iterable[str], vocab_size: int, specials: dict[str, str],
                          named: dict[str, str]) -> Qwen2Tokenizer:
    """Byte-level BPE as Qwen2Tokenizer (InternVL-3.5 and Qwen-VL both use it): `named` maps the
    processor's attribute names to keys of `specials`; the chat start and eos are added too."""
    vocab, merges = _train_bpe(corpus, vocab_size, metaspace=False)
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, eos_token=specials["eos"], pad_token=specials["pad"],
                         extra_special_tokens={name: specials[key] for name, key in named.items()})
    tok.add_special_tokens({"additional_special_tokens": [specials["start"], specials["eos"]]})
    tok.padding_side = "left"
    return tok


def tiny_internvl_tokenizer(corpus: Iterable[str], vocab_size: int) -> Qwen2Tokenizer:
    """InternVL's image special tokens."""
    return _byte_level_tokenizer(corpus, vocab_size, INTERNVL_SPECIALS, {
        "start_image_token": "img_start", "end_image_token": "img_end", "context_image_token": "img_context",
        "video_token": "video"})


def tiny_qwen_tokenizer(corpus: Iterable[str], vocab_size: int) -> Qwen2Tokenizer:
    """Qwen-VL's chat and vision special tokens."""
    return _byte_level_tokenizer(corpus, vocab_size, QWEN_SPECIALS, {
        "image_token": "image", "video_token": "video", "vision_start_token": "vision_start",
        "vision_end_token": "vision_end"})


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


# Real geometry of each Qwen family: patch size, merge, and the image processor's normalisation
# (Qwen2.5-VL: CLIP mean/std; Qwen3-VL: 0.5 / 0.5, as their preprocessor_config.json).
_QWEN = {
    "qwen2_5vl": (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, "qwen2_5_vl", 14, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD),
    "qwen3vl": (Qwen3VLConfig, Qwen3VLForConditionalGeneration, "qwen3_vl", 16, [0.5] * 3, [0.5] * 3),
}


def build_tiny_qwen(family: str, tiny: Mapping[str, Any], corpus: Iterable[str]) -> tuple[PreTrainedModel, ProcessorMixin]:
    """A Qwen2_5_VLForConditionalGeneration / Qwen3VLForConditionalGeneration with the real patch size,
    2x2 merge and M-RoPE, tiny widths (`tiny.vision`, `tiny.text`, `tiny.rope`: mrope_section sums to
    head_dim / 2) and an offline tokenizer."""
    config_cls, model_cls, model_type, patch, mean, std = _QWEN[family]
    tiny = _plain(tiny)  # strict config fields want plain lists, not OmegaConf ListConfig
    tok = tiny_qwen_tokenizer(corpus, int(tiny["tokenizer_vocab_size"]))
    vision = dict(patch_size=patch, spatial_merge_size=2, temporal_patch_size=2, **tiny["vision"])
    vision["out_hidden_size"] = int(tiny["text"]["hidden_size"])
    rope = {"rope_type": "default", **tiny["rope"]}
    text = dict(
        vocab_size=_vocab_size(tok),
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=None,
        max_position_embeddings=8192,
        tie_word_embeddings=False,
        rope_parameters=rope,
        **dict(tiny["text"]),
    )
    ids = {name: tok.convert_tokens_to_ids(QWEN_SPECIALS[key]) for name, key in
           [("image_token_id", "image"), ("video_token_id", "video"), ("vision_start_token_id", "vision_start"),
            ("vision_end_token_id", "vision_end")]}
    cfg = config_cls(vision_config=vision, text_config=text, tie_word_embeddings=False, **ids)
    model = _init(model_cls, cfg, int(tiny["seed"]))
    image_processor = Qwen2VLImageProcessorPil(patch_size=patch, merge_size=2, temporal_patch_size=2,
                                               image_mean=mean, image_std=std)
    return model, qwen_image_processor(model_type, image_processor, tok)


def _plain(tiny: Mapping[str, Any]) -> dict[str, Any]:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(tiny, resolve=True) if OmegaConf.is_config(tiny) else dict(tiny)  # type: ignore[return-value]


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
    """Dispatch on the model family ("llava", "internvl", "qwen2_5vl", "qwen3vl")."""
    builders = {"llava": build_tiny_llava, "internvl": build_tiny_internvl,
                "qwen2_5vl": lambda t, c: build_tiny_qwen("qwen2_5vl", t, c),
                "qwen3vl": lambda t, c: build_tiny_qwen("qwen3vl", t, c)}
    if family not in builders:
        raise ValueError(f"unknown model family {family!r}; expected one of {sorted(builders)}")
    return builders[family](tiny, corpus)
