"""Training examples from the synthetic scene generator, in each family's own prompt and answer formats.

Scene i of split `train` is exactly image i that `ensure_synthetic(root, "train", params)` would
write (same seed stream), rendered on the fly instead of read from disk. Every scene becomes
one *packed* example: the shared image prefix (everything up to the last visual token) followed
by one segment per question,

    [<s>USER: <image>x576] [\\nIs there a star ... ASSISTANT: Yes</s>] [\\nPlease provide ... ASSISTANT: [0.12, ...]</s>] ...

Each segment sees the prefix and itself only (a block attention mask built from `segment`
ids), and its position ids continue from the prefix, so it computes exactly what the
single-question sequence the evaluation feeds would compute, while the image is encoded once.

Questions per scene: for every object the classification prompt answered with the first yes
word and the localization prompt answered with `adapter.format_box(box)`; and as many negative
classification questions (a category absent from the image, answered with the first no word)
as there are objects, when enough categories are absent; with `data.list_objects` also the list
prompt, answered with the scene's categories in reading order (`listed_objects`). Prompts come from `adapter.prompt`, so
training and evaluation use the same text; answers follow the family's `answer_prefix` and end
with the tokenizer's end-of-sequence token.

Each example also carries `token_targets` [n_visual, n_categories + 1]: for every visual token
(in the layout's order, which is the projector's output order) the fraction of its cell covered
by each category's object, the rest background. They feed the auxiliary dense loss of the
training loop (`aux.weight`), a stand-in for the semantic pretraining a real vision tower has.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from vlmloc.data.synthetic import SyntheticParams, _sample_scene, object_mask, paint_objects, split_seed
from vlmloc.geometry import TokenGrid
from vlmloc.models.adapter import VLMAdapter
from vlmloc.models.layout import VisualLayout

IGNORE = -100
TASK_CODES = {"classification": 1, "localization": 2}  # per-token task tags, for per-task loss logs


@dataclass(frozen=True)
class Question:
    task: str  # classification | localization
    category: str  # "" for the list question
    answer: str  # answer text without the prefix and the end-of-sequence token
    mode: str = "yes_no"  # classification: yes_no (a category asked about) | list (list the objects)


def scene_seed(params: SyntheticParams, split: str, index: int) -> np.random.SeedSequence:
    """The seed of image `index` of `split`: the index-th child of the split's stream (as generate_split)."""
    return np.random.SeedSequence(split_seed(params.seed, split).entropy, spawn_key=(int(index),))


def render_train_scene(params: SyntheticParams, split: str, index: int) -> tuple[Image.Image, dict[str, Any]]:
    """(image, scene spec) of scene `index` of `split`, identical to the generated dataset's image."""
    spec, base = _sample_scene(np.random.default_rng(scene_seed(params, split, index)), params)
    return Image.fromarray(paint_objects(base, spec)), spec


def object_box(polygon: Sequence[float]) -> tuple[float, float, float, float]:
    """xyxy box of a polygon, rounded as the dataset's COCO bbox (2 decimals)."""
    xs, ys = polygon[0::2], polygon[1::2]
    x, y = round(min(xs), 2), round(min(ys), 2)
    return (x, y, x + round(max(xs) - min(xs), 2), y + round(max(ys) - min(ys), 2))


def listed_objects(spec: dict[str, Any]) -> str:
    """A scene's categories in reading order (by the top, then the left edge of each object's box),
    each once: the answer to the list prompt, "circle, star, square"."""
    boxes = sorted((object_box(o["polygon"])[1], object_box(o["polygon"])[0], o["category"]) for o in spec["objects"])
    return ", ".join(dict.fromkeys(cat for _, _, cat in boxes))


def scene_questions(
    adapter: VLMAdapter, spec: dict[str, Any], categories: Sequence[str], rng: np.random.Generator,
    list_objects: bool = False,
) -> list[Question]:
    """Positive and negative classification plus localization questions of one scene, shuffled;
    list_objects: also the list prompt (`classification.mode=list`), answered by `listed_objects`."""
    yes = str(adapter.cfg.classification.yes_words[0])
    no = str(adapter.cfg.classification.no_words[0])
    w, h = int(spec["width"]), int(spec["height"])
    qs: list[Question] = []
    present = set()
    for obj in spec["objects"]:
        cat = obj["category"]
        present.add(cat)
        qs.append(Question("classification", cat, yes))
        qs.append(Question("localization", cat, adapter.format_box(object_box(obj["polygon"]), w, h)))
    absent = [c for c in categories if c not in present]
    n_neg = min(len(spec["objects"]), len(absent))
    for cat in rng.choice(absent, size=n_neg, replace=False) if n_neg else []:
        qs.append(Question("classification", str(cat), no))
    if list_objects:
        qs.append(Question("classification", "", listed_objects(spec), mode="list"))
    order = rng.permutation(len(qs))
    return [qs[i] for i in order]


