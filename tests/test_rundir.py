"""A run directory belongs to one configuration and one writer: a changed config is refused before
the model loads, naming the changed keys; a second writer is refused, naming the first."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

import pandas as pd
import pytest

from conftest import compose_cfg
from vlmloc import app, runner
from vlmloc.rundir import CONFIG_FILE, LOCK_FILE, RunDirectoryError, check_run_config, writer_lock

BASE = ("experiment=baseline", "model=tiny_llava", "data=synthetic", "data.n=2", "data.synthetic.n_images=2",
        "model.localization.max_new_tokens=4")


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_llava):
    """A finished tiny baseline run and its results."""
    root = tmp_path_factory.mktemp("rundir")
    run_dir = root / "run"
    app.run(compose_cfg(*BASE, data_dir=root / "data"), run_dir, adapter=tiny_llava)
    return root, run_dir, pd.read_parquet(run_dir / "results.parquet")


def _copy(finished, tmp_path):
    root, run_dir, df = finished
    dest = tmp_path / "run"
    shutil.copytree(run_dir, dest)
    return root, dest, df


def _no_model(monkeypatch):
    monkeypatch.setattr(runner, "load_adapter", lambda cfg: pytest.fail("the model must not load"))


@pytest.mark.parametrize(("override", "changed"), [
    ("model=demo_llava", "model.name: 'tiny_llava' -> 'demo_llava'"),
    ("model.path=/models/llava7b", "model.path: None -> '/models/llava7b'"),
    ("data.n=3", "data.n: 2 -> 3"),
    ("seed=1", "seed: 0 -> 1"),
    ("model.prompts.localization='Where is the {category}?'", "model.prompts.localization: "),
])
def test_a_changed_config_is_refused_before_the_model_loads(finished, tmp_path, monkeypatch, override, changed):
    root, run_dir, df = _copy(finished, tmp_path)
    _no_model(monkeypatch)
    with pytest.raises(RunDirectoryError, match="holds results of another configuration") as err:
        app.run(compose_cfg(*BASE, override, data_dir=root / "data"), run_dir)
    assert changed in str(err.value) and "run_name=" in str(err.value)
    pd.testing.assert_frame_equal(pd.read_parquet(run_dir / "results.parquet"), df)
    assert not (run_dir / LOCK_FILE).exists()


def test_the_same_config_or_another_batch_size_does_no_new_work(finished, tmp_path, monkeypatch):
    root, run_dir, df = _copy(finished, tmp_path)
    _no_model(monkeypatch)
    for extra in ((), ("batch_size=3", f"paths.output_dir={tmp_path}")):
        app.run(compose_cfg(*BASE, *extra, data_dir=root / "data"), run_dir)
        pd.testing.assert_frame_equal(pd.read_parquet(run_dir / "results.parquet"), df)


def test_an_experiment_setting_change_names_the_key(tmp_path):
    a = compose_cfg("experiment=token_ablation", "model=tiny_llava")
    b = compose_cfg("experiment=token_ablation", "model=tiny_llava", "experiment.integrated_gradients.steps=4")
    check_run_config(tmp_path, a)
    assert json.loads((tmp_path / CONFIG_FILE).read_text())["experiment"]["integrated_gradients"]["steps"] == 32
    check_run_config(tmp_path, b)  # no results yet: the new config simply replaces the old one
    pd.DataFrame({"x": [1]}).to_parquet(tmp_path / "results.parquet")
    with pytest.raises(RunDirectoryError, match=r"experiment.integrated_gradients.steps: 4 -> 32"):
        check_run_config(tmp_path, a)
    check_run_config(tmp_path, a, refuse_changes=False)  # experiments that recompute what changed
    assert json.loads((tmp_path / CONFIG_FILE).read_text())["experiment"]["integrated_gradients"]["steps"] == 32


HOLD = """
import sys, time
from pathlib import Path
from vlmloc.rundir import writer_lock
with writer_lock(Path(sys.argv[1])):
    print("locked", flush=True)
    time.sleep(60)
"""


def test_a_second_writer_is_refused_and_a_dead_writers_lock_is_taken_over(finished, tmp_path, monkeypatch):
    root, run_dir, df = _copy(finished, tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        _no_model(monkeypatch)
        with pytest.raises(RunDirectoryError, match=rf"being written by pid {holder.pid} on host {socket.gethostname()}"):
            app.run(compose_cfg(*BASE, data_dir=root / "data"), run_dir)
        assert json.loads((run_dir / LOCK_FILE).read_text())["pid"] == holder.pid  # the holder's lock is kept
    finally:
        holder.kill()
        holder.wait()
    # killed: its lock stays behind, and the next run takes it over
    assert (run_dir / LOCK_FILE).exists()
    app.run(compose_cfg(*BASE, data_dir=root / "data"), run_dir)
    assert not (run_dir / LOCK_FILE).exists()
    pd.testing.assert_frame_equal(pd.read_parquet(run_dir / "results.parquet"), df)


def test_a_lock_from_another_host_is_not_taken_over(tmp_path):
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": os.getpid() + 10**6, "host": "elsewhere", "since": "then"}))
    with pytest.raises(RunDirectoryError, match="host elsewhere"), writer_lock(tmp_path):
        pass
    assert (tmp_path / LOCK_FILE).exists()
    (tmp_path / LOCK_FILE).unlink()
    with writer_lock(tmp_path):
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert not (tmp_path / LOCK_FILE).exists()
