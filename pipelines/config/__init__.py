"""params.yaml as validated, typed sections (:mod:`pipelines.config.params`)."""

from pipelines.config.base import ConfigError, check_slug
from pipelines.config.overrides import apply_overrides, flatten, set_dotted
from pipelines.config.params import Params, load_params

__all__ = ["ConfigError", "Params", "apply_overrides", "check_slug", "flatten", "load_params", "set_dotted"]
