"""Which object categories a free-text answer names: the list-mode classification criterion.

In `classification.mode=list` the model is asked to list the objects in the image, and a sample
counts as recognized when the answer names its category. A table maps every category to its
surface forms, plurals included (`classification.names_file`, default the package's
`assets/category_names.yaml`: the 80 COCO categories in the manner of the CHAIR hallucination
metric, plus the synthetic shapes). Matching is case-insensitive, on word boundaries, longest
form first and without overlaps, so "hot dog" names hot dog and not dog, "teddy bears" names
teddy bear and not bear:

    table = load_names(path)
    named_categories("A man riding a motorbike, two dogs.", table)   # {"person", "motorcycle", "dog"}
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import yaml

from vlmloc.errors import ConfigError


@functools.lru_cache(maxsize=8)
def load_names(path: str | Path) -> dict[str, tuple[str, ...]]:
    """category -> its surface forms (lower case), from a YAML mapping of category: [forms]."""
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"classification.names_file {path}: cannot be read as YAML ({err})") from None
    if not isinstance(raw, dict) or not all(isinstance(v, list) for v in raw.values()):
        raise ConfigError(f"classification.names_file {path}: expected a mapping of category: [names, ...]")
    table = {str(k): tuple(dict.fromkeys([str(k).lower(), *(str(f).lower() for f in v)])) for k, v in raw.items()}
    owner: dict[str, str] = {}
    for cat, forms in table.items():
        for f in forms:
            if owner.setdefault(f, cat) != cat:
                raise ConfigError(f"classification.names_file {path}: {f!r} is listed under both {owner[f]!r} and {cat!r}")
    return table


# Compiled once per table: every list-mode answer is matched against a pattern of all ~400 forms,
# whose compilation costs ~100 times the match (a knockout run scores 77 answers per object).
@functools.lru_cache(maxsize=256)
def _pattern(table: tuple[tuple[str, tuple[str, ...]], ...]) -> tuple[re.Pattern[str], dict[str, str]]:
    """The alternation of every form (longest first) and normalised form -> its category."""
    owner = {f: cat for cat, forms in table for f in forms}
    # longest first: at each position the alternation takes the first form that matches
    forms = sorted(owner, key=lambda f: (-len(f), f))
    body = "|".join(re.escape(f).replace(r"\ ", r"[\s-]+") for f in forms)
    return re.compile(rf"(?<![\w])({body})(?![\w])", re.IGNORECASE), {_spaced(f): c for f, c in owner.items()}


def named_categories(answer: str, table: Mapping[str, Iterable[str]]) -> set[str]:
    """The categories of `table` that `answer` names (each form on word boundaries; a space in a
    form also matches a hyphen or several spaces: "hot-dog", "cell  phone")."""
    return _named(answer, tuple((k, tuple(v)) for k, v in table.items()))


def _named(answer: str, table: tuple[tuple[str, tuple[str, ...]], ...]) -> set[str]:
    pattern, norm = _pattern(table)
    return {norm[_spaced(m.group(1).lower())] for m in pattern.finditer(answer)}


def _spaced(text: str) -> str:
    return re.sub(r"[\s-]+", " ", text)


def names_category(answer: str, category: str, table: Mapping[str, Iterable[str]],
                   extra: Iterable[str] = ()) -> bool:
    """Whether `answer` names `category` (its table forms, or just its name when the table lacks
    it, plus `extra` forms, e.g. a sample's own synonyms)."""
    items = tuple((k, tuple(v)) for k, v in table.items())
    return category in _named(answer, _with_forms(items, category, tuple(e.lower() for e in extra)))


# Merged once per (table, category, extra forms): a knockout run scores 77 answers of each object.
@functools.lru_cache(maxsize=4096)
def _with_forms(table: tuple[tuple[str, tuple[str, ...]], ...], category: str, extra: tuple[str, ...]
                ) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """The table with `extra` forms added to `category` (created when the table lacks it)."""
    merged = dict(table)
    merged[category] = tuple(dict.fromkeys([*merged.get(category, (category.lower(),)), *extra]))
    # an extra form another category also lists stays with the queried one
    taken = set(merged[category])
    return tuple((k, v if k == category else tuple(f for f in v if f not in taken)) for k, v in merged.items())
