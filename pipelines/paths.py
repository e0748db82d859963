"""Where every stage reads and writes, relative to the workspace (the current directory)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = [
    "ARTIFACTS",
    "CHECKPOINTS_DIR",
    "CURVES_DIR",
    "DATA",
    "EVAL_DIR",
    "EVAL_RUN_FILE",
    "FEATURE_CACHE_DIR",
    "IMAGE_CACHE_DIR",
    "METRICS_DIR",
    "METRICS_FILE",
    "MODELS_DIR",
    "PIPELINE_RUN_FILE",
    "SOURCES_DIR",
    "SWEEP_DIR",
    "TRAIN_HISTORY_FILE",
    "TRAIN_METRICS_FILE",
    "TRAIN_SUMMARY_FILE",
    "in_workspace",
    "manifest_path",
    "raw_dir",
    "relative_to",
    "synth_dir",
    "synth_index",
]

DATA = Path("data")
ARTIFACTS = Path("artifacts")
IMAGE_CACHE_DIR = DATA / "cache"
FEATURE_CACHE_DIR = DATA / "cache" / "features"
MODELS_DIR = ARTIFACTS / "models"
CHECKPOINTS_DIR = ARTIFACTS / "checkpoints"
EVAL_DIR = ARTIFACTS / "eval"
TRAIN_SUMMARY_FILE = ARTIFACTS / "train_summary.json"  # with wall times: not versioned by git
# Versioned by git (DVC metrics/plots with cache: false), so `dvc exp show` and `dvc metrics diff`
# see them for every commit and experiment; every file here is deterministic.
METRICS_DIR = Path("metrics")
METRICS_FILE = METRICS_DIR / "metrics.json"  # mean and per-category metrics
TRAIN_METRICS_FILE = METRICS_DIR / "train.json"  # per group: images, iterations, final losses
TRAIN_HISTORY_FILE = METRICS_DIR / "train_history.csv"  # per-epoch mean losses and lr
CURVES_DIR = METRICS_DIR / "curves"  # roc/, pr/, pro/: one CSV per category
EVAL_RUN_FILE = ARTIFACTS / "eval_run.json"
PIPELINE_RUN_FILE = ARTIFACTS / "pipeline_run.json"  # the MLflow parent run of the latest execution
SWEEP_DIR = ARTIFACTS / "sweep"
SOURCES_DIR = Path("sources")  # a dependency of the prepare stage: source folders and archives go here


def manifest_path(name: str) -> Path:
    """``data/prepared/<name>/manifest.csv``."""
    return DATA / "prepared" / name / "manifest.csv"


def raw_dir(name: str) -> Path:
    """``data/raw/<name>``: downloaded, extracted or generated images."""
    return DATA / "raw" / name


def synth_dir(name: str) -> Path:
    """``data/synth/<name>``: the fixed pseudo-anomaly bank."""
    return DATA / "synth" / name


def synth_index(name: str) -> Path:
    """The bank's ``index.csv``."""
    return synth_dir(name) / "index.csv"


def in_workspace(path: str | os.PathLike) -> bool:
    """Whether ``path`` (resolved) lies inside the workspace (the current directory)."""
    return Path(path).resolve().is_relative_to(Path.cwd().resolve())


def relative_to(path: str | os.PathLike, base: Path) -> str:
    """``path`` relative to ``base`` when it lies inside the workspace (``../../raw/x.png`` is fine),
    else absolute: manifests of workspace data stay valid when the workspace moves or is cloned."""
    if in_workspace(path):
        return os.path.relpath(Path(path).resolve(), base.resolve())
    return str(Path(path).resolve())
