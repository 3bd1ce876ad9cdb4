"""The trained demo models (model=demo_llava, model=demo_internvl) and their training code.

The committed weights load offline from the package folder, answer the held-out synthetic
scenes well above an untrained model, and localize through their object tokens: ablating them
costs far more localization than ablating as many random tokens (the paper's Table 1 contrast).
The issue's quality bar (classification >= 90 %, localization >= 60 %) is checked on the same
subset (the model cards give the whole held-out split's figures).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import vlmloc.assets  # noqa: F401  (registers ${vlmloc.asset:...} for the demo model configs)
from conftest import compose_cfg
from vlmloc.assets import ASSETS_DIR
from vlmloc.data import load_samples
from vlmloc.engine.visual_features import iter_unique_images, projector_io
from vlmloc.evaluation import evaluate
from vlmloc.conditions import Resources
from vlmloc.experiments.token_ablation import object_condition, random_condition
from vlmloc.models import load_adapter
from vlmloc.models.internvl import InternVLAdapter
from vlmloc.models.llava import LlavaAdapter

DEMOS = ["demo_llava", "demo_internvl"]
# Fixed held-out subsets (data.seed=0). demo_internvl's scoring costs more CPU (tiles): slow-marked.
N_OBJECTS = {"demo_llava": 32, "demo_internvl": 16}
SCORED = ["demo_llava", pytest.param("demo_internvl", marks=pytest.mark.slow)]
# acc@0.5 (%) the committed weights must keep on their subset (they score 78.1 and 75.0; untrained: 0)
MIN_ACC50 = {"demo_llava": 60.0, "demo_internvl": 60.0}
MAX_WEIGHTS_BYTES = 25_000_000  # the issue's limit per model


def _loc(df) -> dict[str, float]:
    """Localization scores in % of a results frame (one condition)."""
    hits = {t: 100 * float(df[f"hit_{t}"].astype(float).mean()) for t in ("50", "70", "90")}
    return {**hits, "loc": float(np.mean(list(hits.values())))}


@pytest.fixture(scope="module")
def demo(request, tmp_path_factory):
    """(name, adapter loaded offline from the committed folder, fixed held-out subset); indirect param."""
    name = request.param
    mp = pytest.MonkeyPatch()
    mp.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    cfg = compose_cfg(f"model={name}", "data=synthetic", f"data.n={N_OBJECTS[name]}",
                      data_dir=tmp_path_factory.mktemp("data"))
    adapter = load_adapter(cfg.model)
    samples, _ = load_samples(cfg.data)
    yield name, adapter, samples
    mp.undo()


@pytest.fixture(scope="module")
def baseline(demo):
    name, adapter, samples = demo
    return evaluate(adapter, samples, ["classification", "localization"], batch_size=8, progress=False)


@pytest.mark.parametrize("name", DEMOS)
def test_configs_point_at_the_committed_folders_from_any_directory(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = compose_cfg(f"model={name}").model
    folder = Path(cfg.path)
    assert folder.is_absolute() and folder == ASSETS_DIR / name
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
              "processor_config.json", "README.md", "training_summary.json"):
        assert (folder / f).is_file(), f"{name} lacks {f}"
    assert sum(f.stat().st_size for f in folder.iterdir()) <= MAX_WEIGHTS_BYTES
    assert "## Held-out scores" in (folder / "README.md").read_text()


@pytest.mark.parametrize("demo", DEMOS, indirect=True)
def test_loads_offline_with_the_real_classes_and_geometry(demo):
    name, adapter, _ = demo
    assert adapter.model.dtype == torch.float32 and adapter.device.type in ("cpu", "cuda")
    if name == "demo_llava":
        assert isinstance(adapter, LlavaAdapter)
        assert type(adapter.model).__name__ == "LlavaForConditionalGeneration"
        assert adapter.tokens_per_side == 24 and adapter.n_visual_tokens(400, 300) == 576
    else:
        assert isinstance(adapter, InternVLAdapter)
        assert type(adapter.model).__name__ == "InternVLForConditionalGeneration"
        text = adapter.text_config
        assert text.model_type == "qwen3" and text.num_key_value_heads < text.num_attention_heads
        # a wide image: 2 local tiles + the global thumbnail, 256 tokens each
        assert adapter.n_visual_tokens(480, 240) == 3 * 256
        layout = adapter.prepare([_plain_image(480, 240)], [adapter.prompt("classification", "star")]).layouts[0]
        assert layout.n_tiles == 3 and set(layout.view) == {"global", "local"}


def _plain_image(width: int, height: int):
    from PIL import Image

    return Image.new("RGB", (width, height), (120, 90, 60))


@pytest.mark.parametrize("demo", SCORED, indirect=True)
def test_heldout_scores_are_far_above_an_untrained_model(demo, baseline):
    """Trained, not random: an untrained model localizes nothing (IoU ~ 0) on these scenes."""
    name, _, _ = demo
    loc = _loc(baseline[baseline.task == "localization"])
    parsed = baseline[baseline.task == "localization"]["pred_box"].notna().mean()
    assert parsed == 1.0, "every box answer parses in the family's format"
    assert loc["50"] >= MIN_ACC50[name], f"{name}: acc@0.5 {loc['50']:.1f}% on the fixed held-out subset"


@pytest.mark.parametrize("demo", SCORED, indirect=True)
def test_heldout_scores_meet_the_issue_bar(demo, baseline):
    name, _, _ = demo
    cls = 100 * float(baseline[baseline.task == "classification"]["correct"].astype(float).mean())
    loc = _loc(baseline[baseline.task == "localization"])["loc"]
    assert cls >= 90.0 and loc >= 60.0, f"{name}: classification {cls:.1f} %, localization {loc:.1f} %"


@pytest.mark.parametrize("demo", ["demo_llava"], indirect=True)
def test_ablating_object_tokens_hurts_localization_far_more_than_random_tokens(demo, baseline):
    """Table 1's contrast: same number of tokens, object vs random, replaced with the mean embedding.

    On this subset (32 objects): 67.7 % -> 0.0 % with the object's tokens (7.6 % of the visual tokens),
    67.7 % -> 64.6 % with as many random ones.
    """
    name, adapter, samples = demo
    total, count = None, 0
    for chunk in iter_unique_images(samples, 8):
        batch = adapter.prepare([s.load_image() for s in chunk], [adapter.prompt("classification", s.category) for s in chunk])
        for feats in projector_io(adapter, batch)[1]:
            total = feats.sum(0, dtype=torch.float64) if total is None else total + feats.sum(0, dtype=torch.float64)
            count += feats.shape[0]
    mean = (total / count).float()
    df = evaluate(adapter, samples, ["localization"], batch_size=16, progress=False,
                  conditions=[object_condition(0), random_condition(0)], resources=Resources(mean_embedding=mean))
    clean = _loc(baseline[baseline.task == "localization"])["loc"]
    obj = _loc(df[df.condition == "object_tokens"])["loc"]
    rnd = _loc(df[df.condition == "random_tokens"])["loc"]
    frac = df.groupby("condition")["frac_edited"].mean()
    assert frac["object_tokens"] == pytest.approx(frac["random_tokens"]) and frac["object_tokens"] < 0.2
    assert clean - obj >= 40.0, f"object tokens: {clean:.1f} -> {obj:.1f}"
    assert (clean - obj) >= (clean - rnd) + 30.0, f"object drop {clean - obj:.1f} vs random drop {clean - rnd:.1f}"


# ----------------------------------------------------------------------------- training code


@pytest.fixture(scope="module")
def fresh_llava(tmp_path_factory):
    """An untrained demo build at test size, its adapter and a training dataset."""
    from omegaconf import OmegaConf

    from vlmloc.data.synthetic import SyntheticParams
    from vlmloc.models.loading import ADAPTERS
    from vlmloc.training.build import build_demo
    from vlmloc.training.data import PackedScenes

    cfg = compose_cfg("model=demo_llava", "data=synthetic")
    params = SyntheticParams.from_mapping(OmegaConf.to_container(cfg.data.synthetic))
    arch = {"tokenizer_vocab_size": 512,
            "vision": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2},
            "text": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                     "num_key_value_heads": 4}}
    model, processor = build_demo(cfg.model, arch, params.categories, seed=0)
    adapter = ADAPTERS["llava"](model, processor, cfg.model, torch.device("cpu"))
    return adapter, PackedScenes(adapter, params, "train", seed=0), params


def test_training_examples_use_the_evaluation_prompts_and_answer_formats(fresh_llava):
    """Prompt ids equal the processor's; answers parse back to the object box; negatives are absent."""
    import math

    from vlmloc import geometry
    from vlmloc.training.data import object_box, render_train_scene, scene_questions

    adapter, dataset, params = fresh_llava
    image, spec = render_train_scene(params, "train", 3)
    questions = scene_questions(adapter, spec, params.categories, np.random.default_rng(0))
    present = {o["category"]: object_box(o["polygon"]) for o in spec["objects"]}
    assert sum(q.answer == "Yes" for q in questions) == sum(q.answer == "No" for q in questions) == len(present)
    for q in questions:
        ids, n_prompt = dataset.encoder.encode(q, 1)
        batch = adapter.prepare([image], [adapter.prompt(q.task, q.category, mode=q.mode)])
        assert batch.inputs["input_ids"][0].tolist() == ids[:n_prompt]
        assert ids[-1] == adapter.tokenizer.eos_token_id
        answer = adapter.tokenizer.decode(ids[n_prompt:-1]).strip()
        if q.task == "localization":
            box = adapter.parse_box(answer, image.width, image.height)
            assert geometry.box_iou(box, present[q.category]) > 0.8  # two decimals on the padded square
        else:
            assert answer == q.answer and (q.answer == "Yes") == (q.category in present)
    assert not math.isnan(dataset[0]["token_targets"].sum().item())


