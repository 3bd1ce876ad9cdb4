"""The paper's published numbers as data: configs/paper/<model>.yaml, read by model name.

    paper = PaperValues.for_model("llava7b")
    paper.rows("table1")["object_tokens"]      # {"loc": 5.92, "cls": 19.44, "tokens_pct": 8}
    paper.source("table1")                     # "Table 1 (token ablation)"
    paper.finding("cma")                       # {"source": ..., "text": ..., "layers": [11, 16], ...}

A model without a file (the demo and tiny builds), and a table, condition, task or finding a file
leaves out, is "not stated": an empty mapping, never a guess.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

NOT_STATED = "not stated"
ROW_KEYS = ("loc", "cls", "loc_delta", "cls_delta", "tokens_pct")


def paper_dir() -> Path:
    """configs/paper/ of the installed configs."""
    from vlmloc.__main__ import config_dir

    return config_dir() / "paper"


def _check(data: Any, path: Path) -> dict[str, Any]:
    """The file's content, checked: tables.<t>.{source, rows: condition -> known numeric keys},
    findings.<f>.{source, text, ...}."""
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping with `tables` and `findings`")
    for name, table in (data.get("tables") or {}).items():
        if not isinstance(table, dict) or not table.get("source") or not isinstance(table.get("rows"), dict):
            raise ValueError(f"{path}: tables.{name} needs a `source` (the paper's table) and `rows`")
        for cond, values in table["rows"].items():
            bad = sorted(set(values) - set(ROW_KEYS)) if isinstance(values, dict) else [values]
            if bad or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values.values()):
                raise ValueError(f"{path}: tables.{name}.rows.{cond} holds numbers under {list(ROW_KEYS)}, got {values!r}")
    for name, finding in (data.get("findings") or {}).items():
        if not isinstance(finding, dict) or not finding.get("source") or not finding.get("text"):
            raise ValueError(f"{path}: findings.{name} needs a `source` and a `text`")
    return data


@dataclass(frozen=True)
class PaperValues:
    """One model's stated numbers (`tables`) and findings in words (`findings`)."""

    model: str
    tables: dict[str, Any] = field(default_factory=dict)
    findings: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def for_model(cls, model: str, directory: Path | None = None) -> "PaperValues":
        """configs/paper/<model>.yaml; empty (nothing stated) when there is no such file."""
        from omegaconf import OmegaConf

        path = (directory or paper_dir()) / f"{model}.yaml"
        if not path.is_file():
            return cls(model)
        data = _check(OmegaConf.to_container(OmegaConf.load(path), resolve=True), path)
        if data.get("model") != model:
            raise ValueError(f"{path} names model {data.get('model')!r}; the file of model {model!r} must name it")
        return cls(model, dict(data.get("tables") or {}), dict(data.get("findings") or {}))

    @property
    def stated(self) -> bool:
        return bool(self.tables or self.findings)

    def rows(self, table: str) -> dict[str, dict[str, float]]:
        """condition -> the numbers the paper states for it in `table` ({} when none)."""
        return {str(c): dict(v) for c, v in ((self.tables.get(table) or {}).get("rows") or {}).items()}

    def source(self, table: str) -> str:
        return str((self.tables.get(table) or {}).get("source") or NOT_STATED)

    def finding(self, name: str) -> dict[str, Any]:
        return dict(self.findings.get(name) or {})

    def finding_text(self, name: str) -> str:
        f = self.finding(name)
        return f"{f['text']} ({f['source']})" if f else NOT_STATED
