"""The project's error type: an input or a configuration the user can fix.

`python -m vlmloc` prints such an error as one line, `vlmloc: error: <message>`, and exits with
status 2 (the full traceback with HYDRA_FULL_ERROR=1). Any other exception is a bug and keeps its
traceback.
"""

from __future__ import annotations


class VlmlocError(Exception):
    """Bad input or configuration; the message says what is wrong and what to do."""


class ConfigError(VlmlocError, ValueError):
    """A configuration value is out of range or inconsistent."""
