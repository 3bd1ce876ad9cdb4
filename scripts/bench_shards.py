"""Sharded run against one process, through the CLI, on a random-weight checkpoint of a real config.

Builds (once) a checkpoint folder with random weights from a folder holding a real checkpoint's
config and tokenizer/processor files, then runs one experiment three times through
`python -m vlmloc`: one process into <out>/one, and two shards one after another into <out>/two
(shard.count=2, shard.index=0 then 1). Prints the wall time of each run, whether each compared
table of the merge equals the single process's (same keys; the largest difference of each float
column; whether the other columns agree) and whether the markdown tables are the same, as one
JSON line.

    PYTHONPATH=src python scripts/bench_shards.py --config-dir /path/llava-1.5-7b-hf --out /tmp/shards \\
        experiment=knockout data=synthetic data.n=8
    PYTHONPATH=src python scripts/bench_shards.py --config-dir ... --out /tmp/cma --pairs 4 --tables mf.parquet \\
        experiment=cma experiment.positions=text data=synthetic

A folder with config.json alone (no tokenizer files), such as scripts/shapes/qwen2_5vl7b, gets the
tokenizer and image processor of the model family's tiny build (`--model` names the model config;
Qwen and InternVL families), the real model's pixel budget, and the special token ids of that tokenizer;
every shape, vocab_size included, stays the published one (`build_checkpoint`):

    PYTHONPATH=src python scripts/bench_shards.py --config-dir scripts/shapes/qwen2_5vl7b --model qwen2_5vl7b \\
        --out /tmp/shards experiment=knockout data=synthetic data.n=8

Weights are random: timings depend on shapes, not values; random weights never emit EOS, so every
box answer runs its full length (the worst case).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")  # as loading.check_weights
# Config fields holding a special token id -> the token it names in the real Qwen vocabulary
# (151655 <|image_pad|>, 151656 <|video_pad|>, 151652/151653 vision start/end, 151643 <|endoftext|>,
# 151645 <|im_end|>; InternVL-3.5: 151671 <IMG_CONTEXT>, its Qwen3 LM the same text tokens); a
# checkpoint with the tiny tokenizer points each at that token's id there.
QWEN_ID_TOKENS = {"image_token_id": "<|image_pad|>", "video_token_id": "<|video_pad|>",
                  "vision_start_token_id": "<|vision_start|>", "vision_end_token_id": "<|vision_end|>"}
QWEN_TEXT_ID_TOKENS = {"bos_token_id": "<|endoftext|>", "eos_token_id": "<|im_end|>", "pad_token_id": "<|endoftext|>"}
# family -> (config fields, text_config fields): the families whose tiny tokenizer can stand in
ID_TOKENS = {"qwen2_5vl": (QWEN_ID_TOKENS, QWEN_TEXT_ID_TOKENS), "qwen3vl": (QWEN_ID_TOKENS, QWEN_TEXT_ID_TOKENS),
             "internvl": ({"image_token_id": "<IMG_CONTEXT>"}, QWEN_TEXT_ID_TOKENS)}


def build_checkpoint(config_dir: Path, dest: Path, model: str | None = None) -> float:
    """A random-weight bf16 checkpoint of config_dir's config in dest; seconds (0 when dest holds it already).

    With tokenizer files in config_dir, its other files are copied next to the weights. Without them,
    the tokenizer and image processor of `model`'s family tiny build are saved instead
    (`tiny_processing`), and the config's special token ids set to that tokenizer's ids.
    """
    import torch
    import transformers

    config = transformers.AutoConfig.from_pretrained(config_dir)
    if (dest / "config.json").exists():
        # a checkpoint of another shape in the default folder would time the wrong model
        have = shape(transformers.AutoConfig.from_pretrained(dest))
        if have != shape(config):
            raise SystemExit(f"{dest} holds a checkpoint of another shape ({have}, not {shape(config)} of "
                             f"{config_dir}): remove it or pass another --checkpoint")
        return 0.0
    t0 = time.perf_counter()
    processing = None
    if not any((config_dir / f).exists() for f in TOKENIZER_FILES):
        if model is None:
            raise SystemExit(f"{config_dir} has no tokenizer files: name the model config (--model) whose "
                             "family's tiny tokenizer to use")
        family, processing = tiny_processing(model)
        tok = getattr(processing[0], "tokenizer", processing[0])
        set_special_ids(config, tok, *ID_TOKENS[family])
    cls = getattr(transformers, config.architectures[0])
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        net = cls._from_config(config, dtype=torch.bfloat16)
    if processing is not None:
        for name, token in ID_TOKENS[family][1].items():  # generate() reads these, not the config's
            setattr(net.generation_config, name, tok.convert_tokens_to_ids(token))
        answer_only_ordinary_tokens(net, tok)
    net.save_pretrained(dest)
    if processing is not None:
        for part in processing:
            part.save_pretrained(dest)
    else:
        for f in config_dir.iterdir():
            if f.is_file() and not (dest / f.name).exists():
                shutil.copy(f, dest / f.name)
    # the benchmarked runs are other processes: give them this one's GPU memory (the 8B build held 16.6 GB)
    del net
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return time.perf_counter() - t0


def answer_only_ordinary_tokens(net: object, tokenizer: object) -> None:
    """Zero the output rows of every id but the tokenizer's ordinary tokens: greedy answers then use them.

    The published vocabulary (~152k rows) is kept for its cost, but the tiny tokenizer names only a
    few hundred ids: an answer of the other ids decodes to nothing, and an empty answer cannot be a
    teacher-forced target (CMA). Its special tokens must not be answered either: a generated
    <|image_pad|> is one more image token when the answer is fed back, and <|im_end|> would end
    answers early (random weights should answer at full length, the worst case). A zero row scores
    0, below the largest of a few hundred random logits all but surely; the matmul's cost is unchanged.
    """
    import torch

    special = set(tokenizer.added_tokens_decoder)  # type: ignore[attr-defined]
    keep = torch.tensor([i for i in range(len(tokenizer)) if i not in special])  # type: ignore[arg-type]
    weight = net.get_output_embeddings().weight  # type: ignore[attr-defined]
    drop = torch.ones(weight.shape[0], dtype=torch.bool, device=weight.device)
    drop[keep.to(weight.device)] = False
    with torch.no_grad():
        weight[drop] = 0


def shape(config: object) -> dict[str, object]:
    """The dimensions that decide a checkpoint's cost (what a reused checkpoint must match)."""
    text = getattr(config, "text_config", config)
    vision = getattr(config, "vision_config", None)
    out: dict[str, object] = {"architectures": list(getattr(config, "architectures", None) or [])}
    for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "vocab_size"):
        out[k] = getattr(text, k, None)
    for k in ("depth", "num_hidden_layers", "hidden_size", "intermediate_size"):
        if vision is not None and hasattr(vision, k):
            out[f"vision_{k}"] = getattr(vision, k)
    return out


