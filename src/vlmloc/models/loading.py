"""Load a VLM adapter from the `model` config: a hub id, a local folder, or a tiny random build.

Every check that can fail without touching weights runs first, so a bad path or a missing
download fails in seconds with a message that says what to do.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from vlmloc.assets import ASSETS_DIR
from vlmloc.compat import warn_if_untested
from vlmloc.errors import VlmlocError
from vlmloc.models.adapter import VLMAdapter
from vlmloc.models.families import family as family_facts
from vlmloc.models.internvl import InternVLAdapter
from vlmloc.models.llava import LlavaAdapter
from vlmloc.models.qwen import Qwen3VLAdapter, QwenVLAdapter

log = logging.getLogger("vlmloc.models")

# What is not data in the family table (prompts' parsing, layouts): one adapter class per family.
ADAPTERS: dict[str, type[VLMAdapter]] = {"llava": LlavaAdapter, "internvl": InternVLAdapter,
                                         "qwen2_5vl": QwenVLAdapter, "qwen3vl": Qwen3VLAdapter}
_WEIGHT_GLOBS = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json")
# Example corpus for tiny tokenizers: any other word is still spelled from the byte alphabet.
_TINY_WORDS = ("cat", "person", "cup", "rocket", "dog", "car", "circle", "square", "triangle", "star")


class ModelLoadError(VlmlocError, RuntimeError):
    """The configured weights cannot be found or do not match the configured family."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """"auto" is bf16 on CUDA and fp32 on CPU (CPU bf16 matmuls are slow and less exact)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
                "fp16": torch.float16, "float32": torch.float32, "fp32": torch.float32}[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; use auto, bfloat16, float16 or float32") from None


def check_weights(cfg: DictConfig) -> None:
    """Fail fast when `model.path` points at nothing usable. Reads only config.json."""
    path = str(cfg.path)
    family = str(cfg.family)
    local = Path(path).expanduser()
    is_local = local.exists() or path.startswith(("/", ".", "~"))
    repo = cfg.hub_id if is_local else path
    how = (
        f"Download it once where a network is available, e.g. `hf download {repo} --local-dir /models/{cfg.name}`, "
        f"then run with model.path=/models/{cfg.name}"
    )
    if is_local and local.resolve().parent == ASSETS_DIR:
        # a demo model ships inside the package: there is nothing to download
        how = (f"model={cfg.name} is a demo model that ships inside vlmloc under {ASSETS_DIR}; the installed package "
               f"lacks it: reinstall vlmloc (pip install -e . in a clone), or retrain it: make train-demo MODEL={cfg.name}")
    if is_local:
        if not local.is_dir():
            raise ModelLoadError(f"model.path={path} is not a folder. {how}")
        missing = [f for f in ("config.json",) if not (local / f).exists()]
        if not any(any(local.glob(g)) for g in _WEIGHT_GLOBS):
            missing.append("weights (*.safetensors or *.bin)")
        if not any((local / f).exists() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
            missing.append("tokenizer files (tokenizer.json / tokenizer_config.json)")
        if missing:
            raise ModelLoadError(f"model.path={path} lacks {', '.join(missing)}. {how}")
    from transformers import AutoConfig

    try:
        hf_cfg = AutoConfig.from_pretrained(path, revision=cfg.revision)
    except Exception as err:  # hub unreachable, not cached, or not a model repo
        reason = " ".join(str(err).split())
        raise ModelLoadError(f"cannot read the model config for {path!r} ({type(err).__name__}: {reason}). {how}") from err
    expected = family_facts(family).model_type
    if hf_cfg.model_type != expected:
        raise ModelLoadError(
            f"{path} is a {hf_cfg.model_type!r} checkpoint but model.family={family!r} expects "
            f"{expected!r}; use a transformers-native checkpoint (e.g. {cfg.hub_id})"
        )


def _load_processor(family: str, path: str, revision: str | None) -> Any:
    """Tokenizer + the family's PIL image processor from the checkpoint's files (no torchvision needed)."""
    import transformers
    from transformers import AutoTokenizer, LlavaProcessor

    from vlmloc.models.processors import InternVLImageProcessor

    tok = AutoTokenizer.from_pretrained(path, revision=revision)
    tok.padding_side = "left"
    image_processor = getattr(transformers, family_facts(family).image_processor).from_pretrained(path, revision=revision)
    if family == "llava":
        from transformers import AutoConfig

        mcfg = AutoConfig.from_pretrained(path, revision=revision)
        return LlavaProcessor(
            image_processor=image_processor,
            tokenizer=tok,
            patch_size=int(mcfg.vision_config.patch_size),
            vision_feature_select_strategy=mcfg.vision_feature_select_strategy,
            num_additional_image_tokens=1,
        )
    if family in ("qwen2_5vl", "qwen3vl"):
        from vlmloc.models.processors import qwen_image_processor

        return qwen_image_processor(family_facts(family).model_type, image_processor, tok)
    return InternVLImageProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        image_seq_length=256,
    )


def prompt_corpus(cfg: Any, categories: Sequence[str]) -> list[str]:
    """The full prompt of both tasks for every category, with the family's image placeholder."""
    placeholder = family_facts(str(cfg.family)).image_placeholder
    texts = []
    for category in categories:
        for task in ("classification", "localization"):
            q = str(cfg.prompts[task]).format(category=category)
            texts.append(str(cfg.prompts.template).format(image=placeholder, question=q))
    return texts


