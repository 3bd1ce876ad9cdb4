"""GPU benchmark of the circuit engine on a random-weight model of LLaVA-1.5-7B's exact shape.

Measures, in one run and side by side:
- the reference: a full forward per sequence at batch 32 and at batch 1;
- causal mediation, per patched head: a batch-1 hook loop (one full forward per head) against
  the engine (one head per batch row, restart at the patched layer), patching at all positions
  and at text positions only (image prefix from the base run's KV cache); averaged over layers;
- attention knockout, per condition: full forwards of a batch of conditions against the image
  prefix computed once and only the suffix per condition;
- what each of the engine's savings buys at all positions: fused RMSNorm (`model.fused_rms_norm`),
  the patched layer's attention reused from the base run, the last layer's MLP on the kept
  positions only; each switched on in turn, from none of them.

The sequence is `--seq-len` tokens (default 612, the paper's LLaVA-1.5 localization sequence:
576 image tokens and 36 text tokens); `--also-seq-len` repeats the engine figure at another length.

    PYTHONPATH=src python scripts/bench_circuits.py            # GPU, bf16, sdpa
    PYTHONPATH=src python scripts/bench_circuits.py --tiny     # a CPU smoke run of the same code

Weights are random (no download): timings depend on shapes, not values.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from omegaconf import OmegaConf
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

import vlmloc.engine.heads as heads_mod
from vlmloc.engine.heads import HeadEdit, capture_heads, capture_layer_inputs, edit_heads, head_slice, run_from_layer
from vlmloc.engine.knockout import Knockout, knockout, post_image_queries
from vlmloc.engine.prefix import first_post_image_position, run_prefix, suffix_next_token_logprobs
from vlmloc.models.fused_norm import fuse_rms_norms
from vlmloc.models.llava import LlavaAdapter
from vlmloc.models.tiny import build_tiny_llava

FAMILY = {
    "pad_to_square": True, "box_decimals": 2,
    "prompts": {"template": "USER: {image}\n{question} ASSISTANT:",
                "classification": "Is there a {category} in the image? Answer the question using a single word or phrase.",
                "localization": "Please provide the bounding box coordinate of the region this sentence describes: {category}"},
    "classification": {"mode": "yes_no", "yes_words": ["Yes", "yes"], "no_words": ["No", "no"], "answer_prefix": " "},
    "localization": {"max_new_tokens": 32},
}
SHAPES = {
    "llava7b": dict(vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16),
                    text=dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                              num_key_value_heads=32), vocab=32064),
    "tiny": dict(vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2),
                 text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=8,
                           num_key_value_heads=8), vocab=512),
}


def build(shape: str, device: torch.device, dtype: torch.dtype) -> LlavaAdapter:
    """Random-weight LLaVA of the given shape, with the project's offline tokenizer and processor."""
    s = SHAPES[shape]
    cfg = OmegaConf.create(FAMILY)
    corpus = [cfg.prompts.template.format(image="<image>", question=cfg.prompts[t].format(category="cat"))
              for t in ("classification", "localization")] * 20 + [" Yes", " No", " yes", " no"] * 50
    tiny_spec = {"seed": 0, "tokenizer_vocab_size": 400, "vision": {"hidden_size": 32, "intermediate_size": 64,
                 "num_hidden_layers": 1, "num_attention_heads": 2},
                 "text": {"hidden_size": 64, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}}
    _, processor = build_tiny_llava(tiny_spec, corpus)
    tok = processor.tokenizer
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(image_size=336, patch_size=14, **s["vision"]),
        text_config=LlamaConfig(vocab_size=s["vocab"], pad_token_id=tok.pad_token_id, **s["text"]),
        image_token_id=tok.image_token_id, vision_feature_layer=-2, vision_feature_select_strategy="default",
        image_seq_length=576,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = LlavaForConditionalGeneration._from_config(config, dtype=dtype, attn_implementation="sdpa")
    model.eval().requires_grad_(False)
    return LlavaAdapter(model, processor, cfg, device)


