"""Rows per call: batch_size and a padded-token budget; a call out of GPU memory is split and retried."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import compose_cfg
from vlmloc import evaluation
from vlmloc.data import load_samples
from vlmloc.errors import ConfigError


def test_batches_respect_rows_and_padded_tokens():
    cost = [10, 10, 20, 30, 30, 5]
    order = [5, 0, 1, 2, 3, 4]  # sorted by cost, as length_order sorts
    assert list(evaluation._batches(order, 8)) == [order]
    assert list(evaluation._batches(order, 4)) == [[5, 0, 1, 2], [3, 4]]
    # rows x the longest row's cost <= 40: [5, 0, 1] (3 x 10), [2] (alone: 2 x 30 > 40), [3], [4]
    assert list(evaluation._batches(order, 8, cost, 40)) == [[5, 0, 1], [2], [3], [4]]
    assert list(evaluation._batches(order, 8, cost, 60)) == [[5, 0, 1], [2, 3], [4]]
    assert list(evaluation._batches(order, 2, cost, 1000)) == [[5, 0], [1, 2], [3, 4]]
    assert list(evaluation._batches(order, 8, cost, 1)) == [[i] for i in order]  # a row alone always runs


def test_row_tokens_count_the_prompt_the_image_and_the_answer(tiny_llava, tmp_path):
    (s,) = load_samples(compose_cfg("data=synthetic", "data.n=1", data_dir=tmp_path).data)[0]
    batch = tiny_llava.prepare([s.load_image()], [tiny_llava.prompt("localization", s.category)])
    new = int(tiny_llava.cfg.localization.max_new_tokens)
    assert evaluation.row_tokens(tiny_llava, s, "localization") == batch.seq_len + new


def _rows(df: pd.DataFrame) -> pd.DataFrame:
    return df.sort_values(["sample_id", "task"]).reset_index(drop=True)[["sample_id", "task", "p_yes", "answer", "iou"]]


def test_a_call_out_of_memory_is_split_and_the_rows_equal_small_batches(tiny_llava, tmp_path, monkeypatch, caplog):
    samples, _ = load_samples(compose_cfg("data=synthetic", "data.n=6", data_dir=tmp_path).data)
    one = evaluation.evaluate(tiny_llava, samples, ["classification"], batch_size=1, progress=False)
    calls, real = [], evaluation._run_task

    def tight(adapter, batch, chunk, task, mode=None, cache=None):
        calls.append(len(chunk))
        if len(chunk) > 2:  # this "GPU" holds two rows
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(adapter, batch, chunk, task, mode, cache)

    monkeypatch.setattr(evaluation, "_run_task", tight)
    with caplog.at_level(logging.WARNING, logger="vlmloc.evaluation"):
        got = evaluation.evaluate(tiny_llava, samples, ["classification"], batch_size=6, progress=False)
    # 6 rows fail; their halves: 3 fail, so 1 + 2 run and the other 3 go one per call
    assert calls == [6, 3, 1, 2, 1, 1, 1]
    assert "out of GPU memory on 6 rows" in caplog.text
    a, b = _rows(got), _rows(one)
    assert a["sample_id"].tolist() == b["sample_id"].tolist()
    np.testing.assert_allclose(a["p_yes"].astype(float), b["p_yes"].astype(float), atol=1e-5)
    # one row that does not fit is the run's error, not an endless retry
    monkeypatch.setattr(evaluation, "_run_task", lambda *a, **k: (_ for _ in ()).throw(torch.cuda.OutOfMemoryError()))
    with pytest.raises(torch.cuda.OutOfMemoryError):
        evaluation.evaluate(tiny_llava, samples[:1], ["classification"], batch_size=4, progress=False)


def test_a_token_budget_gives_the_rows_of_fixed_batches(tiny_llava, tmp_path):
    samples, _ = load_samples(compose_cfg("data=synthetic", "data.n=4", "model.localization.max_new_tokens=4",
                                          data_dir=tmp_path).data)
    fixed = evaluation.evaluate(tiny_llava, samples, ["classification", "localization"], batch_size=4, progress=False)
    budget = evaluation.evaluate(tiny_llava, samples, ["classification", "localization"], batch_size=4,
                                 batch_tokens=1300, progress=False)  # two rows of ~600 tokens per call
    a, b = _rows(budget), _rows(fixed)
    assert a["answer"].tolist() == b["answer"].tolist()
    np.testing.assert_allclose(a["p_yes"].astype(float), b["p_yes"].astype(float), atol=1e-5, equal_nan=True)


def test_batch_tokens_is_checked():
    from vlmloc import app

    for bad in ("0", "-3", "true"):
        with pytest.raises(ConfigError, match="batch_tokens must be an integer >= 1 or null"):
            app.check_root_config(compose_cfg(f"batch_tokens={bad}"))
