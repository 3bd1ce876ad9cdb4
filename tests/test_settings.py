"""Experiment settings are Hydra structured configs: a typo, a wrong type, a missing value or a
failed check is a ConfigError naming the key, before any data or model work."""

from __future__ import annotations

import importlib

import pytest
from hydra.core.config_store import ConfigStore

from conftest import compose_cfg
from vlmloc.errors import ConfigError
from vlmloc.experiments import extension, knockout, shuffle, token_ablation, view_ablation
from vlmloc.settings import SCHEMA_GROUP, check_experiment


@pytest.mark.parametrize("override, message", [
    ("+experiment.windw=3", "experiment.windw: Key 'windw' not in 'Settings'"),
    ("experiment.window=abc", "experiment.window: Value 'abc' of type 'str' could not be converted to Integer"),
    ("experiment.window=???", "experiment.window"),
    ("experiment.window=0", "experiment.window must be >= 1, got 0"),
    ("experiment.key_sets=[object,object]", "experiment.key_sets must be distinct values of ['object', 'random']"),
])
def test_a_bad_setting_names_its_key(override, message):
    with pytest.raises(ConfigError) as err:
        knockout.settings(compose_cfg("experiment=knockout", override))
    assert message in str(err.value)


def test_the_settings_are_the_yaml_values_typed_and_registered():
    st = knockout.settings(compose_cfg("experiment=knockout"))
    assert (st.window, st.include_single_layers, list(st.key_sets), st.tasks) == (6, True, ["object", "random"],
                                                                                   ["classification", "localization"])
    assert ConfigStore.instance().repo["schema"]["experiment"]["knockout.yaml"].node._metadata.object_type is knockout.Settings


@pytest.mark.parametrize("name, overrides, message", [
    ("head_ablation", ("experiment.cma_dir=unused", "+experiment.rank_bye=mean"),
     "experiment.rank_bye: Key 'rank_bye' not in 'Settings'"),
    ("head_ablation", ("experiment.cma_dir=unused", "experiment.ks=[0,all]"),
     "experiment.ks holds integers >= 1 or 'all', got [0, 'all']"),
    ("head_ablation", (), "experiment=head_ablation needs experiment.cma_dir=<run directory of experiment=cma>"),
    ("cma", ("+experiment.top_kk=3",), "experiment.top_kk: Key 'top_kk' not in 'Settings'"),
    ("cma", ("experiment.positions=image",), "experiment.positions must be one of ['all', 'text'], got 'image'"),
    ("make_pairs", ("+experiment.require_localisation=true",),
     "experiment.require_localisation: Key 'require_localisation' not in 'Settings'"),
    ("make_pairs", ("experiment.figure_examples=-1",), "experiment.figure_examples must be >= 0, got -1"),
])
def test_check_config_refuses_a_bad_setting_of_pairs_cma_and_head_ablation(name, overrides, message):
    """check_config (the app's first step) validates the settings before any file or model is read."""
    module = importlib.import_module(f"vlmloc.experiments.{name}")
    with pytest.raises(ConfigError) as err:
        check_experiment(module, compose_cfg(f"experiment={name}", *overrides))
    assert message in str(err.value)
    node = ConfigStore.instance().repo["schema"]["experiment"][f"{name}.yaml"].node
    assert node._metadata.object_type is module.Settings


@pytest.mark.parametrize("module, typo, typo_message, bad, bad_message", [
    pytest.param(token_ablation, "+experiment.integrated_gradients.stesp=4",
                 "experiment.integrated_gradients.stesp: Key 'stesp' not in 'IntegratedGradients'",
                 "experiment.integrated_gradients.rank_by=sign",
                 "experiment.integrated_gradients.rank_by must be one of ['value', 'abs'], got 'sign'",
                 id="token_ablation"),
    pytest.param(shuffle, "+experiment.scope=[global]", "experiment.scope: Key 'scope' not in 'Settings'",
                 "experiment.within=view", "experiment.within must be one of ['tile', 'image'], got 'view'",
                 id="shuffle"),
    pytest.param(extension, "+experiment.n_example=2", "experiment.n_example: Key 'n_example' not in 'Settings'",
                 "experiment.scale_levels=[0,1,1]",
                 "experiment.scale_levels must be distinct integers >= 0, got [0, 1, 1]", id="extension"),
    pytest.param(view_ablation, "+experiment.size_bins.edge=[0.1]",
                 "experiment.size_bins.edge: Key 'edge' not in 'SizeBins'",
                 "experiment.size_bins.labels=[small,large]",
                 "experiment.size_bins: 2 edges need 3 labels, got ['small', 'large']", id="view_ablation"),
])
def test_check_config_of_table_experiments_refuses_a_typo_and_a_failed_check(module, typo, typo_message, bad,
                                                                             bad_message):
    """The YAML values pass; a typo'd key (one level down for token_ablation and view_ablation) and a
    failed check stop check_config, the app's first step, before any data or model is read."""
    name = module.__name__.rsplit(".", 1)[-1]
    base = (f"experiment={name}", "model=tiny_internvl")  # view_ablation's check_config needs InternVL
    check_experiment(module, compose_cfg(*base))
    for override, message in ((typo, typo_message), (bad, bad_message)):
        with pytest.raises(ConfigError) as err:
            check_experiment(module, compose_cfg(*base, override))
        assert message in str(err.value)
    assert ConfigStore.instance().load(f"{SCHEMA_GROUP}/{name}.yaml").node._metadata.object_type is module.Settings


@pytest.mark.parametrize("name, typo, typo_message, bad, bad_message", [
    pytest.param("position_probe", "+experiment.probe.sklearn.max_iters=3",
                 "experiment.probe.sklearn.max_iters: Key 'max_iters' not in 'SklearnSettings'",
                 "experiment.probe.token_rate=1.5", "experiment.probe.token_rate must be in (0, 1], got 1.5",
                 id="position_probe"),
    pytest.param("suite", "+experiment.run=[baseline]", "experiment.run: Key 'run' not in 'Settings'",
                 "experiment.runs=[baseline,suite]",
                 "experiment.runs must list one or more experiments other than suite, got ['baseline', 'suite']",
                 id="suite"),
])
def test_check_config_of_position_probe_and_suite_refuses_a_typo_and_a_failed_check(name, typo, typo_message, bad,
                                                                                     bad_message):
    """The YAML values load; a typo'd key (two levels down for position_probe) and a failed check
    stop check_config, the app's first step, before any data or model is read."""
    module = importlib.import_module(f"vlmloc.experiments.{name}")
    assert module.settings(compose_cfg(f"experiment={name}")).name == name
    for override, message in ((typo, typo_message), (bad, bad_message)):
        with pytest.raises(ConfigError) as err:
            check_experiment(module, compose_cfg(f"experiment={name}", override))
        assert message in str(err.value)
    assert ConfigStore.instance().load(f"{SCHEMA_GROUP}/{name}.yaml").node._metadata.object_type is module.Settings
