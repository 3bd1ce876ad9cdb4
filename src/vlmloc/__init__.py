"""vlmloc: mechanisms of object localization in vision-language models."""

__version__ = "0.1.0"

# `${vlmloc.asset:<name>}` in configs points at the demo models shipped inside the package.
from vlmloc.assets import register_resolvers as _register_resolvers  # noqa: E402

_register_resolvers()
