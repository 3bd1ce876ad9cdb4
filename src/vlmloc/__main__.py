"""`python -m vlmloc [overrides]`: the Hydra entry point."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig


def config_dir() -> Path:
    """configs/ inside an installed wheel, else the repository's top-level configs/."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "configs", here.parent.parent / "configs"):
        if (candidate / "config.yaml").exists():
            return candidate
    raise FileNotFoundError("vlmloc configs/ not found next to the package or in the repository")


def _app(cfg: DictConfig) -> None:
    from vlmloc.app import run
    from vlmloc.errors import VlmlocError

    try:
        run(cfg, Path(HydraConfig.get().runtime.output_dir))
    except VlmlocError as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        # a user error: one clear line and exit status 2; bugs keep their traceback
        print(f"vlmloc: error: {err}", file=sys.stderr)
        sys.exit(2)


def main() -> None:
    hydra.main(config_path=str(config_dir()), config_name="config", version_base="1.3")(_app)()


if __name__ == "__main__":
    sys.exit(main())
