"""Where every stage reads and writes, relative to the workspace (the current directory)."""

from __future__ import annotations

from pathlib import Path

__all__ = [
    "ARTIFACTS",
    "CHECKPOINTS_DIR",
    "DATA",
    "EVAL_DIR",
    "EVAL_RUN_FILE",
    "FEATURE_CACHE_DIR",
    "IMAGE_CACHE_DIR",
    "METRICS_FILE",
    "MODELS_DIR",
    "SWEEP_DIR",
    "TRAIN_SUMMARY_FILE",
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
METRICS_FILE = ARTIFACTS / "metrics.json"
TRAIN_SUMMARY_FILE = ARTIFACTS / "train_summary.json"
EVAL_RUN_FILE = ARTIFACTS / "eval_run.json"
SWEEP_DIR = ARTIFACTS / "sweep"


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


def relative_to(path: str, base: Path) -> str:
    """``path`` relative to ``base`` when it lies below it, else absolute."""
    p = Path(path)
    try:
        return str(p.resolve().relative_to(base.resolve()))
    except ValueError:
        return str(p.resolve())