def tiny_processing(model: str) -> tuple[str, tuple[object, ...]]:
    """(family, processing parts to save) of model config `model`'s family tiny build (`model=tiny_<family>`).

    A model config with a pixel budget (Qwen-VL: model.min_pixels / max_pixels): (tokenizer, image
    processor), the image processor with that budget. Without one (InternVL, whose tiling bounds
    are call arguments the adapter passes from `model`'s config, on the real 448 px tiles): the
    whole processor."""
    from hydra import compose, initialize_config_dir

    from vlmloc.__main__ import config_dir
    from vlmloc.models.loading import tiny_corpus
    from vlmloc.models.tiny import build_tiny

    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        real = compose("config", overrides=[f"model={model}"]).model
        family = str(real.family)
        if family not in ID_TOKENS:
            raise SystemExit(f"model={model} is of family {family!r}: tiny tokenizers stand in for the "
                             f"{tuple(ID_TOKENS)} families only; pass a folder with the checkpoint's tokenizer files")
        tiny = compose("config", overrides=[f"model=tiny_{family}"]).model
    _, processor = build_tiny(family, tiny.tiny, tiny_corpus(tiny))
    if real.get("min_pixels") is None:
        return family, (processor,)
    ip = processor.image_processor
    # the tiny build caps the budget for CPU speed; the real model config holds the model card's defaults
    ip = type(ip).from_dict({**ip.to_dict(), "size": {"shortest_edge": int(real.min_pixels),
                                                      "longest_edge": int(real.max_pixels)}})
    return family, (processor.tokenizer, ip)


