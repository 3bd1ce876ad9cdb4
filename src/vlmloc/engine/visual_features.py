"""Per-row visual features around the projector: its input (vision features) and output (LM input).

The projector emits tokens in exactly the order masked_scatter places them (tests/test_layout.py),
so the i-th feature of a row is the token at layout.positions[i].
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from vlmloc.data.sample import Sample
from vlmloc.engine.hooks import Call, Hooks
from vlmloc.models.adapter import PreparedBatch, VLMAdapter


@torch.no_grad()
def projector_io(adapter: VLMAdapter, batch: PreparedBatch) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per row: (projector input [n_visual, d_vision_in], projector output [n_visual, hidden]), float32 on CPU.

    Runs the model's own forward (one next-token position) and reads the projector through a hook.
    """
    seen: dict[str, torch.Tensor] = {}

    def keep(call: Call, out: torch.Tensor) -> None:
        seen["in"] = call.hidden.detach()
        seen["out"] = out.detach()

    with Hooks().after(adapter.projector, keep):
        adapter.model(**batch.inputs, logits_to_keep=1)
    # one row per visual token in layout order (Qwen-VL's merger sees 2x2 patch blocks in window order)
    ins, outs = adapter.projector_rows(seen["in"], seen["out"], batch.inputs.get("image_grid_thw"))
    ins, outs = ins.float().cpu(), outs.float().cpu()
    sizes = [layout.n_visual for layout in batch.layouts]
    return list(torch.split(ins, sizes)), list(torch.split(outs, sizes))


def iter_unique_images(samples: Sequence[Sample], batch_size: int) -> Iterator[list[Sample]]:
    """Batches of samples with distinct images (first sample of each image), in order."""
    seen: set[int] = set()
    unique = [s for s in samples if not (s.image_id in seen or seen.add(s.image_id))]
    for start in range(0, len(unique), batch_size):
        yield unique[start : start + batch_size]


def prepared_batches(
    adapter: VLMAdapter, samples: Sequence[Sample], task: str, batch_size: int, *, unique_images: bool = False
) -> Iterator[tuple[list[Sample], PreparedBatch]]:
    """(samples, their prepared batch with `task`'s prompt) in sample order, `batch_size` rows each;
    unique_images: only the first sample of each image (for per-image quantities)."""
    chunks = iter_unique_images(samples, batch_size) if unique_images else (
        list(samples[start : start + batch_size]) for start in range(0, len(samples), batch_size))
    for chunk in chunks:
        yield chunk, adapter.prepare([s.load_image() for s in chunk], [adapter.prompt(task, s.category) for s in chunk])