def test_the_list_question_names_the_scenes_categories_in_reading_order(fresh_llava):
    """data.list_objects: one list-prompt question per scene, its answer the categories ordered by
    each object's box top then left (hand-sorted here), each once; packing still equals the
    single-question forward."""
    from omegaconf import OmegaConf

    from vlmloc.training.data import PackedScenes, object_box, render_train_scene, scene_questions
    from vlmloc.training.loop import check_packing

    adapter, _, params = fresh_llava
    list_cfg = OmegaConf.merge(adapter.cfg, {"classification": {"mode": "list"}})
    image, spec = render_train_scene(params, "train", 7)
    questions = scene_questions(adapter, spec, params.categories, np.random.default_rng(0), list_objects=True)
    (listed,) = [q for q in questions if q.mode == "list"]
    order = sorted(spec["objects"], key=lambda o: (object_box(o["polygon"])[1], object_box(o["polygon"])[0]))
    expected = []
    for o in order:
        if o["category"] not in expected:
            expected.append(o["category"])
    assert listed.answer == ", ".join(expected) and listed.task == "classification"
    assert len(questions) == 1 + len(scene_questions(adapter, spec, params.categories, np.random.default_rng(0)))
    dataset = PackedScenes(adapter, params, "train", seed=0, list_objects=True)
    ids, n_prompt = dataset.encoder.encode(listed, 1)
    prompt = str(list_cfg.prompts.template).format(image=adapter.image_placeholder, question=list_cfg.prompts.list)
    assert adapter.prepare([image], [prompt]).inputs["input_ids"][0].tolist() == ids[:n_prompt]
    assert adapter.tokenizer.decode(ids[n_prompt:-1]).strip() == listed.answer
    example = dataset[7]
    assert check_packing(adapter.model, example, torch.device("cpu")) < 1e-4