def timed(fn, device: torch.device, repeats: int = 3) -> float:
    """Median seconds of fn() after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def image(seed: int):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (400, 500, 3), dtype=np.uint8))


def text_of_length(ad: LlavaAdapter, seq_len: int) -> str:
    """The localization prompt plus a box answer, cut or extended to exactly seq_len tokens with the image."""
    text = ad.prompt("localization", "motorcycle") + " [0.61, 0.36, 0.92, 0.83]"
    while ad.prepare([image(0)], [text]).seq_len > seq_len:
        text = text[:-1]
    while ad.prepare([image(0)], [text]).seq_len < seq_len:
        text += " 9"
    if ad.prepare([image(0)], [text]).seq_len != seq_len:
        raise ValueError(f"cannot reach {seq_len} tokens")
    return text


def set_fused_norms(ad: LlavaAdapter, on: bool) -> None:
    for m in ad.model.modules():
        m.__dict__.pop("forward", None)
    if on:
        fuse_rms_norms(ad.model)


_PRE_NORM_LAYER = heads_mod._pre_norm_layer


def set_last_layer_keep(on: bool) -> None:
    """Switch the engine's last-layer saving (MLP on kept positions only) on or off."""
    heads_mod._pre_norm_layer = _PRE_NORM_LAYER if on else (lambda layer, h, kw, heads, keep: _PRE_NORM_LAYER(layer, h, kw, heads, None))