class QuestionEncoder:
    """Token ids of (prompt, answer) pairs with the image placeholder expanded as the processor does."""

    def __init__(self, adapter: VLMAdapter) -> None:
        self.adapter = adapter
        self.tok = adapter.tokenizer
        self.family = adapter.family
        self.image_id = int(self.tok.convert_tokens_to_ids(adapter.image_placeholder))
        self.eos_id = int(self.tok.eos_token_id)
        if self.family == "llava":
            proc = adapter.processor
            size = proc.image_processor.crop_size["height"]
            self.tokens_per_image = (size // proc.patch_size) ** 2 + proc.num_additional_image_tokens - (
                1 if proc.vision_feature_select_strategy == "default" else 0
            )
        else:
            self.tokens_per_tile = int(adapter.processor.image_seq_length)
            self.start_id = int(adapter.processor.start_image_token_id)
            self.end_id = int(adapter.processor.end_image_token_id)

    def image_ids(self, n_tiles: int) -> list[int]:
        """What the single image placeholder id becomes in the processor's input_ids."""
        if self.family == "llava":
            return [self.image_id] * self.tokens_per_image
        return [self.start_id] + [self.image_id] * (self.tokens_per_tile * n_tiles) + [self.end_id]

    def encode(self, q: Question, n_tiles: int) -> tuple[list[int], int]:
        """(ids of prompt + answer + eos with the image expanded, number of prompt ids)."""
        prompt = self.adapter.prompt(q.task, q.category, mode=q.mode)
        prefix = str(self.adapter.cfg.classification.answer_prefix)
        p_ids = self.tok(prompt).input_ids
        full = self.tok(prompt + prefix + q.answer).input_ids
        if full[: len(p_ids)] != p_ids:
            raise ValueError(f"answer {q.answer!r} does not tokenize as a continuation of the prompt {prompt!r}")
        full = full + [self.eos_id]
        at = full.index(self.image_id)
        if self.image_id in full[at + 1 :]:
            raise ValueError("the prompt holds more than one image placeholder")
        expanded = full[:at] + self.image_ids(n_tiles) + full[at + 1 :]
        return expanded, len(p_ids) - 1 + len(self.image_ids(n_tiles))

    def prefix_len(self, ids: Sequence[int]) -> int:
        """Length of the shared image prefix: up to the last visual token (InternVL: its </img>)."""
        last = len(ids) - 1 - list(reversed(ids)).index(self.image_id)
        return last + 2 if self.family == "internvl" else last + 1


