"""The benchmark's shape folders (Qwen, InternVL) (scripts/shapes/) and the random checkpoint it builds from them.

The published dimensions are written here by hand, so a wrong transcription or a config class that
reads a key differently fails. A 7B model cannot be built on a CPU: the checkpoint builder runs on a
copy of each shape with tiny widths and depths, and the result must load through the project's
own loading path (`model.path`) with the tiny tokenizer's ids and the real pixel budget.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import transformers

from conftest import compose_cfg, noise_image

ROOT = Path(__file__).resolve().parents[1]
SHAPES = ROOT / "scripts" / "shapes"
sys.path.insert(0, str(ROOT / "scripts"))

# Published values (the model cards' config.json of Qwen/Qwen2.5-VL-7B-Instruct and Qwen/Qwen3-VL-8B-Instruct)
PUBLISHED = {
    "qwen2_5vl7b": {
        "model_type": "qwen2_5_vl", "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "text": {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
                 "num_key_value_heads": 4, "vocab_size": 152064, "rms_norm_eps": 1e-6, "max_position_embeddings": 128000,
                 "hidden_act": "silu"},
        "rope": {"rope_theta": 1e6, "mrope_section": [16, 24, 24]},
        "vision": {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16, "out_hidden_size": 3584,
                   "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112,
                   "fullatt_block_indexes": [7, 15, 23, 31], "hidden_act": "silu", "in_channels": 3,
                   "tokens_per_second": 2},
    },
    "qwen3vl8b": {
        "model_type": "qwen3_vl", "architectures": ["Qwen3VLForConditionalGeneration"],
        "text": {"hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 36, "num_attention_heads": 32,
                 "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936, "rms_norm_eps": 1e-6,
                 "max_position_embeddings": 262144},
        "rope": {"rope_theta": 5_000_000, "mrope_section": [24, 20, 20], "mrope_interleaved": True},
        "vision": {"depth": 27, "hidden_size": 1152, "intermediate_size": 4304, "num_heads": 16, "out_hidden_size": 4096,
                   "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2, "num_position_embeddings": 2304,
                   "deepstack_visual_indexes": [8, 16, 24], "hidden_act": "gelu_pytorch_tanh", "in_channels": 3},
    },
}
IDS = {"image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652, "vision_end_token_id": 151653}
TEXT_IDS = {"bos_token_id": 151643, "eos_token_id": 151645}
# The real models' pixel budgets (the model cards' preprocessor_config.json), and patch x merge
BUDGET = {"qwen2_5vl7b": (3136, 12845056, 28), "qwen3vl8b": (65536, 16777216, 32)}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_shape_folder_loads_with_the_published_dimensions(name):
    want = PUBLISHED[name]
    cfg = transformers.AutoConfig.from_pretrained(SHAPES / name)
    assert cfg.model_type == want["model_type"] and cfg.architectures == want["architectures"]
    text, vision = cfg.text_config, cfg.vision_config
    assert {k: getattr(text, k) for k in want["text"]} == want["text"]
    assert {k: text.rope_parameters[k] for k in want["rope"]} == want["rope"]
    assert text.rope_parameters["rope_type"] == "default"
    assert {k: getattr(vision, k) for k in want["vision"]} == want["vision"]
    assert {k: getattr(cfg, k) for k in IDS} == IDS
    assert {k: getattr(text, k) for k in TEXT_IDS} == TEXT_IDS
    assert cfg.tie_word_embeddings is False
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    assert sum(want["rope"]["mrope_section"]) * 2 == head_dim == 128  # M-RoPE covers every rotary pair


def _shrunken(name: str, dest: Path) -> Path:
    """The shape's config.json, same layout and vocabulary, with tiny widths and depths."""
    cfg = json.loads((SHAPES / name / "config.json").read_text())
    text = cfg.get("text_config", cfg)  # Qwen2.5-VL's file keeps the text fields at the top level
    text.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    vision = cfg["vision_config"]
    vision.update(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64)
    if name == "qwen3vl8b":
        text["head_dim"] = 32
        text["rope_scaling"]["mrope_section"] = [6, 5, 5]  # sums to head_dim / 2
        vision.update(num_position_embeddings=64, deepstack_visual_indexes=[0])
    else:
        text["max_window_layers"] = 2
        text["rope_scaling"]["mrope_section"] = [2, 3, 3]  # head_dim 16
        vision["fullatt_block_indexes"] = [1]
    dest.mkdir(parents=True)
    (dest / "config.json").write_text(json.dumps(cfg))
    return dest


