"""Work ahead: the next call's inputs are made in a worker thread while the model runs this one,
and the rows are those of calls made in turn."""

from __future__ import annotations

import threading

import pytest
import torch

from conftest import compose_cfg, noise_image
from vlmloc import evaluation
from vlmloc.data import load_samples
from vlmloc.experiments import knockout as ko_exp
from vlmloc.models import load_adapter
from vlmloc.prefetch import Ahead


def test_ahead_computes_the_next_key_in_its_worker_and_raises_where_it_is_asked_for():
    seen: list[tuple[int, str]] = []

    def fn(key: int) -> int:
        seen.append((key, threading.current_thread().name))
        if key == 3:
            raise ValueError("bad input 3")
        return 10 * key

    with Ahead(fn) as ahead:
        assert ahead.get(1, then=2) == 10
        assert ahead.get(2, then=3) == 20  # computed ahead: not again
        with pytest.raises(ValueError, match="bad input 3"):
            ahead.get(3, then=4)
        assert ahead.get(7) == 70  # 4 is no longer coming: dropped, not waited for
    assert [k for k, _ in seen][:4] == [1, 2, 3, 4] or [k for k, _ in seen][:3] == [1, 2, 3]
    assert [k for k, _ in seen].count(2) == 1 and seen[-1][0] == 7
    assert all(name.startswith("vlmloc-ahead") for _, name in seen)

    inline: list[str] = []
    with Ahead(lambda k: inline.append(threading.current_thread().name) or k, enabled=False) as ahead:
        assert ahead.get(5, then=6) == 5
    assert inline == [threading.current_thread().name]  # one call, in the caller's thread


def test_a_thread_copy_has_its_own_processor_and_encodes_as_the_adapter_does(tiny_llava):
    twin = tiny_llava.thread_copy()
    assert twin.processor is not tiny_llava.processor and twin.tokenizer is twin.processor.tokenizer
    assert twin.tokenizer._tokenizer is not tiny_llava.tokenizer._tokenizer  # the state two threads must not share
    assert twin.model is tiny_llava.model and twin.cfg is tiny_llava.cfg
    assert tiny_llava.thread_copy().processor is twin.processor  # copied once per processor
    images = [noise_image(64, 48, 1), noise_image(40, 40, 2)]
    texts = [tiny_llava.prompt("localization", "cat"), tiny_llava.prompt("localization", "traffic light")]
    mine, theirs = tiny_llava.prepare(images, texts), twin.encode(images, texts)
    assert set(mine.inputs) == set(theirs.inputs)
    for key, value in mine.inputs.items():
        assert theirs.inputs[key].device.type == "cpu"
        assert torch.equal(value.cpu(), theirs.inputs[key]), key
    assert theirs.inputs["pixel_values"].dtype == tiny_llava.model.dtype
    assert [lay.positions.tolist() for lay in mine.layouts] == [lay.positions.tolist() for lay in theirs.layouts]


@pytest.mark.parametrize("family", ["tiny_llava", "tiny_internvl"])
def test_prefetched_calls_overlap_the_model_and_give_the_rows_of_calls_in_turn(family, tmp_path, monkeypatch):
    """Knockout conditions (a shared prefix) and the baseline alone (rows in full), several calls per
    task. A call cannot finish until the worker has started on the next one's inputs, so the run
    would stall if the inputs were not made ahead, in the worker."""
    cfg = compose_cfg(f"model={family}", "data=synthetic", "data.n=3", "experiment=knockout", data_dir=tmp_path)
    ad = load_adapter(cfg.model)
    samples, _ = load_samples(cfg.data)
    conds = ko_exp.conditions(ad.n_layers, ko_exp.settings(cfg), seed=0)
    tasks = ["classification", "localization"]
    runs = [dict(conditions=conds, batch_size=len(conds) + 3, share_prefix=True), dict(batch_size=2)]
    plain = [evaluation.evaluate(ad, samples, tasks, progress=False, **kw) for kw in runs]

    real_encode, real_run = evaluation._encode_rows, evaluation._run_rows
    started: dict[tuple, threading.Event] = {}
    threads: list[str] = []
    queues: list[list[tuple]] = []

    def encode(adapter, items, idx, task, mode, shared):
        threads.append(threading.current_thread().name)
        started.setdefault(tuple(idx), threading.Event()).set()
        return real_encode(adapter, items, idx, task, mode, shared)

    def run(adapter, items, idx, host, *args):
        out = real_run(adapter, items, idx, host, *args)
        following = queues[-1][queues[-1].index(tuple(idx)) + 1:]
        if following:  # the next call's inputs are under way before this call returns
            assert started.setdefault(following[0], threading.Event()).wait(timeout=30), "nothing made ahead"
        return out

    real_batches = evaluation._batches

    def batches(*args, **kwargs):
        out = [tuple(b) for b in real_batches(*args, **kwargs)]
        queues.append(out)
        return iter(out)

    monkeypatch.setattr(evaluation, "_encode_rows", encode)
    monkeypatch.setattr(evaluation, "_run_rows", run)
    monkeypatch.setattr(evaluation, "_batches", batches)
    ahead = [evaluation.evaluate(ad, samples, tasks, progress=False, prefetch=True, **kw) for kw in runs]
    assert sum(len(q) for q in queues) >= 2 * len(runs) and all(len(q) >= 2 for q in queues)
    assert threads and all(name.startswith("vlmloc-ahead") for name in threads)
    for want, got in zip(plain, ahead):
        assert len(got) == len(want) > 0
        assert got["answer"].tolist() == want["answer"].tolist()
        assert got["correct"].tolist() == want["correct"].tolist()
        assert got["condition"].tolist() == want["condition"].tolist()
