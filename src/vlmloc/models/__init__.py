"""Model adapters: one per VLM family, same interface (see adapter.VLMAdapter)."""

from vlmloc.models.adapter import TASKS, PreparedBatch, VLMAdapter
from vlmloc.models.layout import GLOBAL, LOCAL, VisualLayout
from vlmloc.models.loading import ModelLoadError, load_adapter

__all__ = ["GLOBAL", "LOCAL", "TASKS", "ModelLoadError", "PreparedBatch", "VLMAdapter", "VisualLayout", "load_adapter"]