def tiny_corpus(cfg: DictConfig) -> list[str]:
    """Texts a tiny tokenizer is trained on: the configured prompts and answers."""
    texts = prompt_corpus(cfg, _TINY_WORDS)
    prefix = str(cfg.classification.answer_prefix)
    # Answer words repeated so that each becomes one token, as in real vocabularies.
    texts += [prefix + w for w in list(cfg.classification.yes_words) + list(cfg.classification.no_words)] * 50
    texts += [f"[0.{i:02d}, 0.{(i * 7) % 100:02d}, 0.{(i * 3) % 100:02d}, 0.{(i * 11) % 100:02d}]" for i in range(100)]
    texts += [f"<ref>{w}</ref><box>[[{i}, {i * 3}, {i * 7}, {i * 9}]]</box>" for i, w in enumerate(_TINY_WORDS)]
    return texts * 4


SDPA_KERNELS = {"flash": torch.backends.cuda.enable_flash_sdp, "efficient": torch.backends.cuda.enable_mem_efficient_sdp,
                "cudnn": torch.backends.cuda.enable_cudnn_sdp, "math": torch.backends.cuda.enable_math_sdp}


def set_sdpa_kernels(off: Sequence[str]) -> None:
    """Let torch's scaled_dot_product_attention pick only the CUDA kernels not named in `off`
    (`model.sdpa_off`; process-wide flags, no effect on a CPU)."""
    unknown = sorted(set(off) - set(SDPA_KERNELS))
    if unknown:
        raise ModelLoadError(f"model.sdpa_off names unknown kernels {unknown}: choose from {sorted(SDPA_KERNELS)}")
    if set(SDPA_KERNELS) <= set(off):
        raise ModelLoadError("model.sdpa_off turns off every attention kernel: leave at least one (math runs anywhere)")
    for name, enable in SDPA_KERNELS.items():
        enable(name not in off)


def load_adapter(cfg: DictConfig) -> VLMAdapter:
    """Build the family adapter for `cfg` (the `model` config group)."""
    warn_if_untested()
    set_sdpa_kernels([str(k) for k in cfg.sdpa_off])
    family = family_facts(str(cfg.family)).name
    device = resolve_device(str(cfg.device))
    dtype = resolve_dtype(str(cfg.dtype), device)
    attn = str(cfg.attn_implementation)
    if cfg.path is None:
        from vlmloc.models.tiny import build_tiny

        if cfg.get("tiny") is None:
            raise ModelLoadError(f"model {cfg.name}: set model.path (hub id or local folder) to load real weights")
        model, processor = build_tiny(family, cfg.tiny, tiny_corpus(cfg))
        model.set_attn_implementation(attn)
        model.to(device=device, dtype=dtype)
    else:
        check_weights(cfg)
        cls = _model_class(family)
        kwargs: dict[str, Any] = {"revision": cfg.revision, "dtype": dtype, "attn_implementation": attn}
        if cfg.device_map is not None:
            kwargs["device_map"] = cfg.device_map
        log.info("loading %s from %s (%s, %s)", cls.__name__, cfg.path, dtype, attn)
        model = cls.from_pretrained(str(cfg.path), **kwargs)
        if cfg.device_map is None:
            model.to(device)
        else:
            device = model.get_input_embeddings().weight.device
        processor = _load_processor(family, str(cfg.path), cfg.revision)
    if bool(cfg.fused_rms_norm):
        from vlmloc.models.fused_norm import fuse_rms_norms

        log.info("fused rms_norm in %d norms", fuse_rms_norms(model))
    model.eval()
    model.requires_grad_(False)
    return ADAPTERS[family](model, processor, cfg, device)


def _model_class(family: str) -> type:
    import transformers

    return getattr(transformers, family_facts(family).model_class)


def lm_shape(model_cfg: Any) -> tuple[int, int]:
    """(LM layers, attention heads per layer) from the config alone, no weights: the tiny build's
    text config or the checkpoint's config.json. Condition grids depend on them, and a finished
    run must not load the model."""
    if model_cfg.path is None:
        text = model_cfg.tiny.text
        return int(text.num_hidden_layers), int(text.num_attention_heads)
    from transformers import AutoConfig

    text = AutoConfig.from_pretrained(str(model_cfg.path), revision=model_cfg.revision).text_config
    return int(text.num_hidden_layers), int(text.num_attention_heads)