def numerics(ad: LlavaAdapter, batch, runs: dict[str, torch.Tensor]) -> None:
    """Each low-precision run's logits against the same model in float32 (float32 norms, sdpa).

    Both RMSNorm forwards round the same formula differently in bfloat16; what matters is whether
    either lands farther from the exact computation. Eager attention is listed for scale: a choice
    the model config already offers. Leaves the model in float32.
    """
    set_fused_norms(ad, False)
    ad.model.set_attn_implementation("eager")
    runs = {**runs, "eager attention": ad.model(**batch.inputs).logits.float()}
    ad.model.set_attn_implementation("sdpa")
    ad.model.float()
    truth = ad.model(**batch.inputs).logits.float()
    print("numerics: logits [1, seq, vocab] against the float32 model (max |difference|, share of positions with its argmax):")
    for name, logits in runs.items():
        same = float((logits.argmax(-1) == truth.argmax(-1)).float().mean())
        print(f"  {name:<16} {float((logits - truth).abs().max()):8.3g}   {same:.4f}")
    print(f"  (logits up to {float(truth.abs().max()):.3g})")


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run on a tiny shape")
    ap.add_argument("--layers", type=int, default=8, help="layers sampled (evenly) for the per-head averages")
    ap.add_argument("--profile", action="store_true", help="print the top CUDA ops of one all-positions patched layer")
    ap.add_argument("--seq-len", type=int, default=612, help="tokens per sequence (image + text)")
    ap.add_argument("--numerics", action="store_true", help="compare bf16 logits (reference/fused norm, eager) with float32, then stop")
    ap.add_argument("--also-seq-len", type=int, default=None, help="repeat the engine figure at this length too")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    ad = build("tiny" if args.tiny else "llava7b", device, dtype)
    n_heads, n_layers = ad.n_heads, ad.n_layers
    text = text_of_length(ad, args.seq_len)
    src, base = ad.prepare([image(0)], [text]), ad.prepare([image(1)], [text])
    if args.numerics:
        set_fused_norms(ad, False)
        plain_logits = ad.model(**base.inputs).logits.float()
        set_fused_norms(ad, True)
        numerics(ad, base, {"reference norm": plain_logits, "fused rms_norm": ad.model(**base.inputs).logits.float()})
        return
    set_fused_norms(ad, True)  # the engine's default (model.fused_rms_norm)
    T = base.seq_len
    print(f"device={torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'} dtype={dtype} "
          f"seq_len={T} layers={n_layers} heads={n_heads} torch={torch.__version__}")

    b32 = ad.prepare([image(1)] * 32, [text] * 32)
    t_fwd32 = timed(lambda: ad.model(**b32.inputs, logits_to_keep=1), device) / 32
    t_fwd1 = timed(lambda: ad.model(**base.inputs, logits_to_keep=1), device)
    print(f"full forward: {t_fwd1 * 1e3:.1f} ms at batch 1, {t_fwd32 * 1e3:.1f} ms per sequence at batch 32")

    S = capture_heads(ad, src.inputs)
    clean = capture_layer_inputs(ad, base.inputs)
    start = first_post_image_position(base)
    text_pos = np.arange(start, T)
    layers = sorted(set(np.linspace(0, n_layers - 1, min(args.layers, n_layers)).round().astype(int).tolist()))

    def hook_loop_head(layer: int, head: int) -> None:
        with edit_heads(ad, [[HeadEdit(layer, head, S[layer][0, :, head_slice(ad, head)])]]):
            ad.model(**base.inputs, logits_to_keep=12)

    loop = statistics.mean(timed(lambda L=L: hook_loop_head(L, 0), device) for L in layers)

    def engine_layer(layer: int, text_only: bool, reuse: bool = True, clean=clean, S=S, start=start, text_pos=text_pos) -> None:
        pos = text_pos if text_only else None
        edits = [[HeadEdit(layer, h, S[layer][0, :, head_slice(ad, h)], pos)] for h in range(n_heads)]
        with edit_heads(ad, edits, offset=start if text_only else 0):
            run_from_layer(ad, clean, layer, n_heads, start=start if text_only else 0, keep_last=12, reuse_attention=reuse)

    def per_head(text_only: bool, **kw) -> float:
        return statistics.mean(timed(lambda L=L: engine_layer(L, text_only, **kw), device) for L in layers) / n_heads

    print(f"CMA per patched head (mean over layers {layers}):")
    print(f"  batch-1 hook loop          {loop * 1e3:8.2f} ms")
    print("  engine, all positions, savings switched on in turn:")
    set_fused_norms(ad, False)
    set_last_layer_keep(False)
    t_none = per_head(False, reuse=False)
    print(f"    none of them             {t_none * 1e3:8.2f} ms   ({loop / t_none:.1f}x faster than the loop)")
    set_fused_norms(ad, True)
    t = per_head(False, reuse=False)
    print(f"    + fused rms_norm         {t * 1e3:8.2f} ms")
    t = per_head(False, reuse=True)
    print(f"    + reused attention       {t * 1e3:8.2f} ms")
    set_last_layer_keep(True)
    eng_all = per_head(False)
    print(f"    + last layer kept rows   {eng_all * 1e3:8.2f} ms")
    eng_txt = per_head(True)
    print(f"  engine, all positions      {eng_all * 1e3:8.2f} ms   ({loop / eng_all:.1f}x faster)   target <= 8 ms")
    print(f"  engine, text positions     {eng_txt * 1e3:8.2f} ms   ({loop / eng_txt:.1f}x faster)   target <= 1.5 ms")
    if args.also_seq_len:
        t2 = text_of_length(ad, args.also_seq_len)
        s2, b2 = ad.prepare([image(0)], [t2]), ad.prepare([image(1)], [t2])
        S2, c2 = capture_heads(ad, s2.inputs), capture_layer_inputs(ad, b2.inputs)
        st2 = first_post_image_position(b2)
        kw2 = dict(clean=c2, S=S2, start=st2, text_pos=np.arange(st2, b2.seq_len))
        a2, x2 = per_head(False, **kw2), per_head(True, **kw2)
        print(f"  at {b2.seq_len} tokens: all positions {a2 * 1e3:.2f} ms, text positions {x2 * 1e3:.2f} ms")

    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=acts) as prof:
            engine_layer(n_layers // 2, False)
        sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
        print(prof.key_averages().table(sort_by=sort, row_limit=12))

    lay = base.layouts[0]
    q = post_image_queries(lay.positions, T)
    keys = lay.positions[:48]  # an object of 48 tokens (8% of 576, the paper's average)
    windows = [range(i, min(i + 6, n_layers)) for i in range(0, n_layers, 6)]
    conds = ([Knockout.make(q, keys, w) for w in windows] + [Knockout.make(q, keys, [i]) for i in range(n_layers)])[:32]
    n = len(conds)
    bn = ad.prepare([image(1)] * n, [text] * n)

    def full_knockout() -> None:
        with knockout(ad, conds):
            ad.model(**bn.inputs, logits_to_keep=1)

    def prefix_knockout() -> None:
        prefix = run_prefix(ad, base, start)
        with knockout(ad, conds):
            suffix_next_token_logprobs(ad, base, prefix, n)

    t_full = timed(full_knockout, device) / n
    t_pref = timed(prefix_knockout, device) / n
    print(f"knockout per condition ({n} conditions in one batch, {T - start} suffix tokens):")
    print(f"  full recomputation         {t_full * 1e3:8.2f} ms")
    print(f"  image prefix reused        {t_pref * 1e3:8.2f} ms   ({t_full / t_pref:.1f}x faster)   target <= 3 ms")
    if device.type == "cuda":
        print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