def set_special_ids(config: object, tokenizer: object, config_tokens: dict[str, str],
                    text_tokens: dict[str, str]) -> None:
    """Point the config's (config_tokens) and its text config's (text_tokens) special token ids at
    `tokenizer`'s tokens of the same name; shapes unchanged."""
    text = config.text_config  # type: ignore[attr-defined]
    vocab = int(text.vocab_size)
    for target, table in ((config, config_tokens), (text, text_tokens)):
        for name, token in table.items():
            i = tokenizer.convert_tokens_to_ids(token)  # type: ignore[attr-defined]
            back = tokenizer.convert_ids_to_tokens(i) if isinstance(i, int) else None  # type: ignore[attr-defined]
            # an unknown token maps to the unk id, whose token is another one
            if back != token or not 0 <= i < vocab:
                raise SystemExit(f"the tiny tokenizer has no {token} below vocab_size {vocab}")
            setattr(target, name, i)
    # Qwen2.5-VL's file also names <|vision_pad|> (vision_token_id), which no code reads and the
    # tiny tokenizer lacks: drop it rather than leave an id of the real vocabulary
    if hasattr(config, "vision_token_id"):
        delattr(config, "vision_token_id")


def cli(args: list[str], env: dict[str, str], log: Path | None = None) -> float:
    """Seconds `python -m vlmloc <args>` took; its output into `log` when given, else the console."""
    t0 = time.perf_counter()
    if log is None:
        subprocess.run([sys.executable, "-m", "vlmloc", *args], check=True, env=env)
    else:
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("w") as f:
            subprocess.run([sys.executable, "-m", "vlmloc", *args], check=True, env=env, stdout=f,
                           stderr=subprocess.STDOUT)
    return time.perf_counter() - t0


def checkpoint_args(ap: argparse.ArgumentParser) -> None:
    """The options both benchmarks share: the real files, the random checkpoint, the output, the model config."""
    ap.add_argument("--config-dir", type=Path, required=True,
                    help="a real checkpoint's config.json with its tokenizer/processor files, or config.json "
                         "alone (scripts/shapes/*: the --model family's tiny tokenizer is used)")
    ap.add_argument("--checkpoint", type=Path, default=None,
                    help="where the random checkpoint is built (reused when there); default "
                         "/tmp/vlmloc-random-<config-dir name>")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--model", default="llava7b", help="the model config (configs/model/) the runs use")


def checkpoint_path(a: argparse.Namespace) -> Path:
    """--checkpoint, or a folder named after --config-dir (one per shape, never another shape's)."""
    return a.checkpoint or Path(f"/tmp/vlmloc-random-{a.config_dir.resolve().name}")


KEYS = ("sample_id", "task", "condition", "layer", "head", "positions", "stage", "view", "target")


