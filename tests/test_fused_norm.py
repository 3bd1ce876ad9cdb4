"""model.fused_rms_norm: RMSNorm through torch's fused rms_norm gives the model's own outputs."""

from __future__ import annotations

import pytest
import torch

from conftest import compose_cfg, noise_image
from vlmloc.models import load_adapter
from vlmloc.models.fused_norm import fuse_rms_norms


@pytest.mark.parametrize("model", ["tiny_llava", "tiny_internvl"])
def test_fused_norms_give_bitwise_the_same_logits(model):
    ads = {flag: load_adapter(compose_cfg(f"model={model}", f"model.fused_rms_norm={flag}").model) for flag in (False, True)}
    plain, fused = ads[False], ads[True]
    n_layers = plain.n_layers
    swapped = sum(m.forward.__func__.__name__ == "_fused_forward" for m in fused.model.modules() if "forward" in vars(m))
    # Llama: two norms per layer + the final one; Qwen3 adds q_norm and k_norm per layer
    assert swapped == (2 * n_layers + 1 if plain.family == "llava" else 4 * n_layers + 1)
    assert not any("forward" in vars(m) for m in plain.model.modules())
    batch = plain.prepare([noise_image(500, 300, 3)], [plain.prompt("localization", "cat") + " [0.1, 0.2, 0.3, 0.4]"])
    with torch.no_grad():
        a = plain.model(**batch.inputs).logits
        b = fused.model(**batch.inputs).logits
    assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fused_forward_equals_llama_rmsnorm_bitwise(dtype):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    torch.manual_seed(0)
    norm = LlamaRMSNorm(256, eps=1e-6).to(dtype)
    norm.weight.data = (torch.randn(256) * 0.3 + 1).to(dtype)
    x = (torch.randn(4, 37, 256) * 5).to(dtype)
    ref = norm(x)
    assert fuse_rms_norms(norm) == 1
    assert torch.equal(norm(x), ref)


def test_a_norm_of_another_formula_keeps_its_forward():
    class OffsetRMSNorm(torch.nn.Module):  # Gemma's convention: scale by (1 + weight)
        def __init__(self, n: int) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(n))
            self.variance_epsilon = 1e-6

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x32 = x.float()
            y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
            return ((1 + self.weight) * y).to(x.dtype)

    net = torch.nn.Sequential(OffsetRMSNorm(8))
    x = torch.randn(2, 8)
    ref = net(x)
    assert fuse_rms_norms(net) == 0
    assert torch.equal(net(x), ref)
