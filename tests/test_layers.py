"""The layers keep to their seams (DESIGN.md): only the hook core registers hooks or names
transformers' cache keywords; reports import neither the engine, the models, torch nor the runner."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "vlmloc"
REPORTS = sorted(p.stem for p in (SRC / "reports").glob("*.py") if p.stem != "__init__")
FORBIDDEN = ("torch", "transformers", "vlmloc.engine", "vlmloc.models", "vlmloc.runner", "vlmloc.app", "vlmloc.experiments")


def test_only_the_hook_core_registers_hooks_or_names_cache_keywords():
    offenders = []
    for path in SRC.rglob("*.py"):
        if path.name == "hooks.py" and path.parent.name == "engine":
            continue
        text = path.read_text()
        if re.search(r"register_(forward_pre_|forward_|full_backward_|)hook\(", text) or re.search(r"[\"'](past_key_values|cache_position)[\"']", text):
            offenders.append(str(path.relative_to(SRC)))
    assert offenders == []


@pytest.mark.parametrize("name", REPORTS)
def test_a_report_imports_no_model_code(name):
    code = (f"import sys, vlmloc.reports.{name}; "
            f"print(sorted({{m.split('.')[0] if m.startswith(('torch', 'transformers')) else m for m in sys.modules "
            f"if m.startswith({FORBIDDEN!r})}}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", f"vlmloc.reports.{name} imports {out.stdout.strip()}"
