"""MLflow: runs, the guard around the tracking store, and the model registry."""
