"""The pipeline stages behind ``inpformer prepare | synthesize | train | evaluate``.

Each stage reads validated params, calls ``components``, writes its outputs atomically under
``data/`` or ``artifacts/`` and records an MLflow run. DVC runs them as plain commands.
"""

from pipelines.stages.evaluation import evaluate
from pipelines.stages.prepare_data import prepare
from pipelines.stages.synthesis import synthesize
from pipelines.stages.training import train

__all__ = ["evaluate", "prepare", "synthesize", "train"]
