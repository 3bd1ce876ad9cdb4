"""Real loading code (from_pretrained on a folder) and the clear errors for bad weight paths."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import compose_cfg, noise_image
from vlmloc.engine.readout import next_token_logprobs
from vlmloc.models import ModelLoadError, load_adapter


@pytest.mark.parametrize("family,model", [("tiny_llava", "llava7b"), ("tiny_internvl", "internvl8b")])
def test_load_from_local_folder_reproduces_the_model(family, model, request, tmp_path):
    """Save a tiny build like a hub checkpoint, load it through model.path: same logits."""
    tiny = request.getfixturevalue(family)
    tiny.model.save_pretrained(tmp_path)
    tiny.processor.save_pretrained(tmp_path)
    cfg = compose_cfg(f"model={model}", f"model.path={tmp_path}").model
    loaded = load_adapter(cfg)
    assert type(loaded) is type(tiny)
    assert loaded.yes_ids == tiny.yes_ids and loaded.image_token_id == tiny.image_token_id
    im = noise_image(500, 300, 7)
    text = tiny.prompt("classification", "cat")
    # the adapter's own config (tiny_internvl caps tiles at 6; internvl8b at 12) must agree for the test
    if "max_tiles" in tiny.cfg:
        loaded.cfg.max_tiles = tiny.cfg.max_tiles
    b1, b2 = tiny.prepare([im], [text]), loaded.prepare([im], [text])
    assert torch.equal(b1.inputs["input_ids"], b2.inputs["input_ids"])
    assert torch.equal(b1.inputs["pixel_values"], b2.inputs["pixel_values"])
    torch.testing.assert_close(next_token_logprobs(loaded, b2), next_token_logprobs(tiny, b1))


def test_missing_folder_is_a_clear_error(tmp_path):
    cfg = compose_cfg("model=llava7b", f"model.path={tmp_path / 'nope'}").model
    with pytest.raises(ModelLoadError, match="not a folder.*hf download llava-hf/llava-1.5-7b-hf"):
        load_adapter(cfg)


def test_folder_without_weights_names_what_is_missing(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava"}))
    cfg = compose_cfg("model=llava13b", f"model.path={tmp_path}").model
    with pytest.raises(ModelLoadError, match=r"lacks weights \(\*\.safetensors or \*\.bin\), tokenizer files"):
        load_adapter(cfg)


def test_wrong_family_is_a_clear_error(tiny_llava, tmp_path):
    tiny_llava.model.save_pretrained(tmp_path)
    tiny_llava.processor.save_pretrained(tmp_path)
    cfg = compose_cfg("model=internvl8b", f"model.path={tmp_path}").model
    with pytest.raises(ModelLoadError, match="is a 'llava' checkpoint but model.family='internvl'"):
        load_adapter(cfg)


def test_unreachable_hub_id_fails_fast_with_instructions(monkeypatch):
    import huggingface_hub.constants

    # Offline mode, as on a machine without a network (and no retries to wait for).
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    cfg = compose_cfg("model=llava7b", "model.path=no-such-org/no-such-model").model
    with pytest.raises(ModelLoadError, match="cannot read the model config.*hf download no-such-org/no-such-model.*model.path=/models/llava7b"):
        load_adapter(cfg)


def test_sdpa_off_sets_the_process_kernel_flags_and_rejects_unknown_names():
    from vlmloc.models.loading import ModelLoadError, set_sdpa_kernels

    flags = {"flash": torch.backends.cuda.flash_sdp_enabled, "efficient": torch.backends.cuda.mem_efficient_sdp_enabled,
             "cudnn": torch.backends.cuda.cudnn_sdp_enabled, "math": torch.backends.cuda.math_sdp_enabled}
    try:
        set_sdpa_kernels(["cudnn"])
        assert {k: f() for k, f in flags.items()} == {"flash": True, "efficient": True, "cudnn": False, "math": True}
        set_sdpa_kernels(["flash", "efficient"])
        assert {k: f() for k, f in flags.items()} == {"flash": False, "efficient": False, "cudnn": True, "math": True}
        with pytest.raises(ModelLoadError, match="unknown kernels"):
            set_sdpa_kernels(["cudnn", "triton"])
        with pytest.raises(ModelLoadError, match="every attention kernel"):
            set_sdpa_kernels(list(flags))
    finally:
        set_sdpa_kernels([])
    assert all(f() for f in flags.values())
