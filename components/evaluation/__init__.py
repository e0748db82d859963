"""Evaluation: the paper's metrics and their plots."""
