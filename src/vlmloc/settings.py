"""Experiment settings as Hydra structured configs.

Each experiment declares a frozen dataclass of its `experiment.*` keys, every field MISSING (the
values live in configs/experiment/<name>.yaml, the single source of every default), with range
and choice checks in `__post_init__`, and registers it in Hydra's ConfigStore under
`schema/experiment/<name>`. `load(cls, cfg)` validates the composed node against it before any
data or model work: an unknown key (a typo), a wrong type, a missing value or a failed check is a
`ConfigError` that names the key.

    @register("knockout")
    @dataclass(frozen=True)
    class Settings:
        name: str = MISSING
        window: int = MISSING

        def __post_init__(self) -> None:
            at_least("experiment.window", self.window, 1)

    st = load(Settings, cfg)
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from vlmloc.errors import ConfigError

T = TypeVar("T")
SCHEMA_GROUP = "schema/experiment"


def register(name: str) -> Callable[[type[T]], type[T]]:
    """Class decorator: store the settings dataclass in the ConfigStore as schema/experiment/<name>."""

    def store(cls: type[T]) -> type[T]:
        ConfigStore.instance().store(group=SCHEMA_GROUP, name=name, node=cls)
        return cls

    return store


def _schema(cls: type) -> DictConfig:
    """The structured config of `cls`, writable at every level, nested dataclasses filled in as
    their own schemas: OmegaConf marks each nested frozen dataclass read-only on its own, and a
    merge unlocks only the top node (omegaconf#1102)."""
    schema = OmegaConf.structured(cls)
    OmegaConf.set_readonly(schema, False)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            schema[f.name] = _schema(hints[f.name])
            OmegaConf.set_readonly(schema._get_node(f.name), None)  # inherit: writable
    return schema


def load(cls: type[T], cfg: DictConfig) -> T:
    """`cfg.experiment` (resolved against the whole config) as a `cls` instance, validated; nested
    frozen dataclasses for nested nodes."""
    node = OmegaConf.to_container(cfg.experiment, resolve=True)
    try:
        return OmegaConf.to_object(OmegaConf.merge(_schema(cls), node))  # type: ignore[return-value]
    except OmegaConfBaseException as err:
        key = f"experiment.{err.full_key}" if getattr(err, "full_key", None) else "experiment"
        reason = str(err.msg if getattr(err, "msg", None) else err).splitlines()[0]
        raise ConfigError(f"{key}: {reason}") from None
    except ValueError as err:  # a __post_init__ check
        raise ConfigError(str(err)) from None


def check_experiment(module: Any, cfg: DictConfig) -> None:
    """Before any data or model work: an experiment module's settings (its `settings(cfg)`, else its
    `Settings` schema), then its own further checks (`check_config(cfg)`, e.g. the model family)."""
    check_settings(module, cfg)
    further = getattr(module, "check_config", None)
    if further is not None:
        further(cfg)


def check_settings(module: Any, cfg: DictConfig) -> None:
    """An experiment module's settings alone, without its further checks: its `settings(cfg)`, else
    its `Settings` schema (experiment=paper checks every run's settings before the first starts)."""
    if hasattr(module, "settings"):
        module.settings(cfg)
    elif hasattr(module, "Settings"):
        load(module.Settings, cfg)


def one_of(key: str, value: Any, allowed: Sequence[str]) -> str:
    """`value` as a string, if it is one of `allowed`; `key` names the setting in the error."""
    if str(value) not in allowed:
        raise ValueError(f"{key} must be one of {list(allowed)}, got {value!r}")
    return str(value)


def subset_of(key: str, values: Iterable[Any], allowed: Sequence[str], *, distinct: bool = False) -> tuple[str, ...]:
    """`values` as strings, if they are a non-empty subset of `allowed` (each at most once if `distinct`)."""
    got = tuple(str(v) for v in values)
    if not got or any(v not in allowed for v in got) or (distinct and len(set(got)) != len(got)):
        what = "distinct values of" if distinct else "a non-empty subset of"
        raise ValueError(f"{key} must be {what} {list(allowed)}, got {list(got)}")
    return got


def at_least(key: str, value: int, low: int) -> int:
    if value < low:
        raise ValueError(f"{key} must be >= {low}, got {value}")
    return value


def above(key: str, value: float, low: float, *, inclusive: bool = False) -> float:
    """`value`, if it is > `low` (>= if `inclusive`)."""
    if value < low or (value == low and not inclusive):
        raise ValueError(f"{key} must be {'>=' if inclusive else '>'} {low}, got {value}")
    return value