def test_packed_training_forward_equals_the_single_question_forward(fresh_llava):
    from vlmloc.training.loop import check_packing

    adapter, dataset, _ = fresh_llava
    example = dataset[5]
    assert len(example["tasks"]) >= 3 and example["token_targets"].shape == (576, 9)
    assert check_packing(adapter.model, example, torch.device("cpu")) < 1e-4


def test_a_continued_run_records_its_lineage_and_the_commands_that_rebuild_it(tmp_path):
    """stage_record/previous_stages/retrain_commands: stage k starts from stage k-1's output."""
    import json

    from vlmloc.training.loop import previous_stages, retrain_commands, stage_record

    def summary(steps, init_from, overrides, first_scene):
        return {"steps": steps, "max_steps": steps + 10, "stopped_by": "max_steps", "fresh_steps": steps, "replayed_steps": 0,
                "images_seen": 32 * steps, "questions_seen": 100 * steps, "train_seconds": 60.0, "device": "gpu",
                "overrides": overrides, "heldout": {"cls_acc": 50.0, "loc_acc": 10.0},
                "train_config": {"init_from": init_from, "data": {"first_scene": first_scene, "images_per_step": 32},
                                 "optim": {"lr": 1e-3}}}

    assert previous_stages(None) == []
    stage1 = tmp_path / "stage1"
    stage1.mkdir()
    s1 = summary(100, None, ["data.num_workers=4", "device=cuda"], 0)
    (stage1 / "training_summary.json").write_text(json.dumps(s1))
    s2 = summary(200, str(stage1), [f"init_from={stage1}", "data.first_scene=3200", "out_dir=x"], 3200)
    stages = previous_stages(str(stage1)) + [stage_record(s2)]
    assert [st["steps"] for st in stages] == [100, 200] and stages[1]["first_scene"] == 3200
    s2["stages"] = stages
    (stage1 / "training_summary.json").write_text(json.dumps(s2))  # a stage-3 run reads the whole lineage
    assert [st["steps"] for st in previous_stages(str(stage1))] == [100, 200]
    cmds = retrain_commands(stages, "demo_llava").splitlines()
    assert cmds[0] == ("python scripts/train_demo.py configs/train/demo_llava.yaml device=cuda data.num_workers=4 "
                       "optim.max_steps=110 out_dir=outputs/train/demo_llava/stage1")
    assert cmds[1] == ("python scripts/train_demo.py configs/train/demo_llava.yaml device=cuda "
                       "init_from=outputs/train/demo_llava/stage1/demo_llava data.first_scene=3200 "
                       "optim.max_steps=210 out_dir=outputs/train/demo_llava/stage2")
    assert cmds[2] == "cp -r outputs/train/demo_llava/stage2/demo_llava/* src/vlmloc/assets/demo_llava/"


