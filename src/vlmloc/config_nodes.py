"""A config group's node as plain containers, with missing values (???) as the caller's error."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError, MissingMandatoryValue

from vlmloc.errors import VlmlocError


def plain_node(node: Any, group: str, error: type[VlmlocError], user: str, hints: Mapping[str, str] | None = None,
               default_hint: str = "") -> dict[str, Any]:
    """`node` (the `group` config, e.g. data) resolved to a dict; a missing value raises `error`
    naming the dotted key (`hints`: key -> text after "is required", else `default_hint`)."""
    if isinstance(node, DictConfig):
        try:
            return OmegaConf.to_container(node, resolve=True, throw_on_missing=True)  # type: ignore[return-value]
        except MissingMandatoryValue as e:
            key = str(e.full_key) if str(e.full_key).startswith(f"{group}.") else f"{group}.{e.full_key}"
            hint = (hints or {}).get(key, default_hint)
            raise error(f"{key} is required{hint}: pass {key}=...") from e
        except InterpolationResolutionError as e:
            raise error(f"cannot resolve the {group} config: {e}") from e
    if isinstance(node, Mapping):
        return dict(node)
    raise error(f"{user} needs the `{group}` config (a mapping), got {type(node).__name__}")
