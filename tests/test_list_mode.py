"""classification.mode=list: the model lists the objects; a sample is correct when the list names its category."""

from __future__ import annotations

import copy

import pytest
import torch
from omegaconf import OmegaConf

from conftest import compose_cfg
from vlmloc import evaluation, resources
from vlmloc.assets import ASSETS_DIR
from vlmloc.category_names import load_names, named_categories, names_category
from vlmloc.data import load_samples
from vlmloc.engine.readout import generate
from vlmloc.errors import ConfigError

COCO = ["person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
        "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
        "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee", "skis",
        "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket",
        "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
        "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed",
        "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave", "oven",
        "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush"]
TABLE = {"dog": ("dog", "dogs", "puppy"), "hot dog": ("hot dog", "hot dogs"), "bear": ("bear", "bears"),
         "teddy bear": ("teddy bear", "teddy bears"), "person": ("person", "people", "man", "men")}


def test_names_match_on_word_boundaries_longest_form_first():
    assert named_categories("A hot dog and two Dogs.", TABLE) == {"hot dog", "dog"}
    assert named_categories("hot-dog, teddy  bears", TABLE) == {"hot dog", "teddy bear"}
    assert named_categories("a dogsled, a bearing, manhole", TABLE) == set()
    assert named_categories("PEOPLE near a puppy", TABLE) == {"person", "dog"}
    assert not names_category("a hot dog on a plate", "dog", TABLE)
    assert names_category("a hot dog on a plate", "hot dog", TABLE)
    assert names_category("a kitty", "cat", TABLE, extra=["kitty"])  # a category the table lacks, a sample synonym
    assert not names_category("a cathedral", "cat", TABLE)


def test_the_shipped_table_covers_coco_with_plurals_and_no_form_twice(tmp_path):
    table = load_names(str(ASSETS_DIR / "category_names.yaml"))  # refuses a form listed twice
    assert set(COCO) <= set(table)
    for cat in COCO:
        assert names_category(f"I see {cat}.", cat, table), cat
    for answer, cat in [("two knives", "knife"), ("three people", "person"), ("some mice", "mouse"),
                        ("a motorbike", "motorcycle"), ("wine glasses", "wine glass"), ("two benches", "bench"),
                        ("buses", "bus"), ("teddy bears", "teddy bear")]:
        assert names_category(answer, cat, table), (answer, cat)
    assert not names_category("a teddy bear", "bear", table) and not names_category("hot dogs", "dog", table)
    synthetic = compose_cfg("data=synthetic").data.synthetic.categories
    assert set(synthetic) <= set(table)
    bad = tmp_path / "bad.yaml"
    bad.write_text("dog: [dog, pup]\ncat: [cat, pup]\n")
    with pytest.raises(ConfigError, match="'pup' is listed under both"):
        load_names(str(bad))


@pytest.fixture
def list_llava(tiny_llava):
    ad = copy.copy(tiny_llava)
    ad.cfg = OmegaConf.merge(tiny_llava.cfg, {"classification": {"mode": "list", "list_max_new_tokens": 5}})
    return ad


def test_list_mode_generates_the_list_and_scores_the_named_category(list_llava, tmp_path, monkeypatch):
    samples, _ = load_samples(compose_cfg("data=synthetic", "data.n=3", data_dir=tmp_path).data)
    rows = evaluation.evaluate(list_llava, samples, ["classification"], batch_size=2, progress=False)
    prompt = "USER: <image>\nList the objects in the image, separated by commas. ASSISTANT:"
    for s, row in zip(samples, rows.to_dict("records")):
        assert list_llava.prompt("classification", s.category) == prompt  # no category in the list prompt
        by_hand = generate(list_llava, list_llava.prepare([s.load_image()], [prompt]), 5)[0]
        assert row["answer"] == by_hand and row["p_yes"] != row["p_yes"]  # raw answer kept, no P(yes)
    # the criterion, on answers chosen here
    answers = {samples[0].sample_id: f"a {samples[0].category}s, a tree", samples[1].sample_id: "nothing at all"}
    monkeypatch.setattr(evaluation, "generate", lambda ad, batch, n, cache=None: [answers.get(sid, "") for sid in order])
    order = [samples[0].sample_id, samples[1].sample_id]
    got = evaluation.evaluate(list_llava, samples[:2], ["classification"], batch_size=2, progress=False)
    assert dict(zip(got["sample_id"], got["correct"])) == {samples[0].sample_id: True, samples[1].sample_id: False}
    assert dict(zip(got["sample_id"], got["answer"])) == answers