def cell_coverage(mask: np.ndarray, grid: TokenGrid) -> np.ndarray:
    """bool [H, W] mask -> float [rows, cols]: share of each token cell covered by the mask.

    Counted on the pixels a cell touches (as geometry.grid_mask), divided by the cell's area;
    cells in the padding get 0.
    """
    h, w = mask.shape
    sat = np.zeros((h + 1, w + 1), dtype=np.float64)
    sat[1:, 1:] = mask.cumsum(0, dtype=np.float64).cumsum(1)
    xs, ys = grid.cell_bounds()

    def ranges(edges: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        lo = np.clip(np.floor(edges[:-1] + 1e-6).astype(np.int64), 0, n)
        hi = np.clip(np.ceil(edges[1:] - 1e-6).astype(np.int64), 0, n)
        return lo, hi

    c_lo, c_hi = ranges(xs, w)
    r_lo, r_hi = ranges(ys, h)
    covered = sat[np.ix_(r_hi, c_hi)] - sat[np.ix_(r_lo, c_hi)] - sat[np.ix_(r_hi, c_lo)] + sat[np.ix_(r_lo, c_lo)]
    area = np.outer(np.diff(ys), np.diff(xs))
    return np.clip(covered / area, 0.0, 1.0)


def token_targets(layout: VisualLayout, spec: dict[str, Any], categories: Sequence[str]) -> np.ndarray:
    """float32 [n_visual, len(categories) + 1]: per visual token the covered share of each category, then background."""
    w, h = int(spec["width"]), int(spec["height"])
    out = np.zeros((layout.n_visual, len(categories) + 1), dtype=np.float32)
    index = {c: i for i, c in enumerate(categories)}
    for obj in spec["objects"]:
        mask = object_mask(obj["polygon"], w, h)
        for view, grid in layout.grids.items():
            sel = layout.view == view
            cov = cell_coverage(mask, grid)
            out[sel, index[obj["category"]]] += cov[layout.canvas_row[sel], layout.canvas_col[sel]]
    np.clip(out, 0.0, 1.0, out=out)
    out[:, -1] = np.clip(1.0 - out[:, :-1].sum(1), 0.0, 1.0)
    return out / out.sum(1, keepdims=True)


class PackedScenes(torch.utils.data.Dataset):
    """Scene index -> one packed example (dict of lists / tensors); see the module docstring."""

    def __init__(self, adapter: VLMAdapter, params: SyntheticParams, split: str, seed: int, offset: int = 0,
                 list_objects: bool = False) -> None:
        self.adapter = adapter
        self.list_objects = bool(list_objects)
        self.params = params
        self.split = split
        self.seed = int(seed)
        self.offset = int(offset)
        self.encoder = QuestionEncoder(adapter)

    def __len__(self) -> int:
        return 2**31 - 1 - self.offset

    def pixel_values(self, image: Image.Image) -> torch.Tensor:
        """[n_tiles, 3, H, W] float32, the processor's own image preprocessing."""
        out = self.adapter.processor.image_processor(
            images=[image], return_tensors="pt", **self.adapter.processor_kwargs()
        )
        return out["pixel_values"].float()

    def __getitem__(self, i: int) -> dict[str, Any]:
        index = self.offset + int(i)
        image, spec = render_train_scene(self.params, self.split, index)
        rng = np.random.default_rng([self.seed, index, 0x5CE1E])
        questions = scene_questions(self.adapter, spec, self.params.categories, rng, self.list_objects)
        pixels = self.pixel_values(image)
        example = pack(self.encoder, questions, pixels, index)
        layout = self.adapter.layout(torch.tensor(example["input_ids"]), image.width, image.height)
        example["token_targets"] = torch.from_numpy(token_targets(layout, spec, self.params.categories))
        return example


def pack(encoder: QuestionEncoder, questions: Sequence[Question], pixels: torch.Tensor, index: int = -1) -> dict[str, Any]:
    """One image's questions -> prefix + segments (input_ids, segment, position, labels)."""
    n_tiles = int(pixels.shape[0])
    encoded = [encoder.encode(q, n_tiles) for q in questions]
    p = encoder.prefix_len(encoded[0][0])
    prefix = encoded[0][0][:p]
    ids, seg, pos, labels, task = list(prefix), [0] * p, list(range(p)), [IGNORE] * p, [0] * p
    for k, (q, (full, n_prompt)) in enumerate(zip(questions, encoded), start=1):
        if full[:p] != prefix:
            raise ValueError("questions of one image do not share the image prefix")
        rest = full[p:]
        ids += rest
        seg += [k] * len(rest)
        pos += list(range(p, p + len(rest)))
        labels += [IGNORE if p + t < n_prompt else tok for t, tok in enumerate(rest)]
        task += [TASK_CODES[q.task]] * len(rest)
    return {
        "input_ids": ids,
        "segment": seg,
        "position_ids": pos,
        "labels": labels,
        "label_task": task,
        "pixel_values": pixels,
        "tasks": [q.task for q in questions],
        "index": index,
    }


def collate(examples: Sequence[dict[str, Any]], pad_id: int) -> dict[str, Any]:
    """Right-pad packed examples into a batch; `segment` is -1 on padding."""
    t = max(len(e["input_ids"]) for e in examples)

    def padded(key: str, fill: int) -> torch.Tensor:
        return torch.tensor([e[key] + [fill] * (t - len(e[key])) for e in examples], dtype=torch.long)

    return {
        "input_ids": padded("input_ids", pad_id),
        "segment": padded("segment", -1),
        "position_ids": padded("position_ids", 0),
        "labels": padded("labels", IGNORE),
        "label_task": padded("label_task", 0),
        "pixel_values": torch.cat([e["pixel_values"] for e in examples]),
        **({"token_targets": torch.cat([e["token_targets"] for e in examples])} if all("token_targets" in e for e in examples) else {}),
        "n_questions": sum(len(e["tasks"]) for e in examples),
        "n_loc": sum(task == "localization" for e in examples for task in e["tasks"]),
    }


def block_mask(segment: torch.Tensor) -> torch.Tensor:
    """[batch, seq] segment ids (0 prefix, k >= 1 segment k, -1 padding) -> bool [batch, 1, seq, seq].

    True = may attend: causal, and the key is in the prefix or in the query's own segment.
    Padding queries see the prefix only (never a fully masked row); padding keys are never seen.
    """
    n = segment.shape[1]
    causal = torch.ones(n, n, dtype=torch.bool, device=segment.device).tril()
    q, k = segment[:, :, None], segment[:, None, :]
    allowed = ((k == 0) | (k == q)) & (k >= 0)
    return (allowed & causal)[:, None]
