"""The pipeline stages behind ``inpformer check | prepare | synthesize | train | evaluate``, and what they share
(records, training datasets, count tables).

Each stage reads validated params, calls ``components``, writes its outputs atomically under
``data/`` or ``artifacts/`` and records an MLflow run. DVC runs them as plain commands.

``stages.prepare`` & co. are imported on first use: running one stage (or importing
``pipelines.stages.records``) loads none of the other stages' code.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipelines.stages.check import check
    from pipelines.stages.evaluation import evaluate
    from pipelines.stages.prepare_data import prepare
    from pipelines.stages.synthesis import synthesize
    from pipelines.stages.training import train

__all__ = ["check", "evaluate", "prepare", "synthesize", "train"]

_MODULES = {
    "check": "check",
    "evaluate": "evaluation",
    "prepare": "prepare_data",
    "synthesize": "synthesis",
    "train": "training",
}


def __getattr__(name: str) -> Any:
    if name in _MODULES:
        return getattr(importlib.import_module(f"pipelines.stages.{_MODULES[name]}"), name)
    msg = f"module {__name__!r} has no attribute {name!r}"
    raise AttributeError(msg)
