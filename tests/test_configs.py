"""Every config composes, and the CLI prints the resolved config."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import CONFIG_DIR, compose_cfg


def _group(name: str) -> list[str]:
    return sorted(p.stem for p in (Path(CONFIG_DIR) / name).glob("*.yaml"))


def test_groups_hold_the_paper_models_and_data():
    assert set(_group("model")) >= {"llava7b", "llava13b", "internvl8b", "tiny_llava", "tiny_internvl",
                                    "qwen2_5vl7b", "qwen3vl8b", "tiny_qwen2_5vl", "tiny_qwen3vl"}
    assert set(_group("data")) >= {"coco", "synthetic", "fixture"}
    assert "baseline" in _group("experiment")
    for f in (Path(CONFIG_DIR) / "experiment").glob("*.yaml"):
        assert f.read_text().startswith("# @package _global_"), f"{f.name} must start with '# @package _global_'"


def _base_experiment(name: str) -> str:
    """The experiment a file runs: its own name, or, for a preset whose defaults list starts from
    another experiment file (paper_smoke: paper), that one's."""
    node = OmegaConf.load(Path(CONFIG_DIR) / "experiment" / f"{name}.yaml")
    bases = [d for d in node.get("defaults", []) if isinstance(d, str) and d != "_self_"
             and (Path(CONFIG_DIR) / "experiment" / f"{d}.yaml").exists()]
    return _base_experiment(bases[0]) if bases else name


# Every experiment with every model (on data=synthetic) and with every data config (on tiny_llava):
# each pairing that can clash composes, without the full three-way product.
PAIRS = sorted({(m, "synthetic", e) for m in _group("model") for e in _group("experiment")}
               | {("tiny_llava", d, e) for d in _group("data") for e in _group("experiment")})


@pytest.mark.parametrize(("model", "data", "experiment"), PAIRS)
def test_every_config_composes_and_resolves(model, data, experiment):
    cfg = compose_cfg(f"model={model}", f"data={data}", f"experiment={experiment}", "data.root=/tmp/x")
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert resolved["model"]["name"] == model
    from vlmloc.models.families import FAMILIES

    assert resolved["model"]["family"] in FAMILIES
    assert resolved["data"]["name"] == data
    assert resolved["experiment"]["name"] == _base_experiment(experiment)
    assert "{question}" in resolved["model"]["prompts"]["template"]


@pytest.mark.parametrize("launcher", ["slurm", "local"])
def test_launcher_configs_compose(launcher):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=[f"hydra/launcher={launcher}"], return_hydra_config=True)
    target = cfg.hydra.launcher._target_
    assert target.endswith("SlurmLauncher" if launcher == "slurm" else "LocalLauncher")


def test_model_paths_default_to_hub_ids():
    cfg = compose_cfg("model=llava7b")
    assert cfg.model.path == "llava-hf/llava-1.5-7b-hf"
    assert compose_cfg("model=internvl8b").model.path == "OpenGVLab/InternVL3_5-8B-HF"
    assert compose_cfg("model=tiny_llava").model.path is None
    assert compose_cfg("model=qwen2_5vl7b").model.path == "Qwen/Qwen2.5-VL-7B-Instruct"
    assert compose_cfg("model=qwen3vl8b").model.path == "Qwen/Qwen3-VL-8B-Instruct"


def test_cli_prints_resolved_job_config(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "vlmloc", "--cfg", "job", "model=internvl8b", "data=coco", "data.root=/data/coco"],
        capture_output=True, text=True, check=True, cwd=tmp_path,
    ).stdout
    cfg = OmegaConf.create(out)
    assert cfg.model.hub_id == "OpenGVLab/InternVL3_5-8B-HF"
    assert cfg.data.root == "/data/coco"
    assert cfg.experiment.name == "suite" and list(cfg.experiment.runs) == ["baseline", "token_ablation", "shuffle"]
