"""`python -m vlmloc [overrides]`: the Hydra entry point."""

from __future__ import annotations

import logging
import os
import sys
import traceback
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
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
    from vlmloc.sweep import record_job

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    if hydra_cfg.mode == RunMode.MULTIRUN:
        # a job records how it ended; the sweep's report (vlmloc.sweep) prints every job's and exits
        try:
            run(cfg, run_dir)
        except VlmlocError as err:
            logging.getLogger("vlmloc").error("vlmloc: error: %s", err)
            record_job(run_dir, hydra_cfg, "user error", f"vlmloc: error: {err}")
        except Exception:
            logging.getLogger("vlmloc").exception("job failed")
            record_job(run_dir, hydra_cfg, "bug", traceback.format_exc())
        else:
            record_job(run_dir, hydra_cfg, "done")
        return
    try:
        run(cfg, run_dir)
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
