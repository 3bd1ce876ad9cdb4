"""vlmloc: mechanisms of object localization in vision-language models."""

__version__ = "0.1.0"