def compare(one: Path, two: Path, name: str) -> dict[str, object]:
    """One parquet table of both runs: rows, same keys, the largest difference of each float column,
    and whether the other columns agree."""
    absent = [str(d) for d in (one, two) if not (d / name).exists()]
    if absent:  # e.g. no pair left out: no excluded_pairs.parquet
        return {"absent_in": absent}
    u, v = pd.read_parquet(one / name), pd.read_parquet(two / name)
    keys = [c for c in KEYS if c in u.columns]
    u, v = (df.sort_values(keys).reset_index(drop=True) for df in (u, v))
    out: dict[str, object] = {"rows": len(u), "rows_merged": len(v), "same_keys": bool(u[keys].equals(v[keys]))}
    if len(u) != len(v):
        return out
    for c in u.columns:
        if c in keys:
            continue
        if pd.api.types.is_float_dtype(u[c]):
            d = np.abs(u[c].to_numpy(float) - v[c].to_numpy(float))
            out[f"max_abs_diff_{c}"] = float(np.nanmax(d)) if np.isfinite(d).any() else 0.0
        else:
            out[f"same_{c}"] = u[c].astype(str).tolist() == v[c].astype(str).tolist()
    return out


def all_pairs(pairs_dir: Path) -> int:
    """Keep every pair of a make_pairs run (timing only: a random model's verdicts keep few)."""
    from vlmloc.data.pairs import read_manifest, write_manifest

    manifest = read_manifest(pairs_dir)
    manifest["kept"] = True
    write_manifest(pairs_dir, manifest)
    return len(manifest)


def main() -> None:
    ap = argparse.ArgumentParser()
    checkpoint_args(ap)
    ap.add_argument("--tables", default="results.parquet", help="comma-separated parquet tables to compare")
    ap.add_argument("--pairs", type=int, default=0,
                    help="CMA: first make this many pairs of the data with experiment=make_pairs, every pair kept "
                         "whatever the random model answers, and run on data=pairs")
    ap.add_argument("--also-one", default=None,
                    help="one more single-process run with this override (e.g. batch_size=16), compared to the first: "
                         "how much the numbers move with the batches alone")
    ap.add_argument("overrides", nargs="*", help="further overrides, e.g. experiment=knockout data.n=8")
    a = ap.parse_args()
    a.checkpoint = checkpoint_path(a)
    build_s = build_checkpoint(a.config_dir, a.checkpoint, a.model)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    common = [f"model={a.model}", f"model.path={a.checkpoint}", f"paths.output_dir={a.out}", f"paths.cache_dir={a.out}/cache",
              f"paths.data_dir={a.out}/data"]
    extra: dict[str, object] = {}
    overrides = list(a.overrides)
    if a.pairs:
        data = [o for o in overrides if o.startswith("data")]
        extra["make_pairs_s"] = round(cli([*common, "experiment=make_pairs", "inpaint=oracle", *data, f"data.n={a.pairs}",
                                           "experiment.figure_examples=0", f"hydra.run.dir={a.out}/pairs"], env), 1)
        extra["pairs"] = all_pairs(a.out / "pairs")
        overrides = [o for o in overrides if not o.startswith("data")] + ["data=pairs", f"data.pairs_dir={a.out}/pairs"]
    common += overrides
    one = cli([*common, f"hydra.run.dir={a.out}/one"], env)
    shards = [cli([*common, "shard.count=2", f"shard.index={i}", f"hydra.run.dir={a.out}/two"], env) for i in range(2)]
    names = a.tables.split(",")
    if a.also_one:
        extra["also_one_s"] = round(cli([*common, a.also_one, f"hydra.run.dir={a.out}/also"], env), 1)
        extra[a.also_one] = {n: compare(a.out / "one", a.out / "also", n) for n in names}
    tables = lambda d: {p.name: p.read_text().replace(str(d), "<run>") for p in d.glob("*.md")}  # noqa: E731
    print(json.dumps({
        "build_checkpoint_s": round(build_s, 1), "one_process_s": round(one, 1), "shard_s": [round(s, 1) for s in shards],
        **{n: compare(a.out / "one", a.out / "two", n) for n in names},
        "same_tables": tables(a.out / "one") == tables(a.out / "two"), **extra,
    }))


if __name__ == "__main__":
    main()
