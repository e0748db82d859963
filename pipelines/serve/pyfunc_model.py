"""MLflow "models from code" entry: logging this file (not a pickled object) keeps the registered
model free of pickle; ``pipelines`` and ``components`` travel as code paths."""

import mlflow.models

from pipelines.serve.pyfunc import InpFormerPyfunc

mlflow.models.set_model(InpFormerPyfunc())
