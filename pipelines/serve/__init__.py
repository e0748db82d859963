"""A model leaving the pipeline: predict, export, the MLflow pyfunc, the web inspector and scheduled scoring."""
