"""Bad input is one clear line and exit status 2, before any model loads; bugs keep their traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import compose_cfg
from vlmloc import app, runner
from vlmloc.errors import ConfigError
from vlmloc.models.loading import ModelLoadError, check_weights


def _cli(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vlmloc", *args, f"paths.output_dir={cwd}/out", f"paths.data_dir={cwd}/data"],
                          capture_output=True, text=True, cwd=cwd, timeout=300)


@pytest.mark.parametrize(("args", "message"), [
    (("batch_size=0",), "batch_size must be an integer >= 1, got 0"),
    (("batch_size=-1",), "batch_size must be an integer >= 1, got -1"),
    (("experiment=baseline", "data.n=0"), "data.n must be an integer >= 1 or null"),
    (("experiment=cma", "data=synthetic"), "experiment=cma needs source/base pairs"),
    (("experiment=baseline", "model=llava7b", "model.path=/no/such/folder"), "model.path=/no/such/folder is not a folder"),
])
def test_bad_input_is_one_line_and_exit_status_2(tmp_path, args, message):
    out = _cli(*args, cwd=tmp_path)
    assert out.returncode == 2, out.stderr[-2000:]
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("vlmloc: error: ") and message in lines[-1]
    assert "Traceback" not in out.stderr


def test_no_sample_left_is_refused_before_the_model_loads(tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "load_adapter", lambda cfg: pytest.fail("the model must not load"))
    cfg = compose_cfg("experiment=baseline", "model=tiny_llava", "data=synthetic", "data.synthetic.n_images=2",
                      "data.filters.min_area_frac=0.49", data_dir=tmp_path / "data")
    with pytest.raises(ConfigError, match=r"gives no sample to run on \(input kept \d+, well_formed kept"):
        app.run(cfg, tmp_path / "run")


def test_a_missing_demo_model_says_it_ships_with_the_package(tmp_path, monkeypatch):
    import vlmloc.models.loading as loading

    monkeypatch.setattr(loading, "ASSETS_DIR", tmp_path)
    cfg = compose_cfg("model=demo_llava", f"model.path={tmp_path / 'demo_llava'}").model
    with pytest.raises(ModelLoadError, match="demo model that ships inside vlmloc") as err:
        check_weights(cfg)
    assert "hf download" not in str(err.value) and "make train-demo MODEL=demo_llava" in str(err.value)


def test_cma_on_a_pairs_run_that_kept_no_pair_is_refused(tmp_path, monkeypatch):
    from test_cma import _make_pairs_dir
    from vlmloc.data.pairs import read_manifest, write_manifest

    pairs_dir, _ = _make_pairs_dir(tmp_path, tmp_path / "data")
    write_manifest(pairs_dir, read_manifest(pairs_dir).assign(kept=False))
    monkeypatch.setattr(runner, "load_adapter", lambda cfg: pytest.fail("the model must not load"))
    cfg = compose_cfg("experiment=cma", "model=tiny_llava", "data=pairs", f"data.pairs_dir={pairs_dir}")
    with pytest.raises(ConfigError, match="data=pairs gives no sample to run on"):
        app.run(cfg, tmp_path / "run")


def test_the_log_is_named_after_the_run_and_records_each_phase(tmp_path):
    out = _cli("experiment=baseline", "model=tiny_llava", "data=synthetic", "data.n=2", "data.synthetic.n_images=2",
               "model.localization.max_new_tokens=4", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    log = (tmp_path / "out" / "baseline-tiny_llava-synthetic" / "baseline-tiny_llava-synthetic.log").read_text()
    assert "classification: 2 rows (1 conditions) in" in log and "localization: 2 rows (1 conditions) in" in log