def test_cma_and_the_pair_filter_ask_yes_no_whatever_the_mode(list_llava, tmp_path, monkeypatch):
    from test_cma import _make_pairs_dir

    from vlmloc.experiments import cma, make_pairs
    from vlmloc.inpaint import build_inpainter
    from vlmloc.runner import RunContext

    assert evaluation.max_new_tokens(list_llava, "classification") == 5
    assert evaluation.max_new_tokens(list_llava, "classification", "yes_no") == 0
    pairs_dir, _ = _make_pairs_dir(tmp_path, tmp_path / "data", n=1)
    cfg = compose_cfg("experiment=cma", "model=tiny_llava", "data=pairs", f"data.pairs_dir={pairs_dir}",
                      "experiment.min_denominator=0.0", data_dir=tmp_path / "data")
    pairs, _ = load_samples(cfg.data)
    ctx = RunContext(cfg=cfg, run_dir=tmp_path / "run")
    ctx.__dict__["adapter"] = list_llava
    asked: list[str] = []
    real_prepare = list_llava.prepare
    monkeypatch.setattr(list_llava, "prepare", lambda images, texts: asked.extend(texts) or real_prepare(images, texts))
    rows = cma._pair_rows(ctx, cma.settings(cfg), pairs[0], "classification")
    question = f"Is there a {pairs[0].category} in the image?"
    assert asked and all(question in t for t in asked) and len(rows) == 2 * 4  # every head of the tiny model
    # the pair filter: experiment.classification_mode (yes_no by default) reaches evaluate
    modes: list[str | None] = []
    real_evaluate = make_pairs.evaluate

    def recording(*args, **kwargs):
        modes.append(kwargs.get("classification_mode"))
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(make_pairs, "evaluate", recording)
    mp_cfg = compose_cfg("experiment=make_pairs", "model=tiny_llava", "inpaint=oracle", "data=synthetic", "data.n=1",
                         data_dir=tmp_path / "data")
    mp = RunContext(cfg=mp_cfg, run_dir=tmp_path / "mp")
    mp.__dict__["adapter"] = list_llava
    samples, _ = load_samples(mp_cfg.data)
    records = make_pairs.current_rows(make_pairs.read_manifest(tmp_path / "mp"), samples)
    make_pairs.inpaint_missing(build_inpainter(mp_cfg.inpaint), samples, records, tmp_path / "mp")
    make_pairs.classify_missing(mp, samples, records, tmp_path / "mp", "tiny_llava@x")
    assert modes == ["yes_no"]
    p = records[samples[0].sample_id]["p_yes_original"]
    assert 0.0 <= p <= 1.0  # yes/no scoring, not a generated list


def test_integrated_gradients_in_list_mode_attribute_the_clean_list(list_llava, tmp_path, monkeypatch):
    import pandas as pd

    samples, _ = load_samples(compose_cfg("data=synthetic", "data.n=1", data_dir=tmp_path).data)
    seen = []

    def fake_ig(adapter, targets, *, baseline, steps, batch_size, progress, endpoints=False):
        seen.extend((t.prompt, t.answer) for t in targets)
        return [(torch.zeros(576).numpy(), 0.0, 0.0) for _ in targets]

    monkeypatch.setattr(resources, "integrated_gradients_batch", fake_ig)
    clean = pd.DataFrame([{"sample_id": samples[0].sample_id, "task": "classification", "answer": "circle, square"}])
    ig = OmegaConf.create({"baseline": "zero", "steps": 2, "batch_size": 2, "rank_by": "abs"})
    resources.ig_scores(list_llava, samples, ["classification"], clean, ig, None)
    assert seen == [(list_llava.prompt("classification", samples[0].category), " circle, square")]
