"""The model adapter interface: one subclass per VLM family.

An adapter owns everything family-specific: loading (hub id or local path, dtype, device,
attention implementation), prompts, the processor call, the box answer format, the visual
layout of a prepared batch, and the module handles the intervention engine needs. It knows
nothing about experiments or result files.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from torch import nn

from vlmloc.models.families import Family, site
from vlmloc.models.families import family as family_facts
from vlmloc.models.layout import VisualLayout

TASKS = ("classification", "localization")
# model.* keys a loaded model was built with; the others are read from the config on every call
LOADED_WITH = ("name", "family", "path", "revision", "dtype", "device", "device_map", "attn_implementation",
               "fused_rms_norm", "sdpa_off", "tiny")
CLASSIFICATION_MODES = ("list", "yes_no", "open")
Box = tuple[float, float, float, float]


@dataclass
class PreparedBatch:
    """A processor output on the model's device plus one VisualLayout per row.

    inputs: input_ids / attention_mask [batch, seq], position_ids [batch, seq] (left padding
    aware; [3, batch, seq] M-RoPE indices for Qwen-VL), pixel_values [n_images_or_tiles, 3, H, W]
    (Qwen-VL: [n_patches, patch_dim] plus image_grid_thw [n_images, 3] and mm_token_type_ids).
    """

    inputs: dict[str, torch.Tensor]
    layouts: list[VisualLayout]

    @property
    def batch_size(self) -> int:
        return int(self.inputs["input_ids"].shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.inputs["input_ids"].shape[1])

    def to(self, device: torch.device | str) -> PreparedBatch:
        """The same batch with its tensors on `device`."""
        return PreparedBatch(inputs={k: v.to(device) for k, v in self.inputs.items()}, layouts=self.layouts)


class VLMAdapter(ABC):
    """Family-independent surface of a loaded VLM. Subclasses fill in the family facts."""

    family: ClassVar[str]

    def __init__(self, model: nn.Module, processor: Any, cfg: DictConfig, device: torch.device) -> None:
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.cfg = cfg
        self.device = device
        self.yes_ids = self._answer_token_ids(cfg.classification.yes_words)
        self.no_ids = self._answer_token_ids(cfg.classification.no_words)
        if set(self.yes_ids) & set(self.no_ids):
            raise ValueError(f"yes and no answers share first tokens {set(self.yes_ids) & set(self.no_ids)}")

    # ------------------------------------------------------------------ module handles
    @property
    def facts(self) -> Family:
        """This family's entry in the family table (`vlmloc.models.families`)."""
        return family_facts(self.family)

    @property
    def language_model(self) -> nn.Module:
        """The decoder stack (LlamaModel / Qwen3Model): the `lm` site."""
        return site(self.model, self.facts, "lm")

    @property
    def projector(self) -> nn.Module:
        return site(self.model, self.facts, "projector")

    @property
    def vision_tower(self) -> nn.Module:
        return site(self.model, self.facts, "vision")

    @property
    def vision_layers(self) -> nn.ModuleList:
        return site(self.model, self.facts, "vision.layers")

    @property
    def layers(self) -> nn.ModuleList:
        return site(self.model, self.facts, "lm.layers")

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def text_config(self) -> Any:
        return self.model.config.text_config

    @property
    def n_heads(self) -> int:
        return int(self.text_config.num_attention_heads)

    @property
    def head_dim(self) -> int:
        hd = getattr(self.text_config, "head_dim", None)
        return int(hd) if hd else int(self.text_config.hidden_size // self.n_heads)

    @property
    def image_token_id(self) -> int:
        return int(self.model.config.image_token_id)

    def self_attn(self, layer: int) -> nn.Module:
        return self.layers[layer].self_attn

    def o_proj(self, layer: int) -> nn.Module:
        """Input is [batch, seq, n_heads * head_dim], head-major: head h is slice h*head_dim:(h+1)*head_dim."""
        return self.layers[layer].self_attn.o_proj

    # ------------------------------------------------------------------ prompts
    @property
    def image_placeholder(self) -> str:
        return self.processor.image_token

    @property
    def classification_mode(self) -> str:
        """`classification.mode`: list | yes_no | open (configs/family/llava.yaml)."""
        mode = str(self.cfg.classification.mode)
        if mode not in CLASSIFICATION_MODES:
            raise ValueError(f"model.classification.mode must be one of {list(CLASSIFICATION_MODES)}, got {mode!r}")
        return mode

    def question(self, task: str, category: str, mode: str | None = None) -> str:
        """The task's question; classification in list mode asks for a list (no category in it).
        mode: a classification mode other than the configured one (CMA asks yes/no)."""
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
        if task == "classification" and (mode or self.classification_mode) == "list":
            return str(self.cfg.prompts.list)
        return str(self.cfg.prompts[task]).format(category=category)

    def prompt(self, task: str, category: str, mode: str | None = None) -> str:
        """The full chat-formatted prompt text, with the family's image placeholder."""
        return str(self.cfg.prompts.template).format(
            image=self.image_placeholder, question=self.question(task, category, mode)
        )

    def with_prompts(self, cfg: DictConfig) -> VLMAdapter:
        """This loaded model read through `cfg` (a model config): a twin sharing the model and
        processor whose prompts and answer settings are `cfg`'s, for runs under other prompt wordings
        (`vlmloc.paraphrases`). The values the weights were loaded with (LOADED_WITH) must be equal."""
        mine, theirs = (OmegaConf.to_container(c, resolve=True) for c in (self.cfg, cfg))
        diff = [k for k in LOADED_WITH if mine.get(k) != theirs.get(k)]
        if diff:
            raise ValueError(f"model configs differ in {diff}, which the loaded model was built with: load it again instead")
        twin = copy.copy(self)
        twin.cfg = cfg
        twin.yes_ids = twin._answer_token_ids(cfg.classification.yes_words)  # they follow the template
        twin.no_ids = twin._answer_token_ids(cfg.classification.no_words)
        return twin

    def _answer_token_ids(self, words: Sequence[str]) -> list[int]:
        """First token id of each answer word as it follows the prompt (context-aware, deduplicated)."""
        ctx = str(self.cfg.prompts.template).format(image="", question="q")
        ctx_ids = self.tokenizer.encode(ctx, add_special_tokens=False)
        ids: list[int] = []
        for word in words:
            full = self.tokenizer.encode(ctx + str(self.cfg.classification.answer_prefix) + word, add_special_tokens=False)
            if full[: len(ctx_ids)] != ctx_ids or len(full) == len(ctx_ids):
                raise ValueError(
                    f"answer word {word!r} does not tokenize as a continuation of the prompt; "
                    "check model.classification.answer_prefix"
                )
            if full[len(ctx_ids)] not in ids:
                ids.append(full[len(ctx_ids)])
        return ids

    # ------------------------------------------------------------------ batches
    def encode(self, images: Sequence[Image.Image], texts: Sequence[str]) -> PreparedBatch:
        """The host's part of `prepare`: the processor with left padding, position ids, layouts and
        pixel values in the model's dtype, all on the CPU. Needs no GPU, so it may run in a worker
        thread (on a `thread_copy`) while the model computes another batch."""
        enc = self.processor(
            images=list(images), text=list(texts), return_tensors="pt", padding=True, **self.processor_kwargs()
        )
        inputs = {k: v for k, v in enc.items() if isinstance(v, torch.Tensor)}
        if self.tokenizer.padding_side != "left":
            raise ValueError("the tokenizer must pad on the left for batched generation")
        inputs["position_ids"] = self.position_ids(inputs)
        layouts = [
            self.layout(inputs["input_ids"][i], im.width, im.height) for i, im in enumerate(images)
        ]
        if "pixel_values" in inputs:  # rounded here or on the device: the same round-to-nearest-even
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        return PreparedBatch(inputs=inputs, layouts=layouts)

    def prepare(self, images: Sequence[Image.Image], texts: Sequence[str]) -> PreparedBatch:
        """Run the processor with left padding; add left-padding-aware position ids and layouts; on the model's device."""
        return self.encode(images, texts).to(self.device)

    def thread_copy(self) -> VLMAdapter:
        """This adapter with a processor of its own (made once per processor, then reused), for
        `encode` in another thread: a fast tokenizer keeps its padding settings in shared state that
        two threads must not change at once. Model, config and everything else are shared."""
        held = self.__dict__.get("_processor_copy")
        if held is None or held[0] is not self.processor:
            held = (self.processor, copy.deepcopy(self.processor))
            self.__dict__["_processor_copy"] = held
        twin = copy.copy(self)
        twin.processor, twin.tokenizer = held[1], held[1].tokenizer
        return twin

    def position_ids(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Position ids of a processor output: [batch, seq] counting from each row's first real token
        (left padding); families with multi-axis rotary positions return [axes, batch, seq] (the batch
        axis is always the second to last)."""
        return (inputs["attention_mask"].long().cumsum(-1) - 1).clamp(min=0)

    def projector_rows(self, ins: torch.Tensor, outs: torch.Tensor, grid_thw: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The projector's input and output as a hook sees them -> one row per visual token each,
        [n_visual_total, d_in] and [n_visual_total, hidden], in layout order (row by row).
        grid_thw: the batch's `image_grid_thw` where the processor returns one, else None."""
        return ins.reshape(-1, ins.shape[-1]), outs.reshape(-1, outs.shape[-1])

    def processor_kwargs(self) -> dict[str, Any]:
        """Extra keyword arguments for the processor call (family specific)."""
        return {}

    def visual_positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[seq] ids of one row -> [n_visual] sequence positions of the image tokens, ascending."""
        return torch.nonzero(input_ids == self.image_token_id).flatten().cpu()

    # ------------------------------------------------------------------ family specifics
    @property
    @abstractmethod
    def tokens_per_side(self) -> int:
        """Visual tokens per side of one tile (or LLaVA's one grid) at the LM input."""

    @abstractmethod
    def n_visual_tokens(self, width: int, height: int) -> int:
        """How many visual tokens an image of this size becomes (without running the processor)."""

    @abstractmethod
    def layout(self, input_ids: torch.Tensor, width: int, height: int) -> VisualLayout:
        """VisualLayout of one row given its [seq] input ids and the original image size."""

    @abstractmethod
    def parse_box(self, text: str, width: int, height: int) -> Box | None:
        """The family's box answer -> xyxy in original pixels, or None when unparseable."""

    @abstractmethod
    def format_box(self, xyxy: Sequence[float], width: int, height: int) -> str:
        """xyxy in original pixels -> the family's box answer text (for supervision and tests)."""