def _qwen_tokens(width: int, height: int, min_pixels: int, max_pixels: int, factor: int) -> int:
    """Qwen-VL's token count, written out: sides rounded to multiples of factor, area scaled into the budget."""
    h, w = round(height / factor) * factor, round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h, w = math.floor(height / beta / factor) * factor, math.floor(width / beta / factor) * factor
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return (h // factor) * (w // factor)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_checkpoint_of_a_shape_without_tokenizer_loads_through_model_path(name, tmp_path):
    from bench_shards import build_checkpoint

    from vlmloc.models import load_adapter

    shape_dir = _shrunken(name, tmp_path / "shape")
    ckpt = tmp_path / "checkpoint"
    assert build_checkpoint(shape_dir, ckpt, name) > 0
    assert build_checkpoint(shape_dir, ckpt, name) == 0  # reused, not rebuilt
    ad = load_adapter(compose_cfg(f"model={name}", f"model.path={ckpt}").model)
    tok = ad.tokenizer
    assert ad.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>") < len(tok)
    assert ad.model.config.vision_start_token_id == tok.convert_tokens_to_ids("<|vision_start|>")
    assert ad.text_config.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    assert ad.text_config.vocab_size == PUBLISHED[name]["text"]["vocab_size"]  # shapes stay the published ones
    lo, hi, factor = BUDGET[name]
    size = ad.processor.image_processor.size  # the saved file holds the real model's budget too
    assert (size.shortest_edge, size.longest_edge) == (lo, hi) == (int(ad.cfg.min_pixels), int(ad.cfg.max_pixels))
    w, h = 300, 200  # Qwen3-VL's budget scales this one up: its min_pixels is above 300 x 200
    batch = ad.prepare([noise_image(w, h)], [ad.prompt("localization", "cat")])
    n = int((batch.inputs["input_ids"][0] == ad.image_token_id).sum())
    assert n == _qwen_tokens(w, h, lo, hi, factor) == ad.n_visual_tokens(w, h) == batch.layouts[0].n_visual
    # answers use the tiny tokenizer's ordinary tokens only: never empty, no image or end token inside
    from vlmloc.engine.readout import generate

    out = ad.model.generate(**batch.inputs, max_new_tokens=8, do_sample=False)[0, batch.seq_len:]
    assert len(out) == 8 and int(out.max()) < len(tok) and not set(out.tolist()) & set(tok.added_tokens_decoder)
    answer = generate(ad, batch, 8)[0]
    assert answer and "<|" not in answer


def test_a_checkpoint_of_another_shape_is_not_reused(tmp_path):
    from bench_shards import build_checkpoint

    ckpt = tmp_path / "checkpoint"
    build_checkpoint(_shrunken("qwen2_5vl7b", tmp_path / "a"), ckpt, "qwen2_5vl7b")
    with pytest.raises(SystemExit, match="another shape"):
        build_checkpoint(_shrunken("qwen3vl8b", tmp_path / "b"), ckpt, "qwen3vl8b")


def test_internvl_shape_without_tokenizer_loads_with_real_tiles_and_tiny_ids(tmp_path):
    """InternVL-3.5-8B's derived shape: the published dimensions, and a shrunken copy's checkpoint
    loads through model.path with the tiny tokenizer's ids, the real 448 px tiling, an untied head."""
    from bench_shards import build_checkpoint

    from vlmloc.models import load_adapter

    cfg = transformers.AutoConfig.from_pretrained(SHAPES / "internvl3_5_8b")
    text, vision = cfg.text_config, cfg.vision_config
    assert (text.hidden_size, text.intermediate_size, text.num_hidden_layers, text.num_attention_heads,
            text.num_key_value_heads, text.head_dim, text.vocab_size) == (4096, 12288, 36, 32, 8, 128, 151936)
    assert (vision.hidden_size, vision.num_hidden_layers, vision.num_attention_heads, list(vision.image_size)) == (
        1024, 24, 16, [448, 448])
    assert (cfg.image_token_id, cfg.image_seq_length, cfg.downsample_ratio) == (151671, 256, 0.5)
    assert cfg.tie_word_embeddings is False and text.tie_word_embeddings is False
    raw = json.loads((SHAPES / "internvl3_5_8b" / "config.json").read_text())
    raw["text_config"].update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, head_dim=32)
    raw["vision_config"].update(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    (tmp_path / "shape").mkdir()
    (tmp_path / "shape" / "config.json").write_text(json.dumps(raw))
    ckpt = tmp_path / "checkpoint"
    assert build_checkpoint(tmp_path / "shape", ckpt, "internvl8b") > 0
    ad = load_adapter(compose_cfg("model=internvl8b", f"model.path={ckpt}").model)
    tok = ad.tokenizer
    assert ad.image_token_id == tok.convert_tokens_to_ids("<IMG_CONTEXT>") < len(tok)
    assert ad.text_config.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    assert ad.text_config.vocab_size == 151936
    head, embed = ad.model.get_output_embeddings().weight, ad.model.get_input_embeddings().weight
    assert head.data_ptr() != embed.data_ptr()  # untied, as the real checkpoint: its memory counts
    batch = ad.prepare([noise_image(640, 480)], [ad.prompt("localization", "cat")])
    # COCO's usual 640 x 480 is 4:3: a 4 x 3 grid of 448 px tiles plus the thumbnail, 256 tokens each
    n = int((batch.inputs["input_ids"][0] == ad.image_token_id).sum())
    assert n == (4 * 3 + 1) * 256 == ad.n_visual_tokens(640, 480) == batch.layouts[0].n_visual
    out = ad.model.generate(**batch.inputs, max_new_tokens=8, do_sample=False)[0, batch.seq_len:]
    assert len(out) == 8 and int(out.max()) < len(tok) and not set(out.tolist()) & set(tok.added_tokens_decoder)
