"""Reproducibility: the noise floor of a config (:mod:`.noise`) and rebuilding a registered version
from its record (:mod:`.reproduce`)."""
