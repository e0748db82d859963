"""Optuna sweeps: the study and its workers, the objective, and Prefect work-pool workers."""