@pytest.mark.parametrize("name", DEMOS)
def test_the_committed_cards_list_every_stage(name):
    """Three stages, each on the next unseen scenes; the last adds the list prompt, so the held-out
    classification (list mode, the shipped default) and its yes/no column both meet the bar."""
    import json

    s = json.loads((ASSETS_DIR / name / "training_summary.json").read_text())
    st = s["stages"]
    assert len(st) == 3 and st[1]["first_scene"] == st[0]["images_seen"]
    # each stage on the next unseen scenes, or the card says which scenes it saw again
    repeat = st[2]["first_scene"] != st[1]["first_scene"] + st[1]["images_seen"]
    assert not repeat or any(f"scene {st[2]['first_scene']:,}" in n for n in s.get("notes", []))
    assert all("data.list_objects=false" in x["overrides"] for x in st[:2])
    assert s["train_config"]["data"]["list_objects"] is True
    assert s["heldout"]["cls_acc"] >= 90.0 and s["heldout"]["cls_acc_yes_no"] >= 90.0 and s["heldout"]["loc_acc"] >= 60.0
    assert "init_from=outputs/train/" in (ASSETS_DIR / name / "README.md").read_text()


def test_synthetic_wide_images_all_get_two_local_tiles_and_the_thumbnail_on_demo_internvl():
    """data=synthetic_wide exists for the view ablation: every size it can draw tiles 2x1 + thumbnail."""
    cfg = compose_cfg("model=demo_internvl", "data=synthetic_wide")
    adapter = load_adapter(cfg.model)
    (w0, w1), (h0, h1) = cfg.data.synthetic.width, cfg.data.synthetic.height
    for w in (w0, (w0 + w1) // 2, w1):
        for h in (h0, (h0 + h1) // 2, h1):
            assert adapter.n_visual_tokens(w, h) == 3 * 256, (w, h)
    assert cfg.data.split != compose_cfg("data=synthetic").data.split  # never overwrites the default held-out split


@pytest.mark.parametrize("demo", ["demo_llava"], indirect=True)
def test_negative_questions_are_answered_no_as_one_question_at_a_time_says(demo):
    """negative_outcomes (batched through the evaluation loop) against each absent-category
    question run alone: denied exactly where the lone forward pass gives P(yes) < 0.5 (yes_no mode)
    or where the lone generated list does not name the category (list mode, the demo models')."""
    from vlmloc.category_names import load_names, names_category
    from vlmloc.engine.readout import generate, next_token_logprobs, yes_probability
    from vlmloc.seeds import row_rng
    from vlmloc.training.loop import _present_categories, negative_outcomes

    _, adapter, samples = demo
    samples = samples[:6]
    categories = sorted({s.category for s in samples} | {"circle", "square", "triangle", "star"})
    got = negative_outcomes(adapter, samples, categories, batch_size=4)
    present, first = _present_categories(samples), {}
    for s in samples:
        first.setdefault(s.image_id, s)
    want = []
    for image_id, s in sorted(first.items()):
        absent = [c for c in categories if c not in present[image_id]]
        if absent:
            c = str(row_rng(0, image_id, "negative").choice(absent))
            batch = adapter.prepare([s.load_image()], [adapter.prompt("classification", c)])
            if adapter.classification_mode == "list":
                answer = generate(adapter, batch, int(adapter.cfg.classification.list_max_new_tokens))[0]
                table = load_names(str(adapter.cfg.classification.names_file))
                want.append(not names_category(answer, c, table, []))
            else:
                want.append(bool(yes_probability(adapter, next_token_logprobs(adapter, batch))[0] < 0.5))
    assert got == want and len(got) >= 3
