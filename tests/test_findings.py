"""The findings as statements: each verdict and its numbers on hand-built rows, holding and not."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from vlmloc.reports import findings as F
from vlmloc.reports.bootstrap import Bootstrap

BOOT = Bootstrap(resamples=500, seed=0, level=0.95)


def rows(condition: str, task: str, hits: list[bool], **extra: object) -> list[dict]:
    """One row per object s0, s1, ...: a localization hit at every threshold or none; classification correct."""
    out = []
    for i, hit in enumerate(hits):
        loc = task == "localization"
        out.append({"sample_id": f"s{i}", "task": task, "condition": condition,
                    "hit_50": hit if loc else None, "hit_70": hit if loc else None, "hit_90": hit if loc else None,
                    "correct": bool(hit), **extra})
    return out


def frame(*parts: list[dict]) -> pd.DataFrame:
    return pd.DataFrame([r for p in parts for r in p])


N = 20
ALL, NONE = [True] * N, [False] * N
HALF = [i % 2 == 0 for i in range(N)]


def test_object_vs_random_holds_when_object_tokens_cost_more():
    df = frame(*(rows(c, t, h) for t in ("localization", "classification")
                 for c, h in (("baseline", ALL), ("object_tokens", NONE), ("random_tokens", ALL))))
    found = F.object_vs_random(df, BOOT)
    assert [f.verdict for f in found] == [F.HOLDS, F.HOLDS]
    assert found[0].value == pytest.approx(-100.0) and found[0].n == N
    # random costs as much as object: the gap is 0 -> does not hold
    same = frame(*(rows(c, t, h) for t in ("localization", "classification")
                   for c, h in (("baseline", ALL), ("object_tokens", HALF), ("random_tokens", HALF))))
    assert [f.verdict for f in F.object_vs_random(same, BOOT)] == [F.FAILS, F.FAILS]
    assert F.object_vs_random(frame(rows("baseline", "localization", ALL)), BOOT)[0].verdict == F.UNMEASURED


def test_shuffle_containment():
    good = frame(rows("baseline", "localization", ALL), rows("shuffle:object", "localization", ALL),
                 rows("shuffle:global", "localization", NONE))
    f = F.shuffle_containment(good, BOOT)[0]
    assert f.verdict == F.HOLDS and f.value == pytest.approx(100.0) and f.low == f.high == 100.0
    bad = frame(rows("baseline", "localization", ALL), rows("shuffle:object", "localization", NONE),
                rows("shuffle:global", "localization", NONE))
    assert F.shuffle_containment(bad, BOOT)[0].verdict == F.FAILS


def test_global_view_uses_only_images_with_a_thumbnail():
    local_costs = [i < 10 for i in range(N)]  # the local ablation hits only the first 10 objects
    df = frame(rows("baseline", "localization", ALL, has_thumbnail=True),
               rows("object_tokens:view=global", "localization", NONE, has_thumbnail=True),
               rows("object_tokens:view=local", "localization", local_costs, has_thumbnail=True))
    f = F.global_view(df, BOOT)[0]
    assert f.verdict == F.HOLDS and f.value == pytest.approx(-50.0)  # mean(0 - local) = -10/20 * 100
    swapped = df.assign(condition=df["condition"].replace({"object_tokens:view=global": "x"}))
    swapped["condition"] = swapped["condition"].replace({"object_tokens:view=local": "object_tokens:view=global", "x": "object_tokens:view=local"})
    assert F.global_view(swapped, BOOT)[0].verdict == F.FAILS
    single = df.assign(has_thumbnail=False)
    assert F.global_view(single, BOOT)[0].verdict == F.UNMEASURED


def _extension_rows(pred_growth: dict[int, float]) -> pd.DataFrame:
    """GT box 20..40 in a 100x100 image, cells of 5 px; the prediction of pad p is the GT grown by
    pred_growth[p] cells."""
    out = []
    for i in range(N):
        for p, g in pred_growth.items():
            d = 5 * g
            out.append({"sample_id": f"s{i}", "task": "localization", "condition": f"p{p}", "pad": p,
                        "gt_box": [20.0, 20.0, 40.0, 40.0], "pred_box": [20 - d, 20 - d, 40 + d, 40 + d],
                        "cell_w": 5.0, "cell_h": 5.0, "width": 100, "height": 100})
    return pd.DataFrame(out)


def test_extension_diagonal():
    f = F.extension_diagonal(_extension_rows({0: 0, 1: 1, 2: 2}), [0, 1, 2], BOOT)[0]
    assert f.verdict == F.HOLDS and f.n == N
    # each row's prediction is its GT+p (100 %). Rivals: p=0 vs GT+1, IoU 400/900 = 0.44 (0 %); p=1 vs GT+2 and
    # p=2 vs GT+1, IoU 900/1600 = 0.56 (a hit at 0.5 only: 33.3 %). The smallest gap: 100 - 33.3
    assert f.value == pytest.approx(200 / 3)
    assert "p=0: GT+0 - GT+1 +100.0" in f.numbers
    stuck = F.extension_diagonal(_extension_rows({0: 0, 1: 0, 2: 0}), [0, 1, 2], BOOT)[0]
    assert stuck.verdict == F.FAILS and stuck.value == pytest.approx(-100.0)  # p=1, 2 best against GT+0
    assert F.extension_diagonal(_extension_rows({3: 3}), [0, 1, 2], BOOT)[0].verdict == F.UNMEASURED


def _probe(acc: list[float]) -> pd.DataFrame:
    return pd.DataFrame({"stage": ["projector"] + [f"llm.{i}" for i in range(len(acc))],
                         "kind": ["projector"] + ["llm"] * len(acc), "view": "all", "target": "position",
                         "accuracy": [0.9] + acc})


def test_probe_peak_mid_llm():
    f = F.probe_peak(_probe([0.2, 0.4, 0.7, 0.5, 0.3, 0.2, 0.1, 0.1, 0.1, 0.1]), [0.1, 0.9])[0]
    assert f.verdict == F.HOLDS and f.value == 2 and f.n == 10 and math.isnan(f.low)
    late = F.probe_peak(_probe([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95]), [0.1, 0.9])[0]
    assert late.verdict == F.FAILS and late.value == 9
    assert F.probe_peak(_probe([])[:1], [0.1, 0.9])[0].verdict == F.UNMEASURED


def _mf(cls: np.ndarray, loc: np.ndarray) -> pd.DataFrame:
    """[pairs, heads] MF of each task; one layer."""
    out = []
    for task, grid in (("classification", cls), ("localization", loc)):
        for p in range(grid.shape[0]):
            for h in range(grid.shape[1]):
                out.append({"sample_id": f"p{p}", "task": task, "layer": 0, "head": h, "mf": grid[p, h], "valid": True})
    return pd.DataFrame(out)


def test_shared_heads():
    rng = np.random.default_rng(0)
    base = rng.uniform(0, 0.05, (8, 30))
    cls, loc = base.copy(), base.copy()
    cls[:, :10] += 1.0   # classification's top 10: heads 0-9
    loc[:, 10:20] += 1.0  # localization's: heads 10-19
    f = F.shared_heads(_mf(cls, loc), 10, 2, BOOT)[0]
    assert f.verdict == F.HOLDS and f.value == 0 and f.high == 0 and f.n == 8
    loc[:, :10] += 2.0    # now both tasks' top 10 are heads 0-9
    g = F.shared_heads(_mf(cls, loc), 10, 2, BOOT)[0]
    assert g.verdict == F.FAILS and g.value == 10
    assert F.shared_heads(_mf(cls, loc)[lambda d: d.task == "localization"], 10, 2, BOOT)[0].verdict == F.UNMEASURED


def test_head_ablation_statements():
    df = frame(*(rows(c, t, h) for t in ("localization", "classification") for c, h in
                 (("baseline", ALL), ("heads:top:k=5", NONE), ("heads:random:k=5", ALL))),
               rows("heads:cls_critical:k=5", "localization", HALF))
    top = F.top_vs_random_heads(df, [5, 10], BOOT)
    assert [(f.statement.endswith("(k=5)"), f.task, f.verdict) for f in top[:2]] == [
        (True, "localization", F.HOLDS), (True, "classification", F.HOLDS)]
    assert [f.verdict for f in top[2:]] == [F.UNMEASURED] * 2  # k=10 not run
    cls = F.cls_heads_cost_localization(df, [5], BOOT)[0]
    assert cls.verdict == F.HOLDS and cls.value == pytest.approx(-50.0)
    harmless = df[df["condition"] != "heads:cls_critical:k=5"]
    harmless = pd.concat([harmless, pd.DataFrame(rows("heads:cls_critical:k=5", "localization", ALL))])
    assert F.cls_heads_cost_localization(harmless, [5], BOOT)[0].verdict == F.FAILS
    random_as_bad = df.assign(condition=df["condition"].replace({"heads:random:k=5": "heads:top:k=5"}))
    random_as_bad = pd.concat([random_as_bad[random_as_bad.condition != "heads:top:k=5"],
                               pd.DataFrame(rows("heads:top:k=5", "localization", NONE)),
                               pd.DataFrame(rows("heads:random:k=5", "localization", NONE))])
    assert F.top_vs_random_heads(random_as_bad, [5], BOOT)[0].verdict == F.FAILS
