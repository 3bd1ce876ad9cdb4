"""Checks of ``experiment.*`` values that name one or several items of a fixed set (key sets, head
sets, tasks, ablation kinds), with one wording for every experiment's settings."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any


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
