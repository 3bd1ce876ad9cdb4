"""Files that ship inside the package: the project's trained demo models.

    src/vlmloc/assets/demo_llava/      LlavaForConditionalGeneration (+ tokenizer, image processor)
    src/vlmloc/assets/demo_internvl/   InternVLForConditionalGeneration (+ tokenizer, image processor)

Each folder is a transformers checkpoint (`from_pretrained` works on it, no network) with a
README.md model card saying how it was trained. Configs point at them with the OmegaConf
resolver `vlmloc.asset`, so the path is right from any working directory and in an installed
wheel::

    path: ${vlmloc.asset:demo_llava}    # -> /.../site-packages/vlmloc/assets/demo_llava

`register_resolvers()` registers it; it must run before a config that uses it is resolved
(`import vlmloc.assets` does it once).
"""

from __future__ import annotations

from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent
RESOLVER = "vlmloc.asset"


def asset_path(name: str) -> str:
    """Absolute path of the asset folder `name` (whether or not it exists: loading checks that)."""
    name = str(name).strip()
    if not name or "/" in name or "\\" in name or name.startswith("."):
        raise ValueError(f"asset name must be a plain folder name under {ASSETS_DIR}, got {name!r}")
    return str(ASSETS_DIR / name)


def register_resolvers() -> None:
    """Register `${vlmloc.asset:<name>}` with OmegaConf (idempotent)."""
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver(RESOLVER):
        OmegaConf.register_new_resolver(RESOLVER, asset_path)


register_resolvers()
