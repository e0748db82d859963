"""Where every stage reads and writes, relative to the workspace (the current directory)."""

from __future__ import annotations

import os
import shutil
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
    "PARAMS_CHECKED_FILE",
    "PIPELINE_RUN_FILE",
    "SCORED_MODELS_DIR",
    "SOURCES_DIR",
    "SWEEP_DIR",
    "TILE_CACHE_DIR",
    "TRAIN_HISTORY_FILE",
    "TRAIN_METRICS_FILE",
    "TRAIN_SUMMARY_FILE",
    "WORKSPACE_LOCK",
    "calibrated_package_dir",
    "confined",
    "in_workspace",
    "manifest_path",
    "raw_dir",
    "relative_to",
    "remove_tree",
    "synth_dir",
    "synth_index",
]

DATA = Path("data")
ARTIFACTS = Path("artifacts")
IMAGE_CACHE_DIR = DATA / "cache"
FEATURE_CACHE_DIR = DATA / "cache" / "features"
TILE_CACHE_DIR = DATA / "cache" / "tiles"  # the tile geometry's training tiles (content-keyed)
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
PARAMS_CHECKED_FILE = ARTIFACTS / "params.checked"  # the check stage's marker (constant content)
WORKSPACE_LOCK = ARTIFACTS / ".lock"  # held by train and evaluate: one writer of models/eval at a time
SCORED_MODELS_DIR = ARTIFACTS / ".eval-models.partial"  # evaluate's snapshot of the weights it scores
PIPELINE_RUN_FILE = ARTIFACTS / "pipeline_run.json"  # the MLflow parent run of the latest execution
SWEEP_DIR = ARTIFACTS / "sweep"
SOURCES_DIR = Path("sources")  # a dependency of the prepare stage: source folders and archives go here


def confined(path: str | os.PathLike) -> Path:
    """``path`` itself, after checking that it resolves inside its top-level workspace folder (``data``,
    ``artifacts``, ``metrics``, ...; that folder may itself be a link to another disk) and is not that
    folder. Raises ``ValueError`` otherwise: a name with ``..``, an absolute path or a link leading out
    never becomes a place the pipeline deletes or overwrites."""
    path = Path(path)
    if path.is_absolute() or not path.parts:
        msg = f"{path}: expected a path inside the workspace (relative, e.g. data/raw/<name>)."
        raise ValueError(msg)
    root = Path(path.parts[0]).resolve()
    resolved = path.resolve()
    if ".." in path.parts or resolved == root or not resolved.is_relative_to(root):
        msg = f"{path} resolves to {resolved}, outside {path.parts[0]}/: refusing to write or delete there."
        raise ValueError(msg)
    return path


def remove_tree(path: str | os.PathLike) -> None:
    """``shutil.rmtree`` of a :func:`confined` folder (a no-op when it does not exist)."""
    path = confined(path)
    if path.is_symlink():
        msg = f"{path} is a link: refusing to delete through it; remove the link by hand."
        raise ValueError(msg)
    if path.exists():
        shutil.rmtree(path)


def manifest_path(name: str) -> Path:
    """``data/prepared/<name>/manifest.csv``."""
    return confined(DATA / "prepared" / name) / "manifest.csv"


def raw_dir(name: str) -> Path:
    """``data/raw/<name>``: downloaded, extracted or generated images."""
    return confined(DATA / "raw" / name)


def synth_dir(name: str) -> Path:
    """``data/synth/<name>``: the fixed pseudo-anomaly bank."""
    return confined(DATA / "synth" / name)


def synth_index(name: str) -> Path:
    """The bank's ``index.csv``."""
    return synth_dir(name) / "index.csv"


def calibrated_package_dir(group: str) -> Path:
    """Where the evaluate stage writes the calibrated package of a group's model."""
    return EVAL_DIR / "packages" / group


def in_workspace(path: str | os.PathLike) -> bool:
    """Whether ``path`` (resolved) lies inside the workspace (the current directory)."""
    return Path(path).resolve().is_relative_to(Path.cwd().resolve())


def relative_to(path: str | os.PathLike, base: Path) -> str:
    """``path`` relative to ``base`` when it lies inside the workspace (``../../raw/x.png`` is fine),
    else absolute: manifests of workspace data stay valid when the workspace moves or is cloned."""
    if in_workspace(path):
        return os.path.relpath(Path(path).resolve(), base.resolve())
    return str(Path(path).resolve())
