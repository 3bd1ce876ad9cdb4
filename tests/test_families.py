"""The family table: every named site resolves to the module the engine expects, on the tiny
builds and on the real checkpoints' configs (built on the meta device: no weights, no memory)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from torch import nn

from vlmloc.models.families import FAMILIES, family, site

REAL = Path(__file__).resolve().parents[2] / "shared" / "real_configs"
REAL_CONFIGS = {
    "llava": REAL / "llava-1.5-7b-hf" / "config.json",
    "internvl": REAL / "InternVL3_5-8B-HF" / "derived" / "config.DERIVED-by-OpenGVLab-custom2hf.json",
}


def _check_sites(model: nn.Module, name: str, config) -> None:
    fam = family(name)
    lm_layers, vision_layers = site(model, fam, "lm.layers"), site(model, fam, "vision.layers")
    assert isinstance(lm_layers, nn.ModuleList) and len(lm_layers) == config.text_config.num_hidden_layers
    assert isinstance(vision_layers, nn.ModuleList) and len(vision_layers) == config.vision_config.num_hidden_layers
    assert site(model, fam, "lm").layers is lm_layers
    assert site(model, fam, "projector") is model.model.multi_modal_projector
    assert site(model, fam, "vision") is model.model.vision_tower
    # the modules the engine hooks in every LM layer
    assert all(isinstance(layer.self_attn.o_proj, nn.Linear) for layer in lm_layers)


@pytest.mark.parametrize("name, fixture", [("llava", "tiny_llava"), ("internvl", "tiny_internvl")])
def test_sites_resolve_on_the_tiny_builds(name, fixture, request):
    ad = request.getfixturevalue(fixture)
    assert ad.facts is FAMILIES[name] and type(ad.model).__name__ == FAMILIES[name].model_class
    _check_sites(ad.model, name, ad.model.config)
    assert ad.processor.image_token == FAMILIES[name].image_placeholder
    assert ad.vision_layers is site(ad.model, ad.facts, "vision.layers")


@pytest.mark.parametrize("name", sorted(REAL_CONFIGS))
def test_sites_resolve_on_the_real_checkpoints_configs(name):
    path = REAL_CONFIGS[name]
    if not path.exists():
        pytest.skip(f"{path} is absent (real checkpoint configs not available)")
    data = json.loads(path.read_text())
    assert data["model_type"] == FAMILIES[name].model_type
    config = transformers.AutoConfig.for_model(**data)
    with torch.device("meta"):
        model = getattr(transformers, FAMILIES[name].model_class)._from_config(config)
    _check_sites(model, name, config)
    if name == "llava":
        tokenizer_config = json.loads((path.parent / "tokenizer_config.json").read_text())
        assert tokenizer_config["image_token"] == FAMILIES[name].image_placeholder


def test_an_unknown_family_is_named():
    with pytest.raises(ValueError, match=r"model.family='qwen' is not one of \['internvl', 'llava', 'qwen2_5vl', 'qwen3vl'\]"):
        family("qwen")


def _check_qwen_sites(model: nn.Module, name: str, config) -> None:
    fam = family(name)
    lm_layers, vision_layers = site(model, fam, "lm.layers"), site(model, fam, "vision.layers")
    assert isinstance(lm_layers, nn.ModuleList) and len(lm_layers) == config.text_config.num_hidden_layers
    assert isinstance(vision_layers, nn.ModuleList) and len(vision_layers) == config.vision_config.depth
    assert site(model, fam, "lm").layers is lm_layers
    assert site(model, fam, "vision") is model.model.visual
    assert site(model, fam, "projector") is model.model.visual.merger
    assert all(isinstance(layer.self_attn.o_proj, nn.Linear) for layer in lm_layers)


@pytest.mark.parametrize("name, fixture", [("qwen2_5vl", "tiny_qwen2_5vl"), ("qwen3vl", "tiny_qwen3vl")])
def test_qwen_sites_resolve_on_the_tiny_builds(name, fixture):
    from conftest import compose_cfg
    from vlmloc.models import load_adapter

    ad = load_adapter(compose_cfg(f"model={fixture}").model)
    assert ad.facts is FAMILIES[name] and type(ad.model).__name__ == FAMILIES[name].model_class
    assert ad.model.config.model_type == FAMILIES[name].model_type
    _check_qwen_sites(ad.model, name, ad.model.config)
    assert ad.processor.image_token == FAMILIES[name].image_placeholder
    assert ad.image_token_id == ad.tokenizer.convert_tokens_to_ids(FAMILIES[name].image_placeholder)


@pytest.mark.parametrize("name", ["qwen2_5vl", "qwen3vl"])
def test_qwen_sites_resolve_at_the_default_configs_shape(name):
    """The config classes' defaults (the 7B / 8B shapes), built on the meta device."""
    config = transformers.AutoConfig.for_model(FAMILIES[name].model_type)
    with torch.device("meta"):
        model = getattr(transformers, FAMILIES[name].model_class)._from_config(config)
    _check_qwen_sites(model, name, config)
