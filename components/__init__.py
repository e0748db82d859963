"""Pure PyTorch/numpy library of inpformer: model, losses, optimiser, data, synthesis, metrics, engine.

Never imports prefect, mlflow, dvc, optuna or pydantic: those belong to ``pipelines``.
"""
