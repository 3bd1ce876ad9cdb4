"""The transformers releases vlmloc is tested on, and one warning when another is installed.

The engine reads transformers' internals (module paths, keyword arguments, cache objects) that
change between releases (see `vlmloc.engine.hooks` for the differences handled). The suite runs on
the lowest and the newest release below; `pyproject.toml` allows exactly that range (patch
releases of the newest minor included), and `constraints/` pins the environment of each run.
"""

from __future__ import annotations

import warnings
from importlib import metadata

from packaging.version import Version

# (lowest, newest) transformers releases the test suite passed on; keep pyproject.toml's bounds equal.
TESTED_TRANSFORMERS = ("5.17.0", "5.25.0")


class UntestedTransformersWarning(UserWarning):
    """The installed transformers is outside the range the test suite ran on."""


def tested_range() -> tuple[Version, Version]:
    """[lowest, first release of the next minor after the newest): the range pyproject.toml allows."""
    low, high = (Version(v) for v in TESTED_TRANSFORMERS)
    return low, Version(f"{high.major}.{high.minor + 1}")


def is_tested(version: str) -> bool:
    low, end = tested_range()
    return low <= Version(version) < end


def transformers_version() -> str:
    return metadata.version("transformers")


_warned: set[str] = set()


def warn_if_untested(version: str | None = None) -> bool:
    """Warn once per process and version when transformers is outside the tested range; True if it is."""
    version = transformers_version() if version is None else version
    if is_tested(version):
        return False
    if version not in _warned:
        _warned.add(version)
        low, high = TESTED_TRANSFORMERS
        warnings.warn(
            f"transformers {version} is installed, but vlmloc is tested on {low} to {high} (and {high}'s patch "
            f"releases). Interventions read transformers internals that change between releases; results "
            f"may be wrong. Install a tested release: pip install 'transformers>={low},<{tested_range()[1]}'.",
            UntestedTransformersWarning,
            stacklevel=2,
        )
    return True
