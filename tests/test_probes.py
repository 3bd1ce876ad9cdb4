"""Position probes: image split, probe trainers, scoring / heatmap indexing, the experiment end to end."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import compose_cfg, noise_image
from vlmloc import app, runner
from vlmloc.data.coco import DataError
from vlmloc.data.images import list_images, load_image_split, split_images
from vlmloc.engine.capture import model_stages
from vlmloc.experiments import position_probe as pp
from vlmloc.probe_training import ACCURACY_COLUMNS, probe_positions, probe_prompt, resolve_stages, subsample
from vlmloc.probes import PositionScores, ProbeSpec, SklearnProbes, TorchProbes, choose_trainer, labels
from vlmloc.reports.position_probe import FIG2_FILE, FIG11_FILE, plot_heatmaps, position_grid


def _image_folder(folder, sizes):
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (w, h) in enumerate(sizes):
        p = folder / f"img_{i:03d}.png"
        noise_image(w, h, seed=i).save(p)
        paths.append(p)
    return paths


# --------------------------------------------------------------------------- data


def test_image_split_is_deterministic_sorted_and_disjoint(tmp_path):
    (tmp_path / "b" / "deep").mkdir(parents=True)
    names = ["a.jpg", "b/x.JPEG", "b/deep/y.png", "c.jpeg", "d.PNG", "e.png", "f.jpg", "g.jpg"]
    for n in names:
        noise_image(8, 8).save(tmp_path / n, format="PNG")  # content format does not matter for listing
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / ".hidden.jpg").write_bytes(b"")
    paths = list_images(tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in paths] == sorted(names)
    train, test = split_images(paths, 4, 2, seed=3)
    assert (train, test) == split_images(paths, 4, 2, seed=3)
    assert train == sorted(train) and test == sorted(test) and not set(train) & set(test)
    assert len(train) == 4 and len(test) == 2
    assert split_images(paths, 6, 2, seed=3)[1] == test  # more training images never move the test set
    assert split_images(paths, 4, 2, seed=4) != (train, test)
    assert [len(s) for s in split_images(paths, None, None, seed=0)] == [6, 2]  # 20% test by default
    with pytest.raises(DataError, match="exceeds the 8 images"):
        split_images(paths, 7, 2, seed=0)


def test_image_split_errors_and_configs(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        list_images(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images"):
        list_images(tmp_path / "empty")
    with pytest.raises(DataError, match="data.root is required"):
        load_image_split(compose_cfg("data=imagenet").data)
    _image_folder(tmp_path / "imgs", [(16, 16)] * 5)
    split = load_image_split(compose_cfg("data=images", f"data.root={tmp_path / 'imgs'}", "data.n_test=2").data)
    assert (len(split.train), len(split.test), split.n_available) == (3, 2, 5)
    cfg = compose_cfg("data=imagenet", "data.root=/data/imagenet")
    assert (cfg.data.n_train, cfg.data.n_test, cfg.data.images) == (50000, 10000, "/data/imagenet/train")


# --------------------------------------------------------------------------- probes


def _gaussian_problem(n_train, n_test, grid=3, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(grid * grid, dim, generator=g) * 0.7

    def sample(n):
        y = torch.randint(0, grid * grid, (n,), generator=g)
        x = means[y] + torch.randn(n, dim, generator=g) + 5.0
        x[:, 0] *= 50  # one huge dimension, as in LLM residual streams: standardisation must handle it
        return x, y

    return sample(n_train), sample(n_test)


def test_streaming_trainer_agrees_with_full_batch_fit():
    (xtr, ytr), (xte, yte) = _gaussian_problem(3000, 2000)
    spec = [ProbeSpec("s", 16, 3, ("position",))]
    full = SklearnProbes(spec)
    full.fit({"s": (xtr, ytr)})
    stream = TorchProbes(spec, lr=5e-2, minibatch=500, seed=0)
    epochs = 20
    for e in range(epochs):
        stream.set_lr(5e-2 * 0.5 * (1 + np.cos(np.pi * e / epochs)))
        for i in range(0, len(xtr), 500):  # batches arrive one at a time, as from the model
            stream.fit({"s": (xtr[i : i + 500], ytr[i : i + 500])})
    p_full, p_stream = full.predict("s", xte)["position"], stream.predict("s", xte)["position"]
    acc_full, acc_stream = (p_full == yte.numpy()).mean(), (p_stream == yte.numpy()).mean()
    assert 0.7 < acc_full < 0.97  # a problem that is neither trivial nor hopeless
    assert abs(acc_full - acc_stream) < 0.02
    assert (p_full == p_stream).mean() > 0.95


def test_labels_and_trainer_rule():
    pos = torch.tensor([0, 5, 7, 23, 24, 575])
    assert labels("row", pos, 24).tolist() == [0, 0, 0, 0, 1, 23]
    assert labels("col", pos, 24).tolist() == [0, 5, 7, 23, 0, 23]
    assert choose_trainer("auto", 5000, 24, max_tokens=10000, max_class_count=32) == "sklearn"
    assert choose_trainer("auto", 5000, 576, max_tokens=10000, max_class_count=32) == "torch"
    assert choose_trainer("auto", 50000, 24, max_tokens=10000, max_class_count=32) == "torch"
    assert choose_trainer("sklearn", 10**9, 576, max_tokens=1, max_class_count=1) == "sklearn"
    with pytest.raises(ValueError, match="probe.trainer"):
        choose_trainer("lbfgs", 1, 1, max_tokens=1, max_class_count=1)


def test_heatmap_indexing_token_rc_lands_at_rc():
    grid = 6
    spec = ProbeSpec("projector", 4, grid, ("row", "col"))
    scores = PositionScores([spec])
    pos = np.arange(grid * grid)
    view = np.array(["global"] * (grid * grid))
    r, c = 2, 5
    target = r * grid + c
    # only token (2, 5) gets both row and column right; (5, 2) gets only its row right
    rows = np.where(pos == target, r, (pos // grid + 1) % grid)
    cols = np.where(pos == target, c, (pos % grid + 1) % grid)
    rows[5 * grid + 2] = 5
    scores.add_predictions("projector", view, pos, {"row": rows, "col": cols})
    per_pos = scores.per_position()
    joint = position_grid(per_pos, "projector", "row_col")
    assert joint.shape == (grid, grid)
    expected = np.zeros((grid, grid))
    expected[r, c] = 1.0
    np.testing.assert_array_equal(joint, expected)
    row_grid = position_grid(per_pos, "projector", "row")
    assert row_grid[5, 2] == 1.0 and row_grid[2, 5] == 1.0 and np.nansum(row_grid) == 2
    acc = scores.accuracy().set_index("target")["accuracy"]
    assert acc["row_col"] == pytest.approx(1 / 36) and acc["row"] == pytest.approx(2 / 36)
    # the figure shows exactly that grid, (r, c) at image row r, column c
    per_pos["stage_index"], per_pos["kind"] = 0, "projector"
    fig = plot_heatmaps(per_pos[per_pos.target == "row_col"], ["projector"])
    np.testing.assert_array_equal(np.asarray(fig.axes[0].images[0].get_array()), expected)


def test_subsample_keeps_tokens_aligned():
    x = torch.arange(20.0).repeat(3, 1).T  # token i has features [i, i, i]
    pos = torch.arange(20) + 100
    view = np.array([f"v{i}" for i in range(20)])
    out = subsample({"s": (x, pos, view)}, 0.25, torch.Generator().manual_seed(0))
    xs, ps, vs = out["s"]
    assert len(ps) == 5 and len(set(ps.tolist())) == 5
    assert (xs[:, 0].long() + 100 == ps).all() and [f"v{p - 100}" for p in ps.tolist()] == list(vs)
    assert subsample({"s": (x, pos, view)}, 1.0, torch.Generator())["s"][1] is pos


def test_resolve_stages_aliases(tiny_llava):
    stages = model_stages(tiny_llava)  # vision.0-1, projector, llm.0-1
    names = lambda specs: [s.name for s in resolve_stages(specs, stages)]  # noqa: E731
    assert names(None) == ["vision.0", "vision.1", "projector", "llm.0", "llm.1"]
    assert names(["llm.last", "vision.last", "projector"]) == ["vision.1", "projector", "llm.1"]
    assert names(["vision", "llm.-2"]) == ["vision.0", "vision.1", "llm.0"]
    assert names(["llm.mid"]) == ["llm.1"]
    with pytest.raises(ValueError, match="unknown stage"):
        resolve_stages(["llm.7"], stages)


# --------------------------------------------------------------------------- positional code on a tiny model

FAST_PROBE = {"target": "position", "trainer": "torch", "epochs": 4, "epoch_mode": "cache", "lr": 5e-2,
              "lr_schedule": "constant", "minibatch_tokens": 1152, "standardize": True}


def test_positional_code_is_decoded_and_shuffled_positions_are_not(tiny_llava, tmp_path):
    paths = _image_folder(tmp_path, [(64 + 8 * i, 48) for i in range(10)])
    stages = resolve_stages(["projector"], model_stages(tiny_llava))
    code = torch.randn(576, 64, generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(1)

    def add_code(_m, _a, out):  # [batch, 576, d]: a known code per grid position, scaled up
        return out + 3 * out.std() * code

    def shuffle(_m, _a, out):  # every image's tokens in its own random order: position is gone
        return torch.stack([o[torch.randperm(o.shape[0], generator=gen)] for o in out])

    acc = {}
    for hook in (add_code, shuffle):
        handle = tiny_llava.projector.register_forward_hook(hook)
        try:
            res = probe_positions(tiny_llava, paths[:8], paths[8:], stages, FAST_PROBE, batch_size=4,
                                  prompt=probe_prompt(tiny_llava, "Describe the image."))
        finally:
            handle.remove()
        row = res.accuracy.set_index("stage").loc["projector"]
        assert (row.n_train_tokens, row.n_test_tokens, row.chance) == (8 * 576, 2 * 576, pytest.approx(1 / 576))
        acc[hook.__name__] = row.accuracy
    assert acc["add_code"] > 0.9
    assert acc["shuffle"] < 0.01  # chance is 1/576 = 0.0017: ~2 of the 1152 test tokens


# --------------------------------------------------------------------------- the experiment


def test_experiment_tiny_internvl_image_folder_then_resume(tiny_internvl, tmp_path, monkeypatch):
    folder = tmp_path / "imgs"
    # 448x448 -> one tile (global view only); 896x448 -> 2 local crops + the global thumbnail
    _image_folder(folder, [(448, 448), (896, 448), (896, 448), (896, 448), (896, 448)])
    cfg = compose_cfg(
        "experiment=position_probe", "model=tiny_internvl", "data=images", f"data.root={folder}",
        "data.n_train=3", "data.n_test=2", "batch_size=3", "experiment.probe.epochs=2",
        "experiment.stages=[vision.last,projector,llm.last]", data_dir=tmp_path / "data",
    )
    run_dir = tmp_path / "run"
    app.run(cfg, run_dir, adapter=tiny_internvl)  # the session's tiny model (same config)
    acc = pd.read_parquet(run_dir / pp.ACCURACY_FILE)
    assert set(ACCURACY_COLUMNS) <= set(acc.columns)
    assert list(acc.drop_duplicates("stage").stage) == ["vision.1", "projector", "llm.1"]
    assert list(acc.drop_duplicates("stage").stage_index) == [1, 2, 4]
    assert set(acc.view) == {"all", "global", "local"}
    assert acc.accuracy.between(0, 1).all() and (acc.target == "position").all()
    grids = acc.set_index(["stage", "view"])
    assert grids.loc[("vision.1", "all"), "chance"] == pytest.approx(1 / 1024)  # ViT: 32x32 patches per tile
    assert grids.loc[("llm.1", "all"), "chance"] == pytest.approx(1 / 256)  # LM: 16x16 tokens per tile
    n_all = grids.loc[("llm.1", "all"), "n_test_tokens"]
    assert n_all == grids.loc[("llm.1", "global"), "n_test_tokens"] + grids.loc[("llm.1", "local"), "n_test_tokens"]
    per_pos = pd.read_parquet(run_dir / pp.PER_POSITION_FILE)
    assert position_grid(per_pos, "vision.1", "position").shape == (32, 32)
    assert position_grid(per_pos, "llm.1", "position", "local").shape == (16, 16)
    for name in (FIG2_FILE, FIG11_FILE, "summary.md", "run.json"):
        assert (run_dir / name).stat().st_size > 0
    info = json.loads((run_dir / "run.json").read_text())
    assert info["data"]["n_train"] == 3 and info["position_probe"]["trainer"] == "torch"
    assert info["position_probe"]["epoch_mode"] == "cache"  # auto: the tiny cache fits
    assert info["position_probe"]["heatmap_stages"] == ["vision.1", "projector", "llm.1"]
    # a rerun with the same config trains nothing and leaves the results untouched
    mtime = (run_dir / pp.ACCURACY_FILE).stat().st_mtime_ns
    monkeypatch.setattr(runner, "load_adapter", lambda cfg: pytest.fail("a finished run must not load the model"))
    app.run(cfg, run_dir)
    assert (run_dir / pp.ACCURACY_FILE).stat().st_mtime_ns == mtime
    # killed after training, before the test pass: the rerun scores the saved probes, training nothing
    monkeypatch.undo()
    (run_dir / pp.ACCURACY_FILE).unlink()
    monkeypatch.setattr(pp, "train_probes", lambda *a, **k: pytest.fail("saved probes must not be retrained"))
    app.run(cfg, run_dir, adapter=tiny_internvl)
    pd.testing.assert_frame_equal(pd.read_parquet(run_dir / pp.ACCURACY_FILE), acc)


def test_cli_path_tiny_llava_synthetic(tmp_path, capsys):
    """Through app.run with data=synthetic (a data kind app's input check knows today)."""
    cfg = compose_cfg(
        "experiment=position_probe", "model=tiny_llava", "data=synthetic", "data.synthetic.n_images=3",
        "experiment.probe.target=row_col", "experiment.stages=[vision.0,llm.last]", "batch_size=3",
        data_dir=tmp_path / "data",
    )
    assert cfg.experiment.probe.trainer == "auto"
    app.run(cfg, tmp_path / "run")
    acc = pd.read_parquet(tmp_path / "run" / pp.ACCURACY_FILE)
    assert set(acc.target) == {"row", "col", "row_col"} and set(acc.view) == {"all"}
    assert len(acc) == 3 * 2 and (acc[acc.target == "row"].chance == 1 / 24).all()
    assert (acc[acc.target == "row_col"].chance == 1 / 576).all()
    # 3 images -> 2 train / 1 test (20%, at least one), 576 tokens each; 1152 tokens, 24 classes: sklearn
    assert (acc.n_train_tokens == 2 * 576).all() and (acc.n_test_tokens == 576).all()
    assert (acc.trainer == "sklearn").all()
    out = capsys.readouterr().out
    assert "| vision.0" in out and "row_col" in out


def test_sharded_probes_train_on_disjoint_images_and_merge_to_the_mean_of_their_logits(tiny_llava, tmp_path):
    from vlmloc.errors import ConfigError
    from vlmloc.probe_training import stage_batches
    from vlmloc.shards import shard_of

    folder = tmp_path / "imgs"
    _image_folder(folder, [(64 + 8 * i, 48 + 4 * i) for i in range(14)])
    args = ("experiment=position_probe", "model=tiny_llava", "data=images", f"data.root={folder}", "data.n_train=10",
            "data.n_test=4", "batch_size=4", "experiment.probe.epochs=2", "experiment.stages=[projector,llm.last]")
    run_dir = tmp_path / "run"
    for i in range(2):  # trainer=auto: sklearn for this small problem unsharded, torch when sharded
        app.run(compose_cfg(*args, "shard.count=2", f"shard.index={i}", data_dir=tmp_path / "data"), run_dir,
                adapter=tiny_llava)
    cfg = compose_cfg(*args, data_dir=tmp_path / "data")
    split = load_image_split(cfg.data)
    parts = [torch.load(run_dir / f"probes.shard-{i}-of-2.pt", weights_only=True) for i in range(2)]
    info = json.loads((run_dir / "run.json").read_text())
    owned = [[p for p in split.train if shard_of(p.relative_to(folder).as_posix(), 2) == i] for i in range(2)]
    assert [s["n_train_images"] for s in info["position_probe"]["shards"]] == [len(o) for o in owned]
    assert [s["shard"]["index"] for s in info["shards"]] == [0, 1]  # every shard's own provenance
    assert sum(len(o) for o in owned) == len(split.train) and all(owned)
    assert info["position_probe"]["trainer"] == "torch" and info["position_probe"]["n_test_images"] == len(split.test)
    acc = pd.read_parquet(run_dir / pp.ACCURACY_FILE).set_index(["stage", "view", "target"])
    prompt = probe_prompt(tiny_llava, str(cfg.experiment.question))
    stages = resolve_stages(["projector", "llm.last"], model_stages(tiny_llava))
    for stage in stages:
        key = f"{stage.name}|position"
        n = [p["n_train_tokens"][stage.name] for p in parts]
        correct = total = 0
        for b in stage_batches(tiny_llava, split.test, [stage], batch_size=4, prompt=prompt):
            x, pos, _ = b[stage.name]
            logits = sum(ni * (((x.float() - p["probes"][key]["mean"]) / p["probes"][key]["std"]) @ p["probes"][key]["weight"]
                               + p["probes"][key]["bias"]) for ni, p in zip(n, parts)) / sum(n)
            correct += int((logits.argmax(-1) == pos).sum())
            total += len(pos)
        assert correct > 0 and acc.loc[(stage.name, "all", "position"), "accuracy"] == pytest.approx(correct / total)
        assert acc.loc[(stage.name, "all", "position"), "n_train_tokens"] == sum(n)
    with pytest.raises(ConfigError, match="sklearn cannot be sharded"):
        app.run(compose_cfg(*args, "shard.count=2", "experiment.probe.trainer=sklearn", data_dir=tmp_path / "data"),
                tmp_path / "other")
