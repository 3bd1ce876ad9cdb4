"""Experiment settings are Hydra structured configs: a typo, a wrong type, a missing value or a
failed check is a ConfigError naming the key, before any data or model work."""

from __future__ import annotations

import pytest
from hydra.core.config_store import ConfigStore

from conftest import compose_cfg
from vlmloc.errors import ConfigError
from vlmloc.experiments import knockout
from vlmloc.settings import SCHEMA_GROUP


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
