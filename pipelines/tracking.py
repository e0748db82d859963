"""MLflow tracking: runs, params, per-epoch curves, artifacts, the pyfunc model and the registry.

Tracking URI ``sqlite:///mlruns/mlflow.db`` with artifacts under ``mlruns/artifacts`` (MLflow 3
refuses the plain file store); telemetry off. Alias ``candidate`` goes to every new version;
``champion`` moves only when mAD beats the current champion's on the same dataset and setting.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipelines.config import Params, flatten

logger = logging.getLogger(__name__)

__all__ = ["git_commit", "hermetic_env", "log_and_register_model", "tracked_run"]


def hermetic_env(root: str | os.PathLike = ".") -> None:
    """Keep every tool's state under the project and turn telemetry off (stack-notes §6)."""
    root = Path(root).resolve()
    defaults = {
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DO_NOT_TRACK": "true",
        "PREFECT_HOME": str(root / ".prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": os.environ.get("PREFECT_UI_ENABLED", "true"),
        "DVC_NO_ANALYTICS": "1",
        "MPLCONFIGDIR": str(root / ".cache" / "matplotlib"),
        "GIT_PYTHON_REFRESH": "quiet",
    }
    for k, v in defaults.items():
        os.environ.setdefault(k, v)


def git_commit(root: str | os.PathLike = ".") -> str:
    """The current commit (``unknown`` outside git)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10, check=False
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _mlflow(p: Params):
    import mlflow

    uri = p.tracking.uri
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///") :])
        db.parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    if mlflow.get_experiment_by_name(p.tracking.experiment) is None:
        location = Path(p.tracking.artifact_location).resolve()
        location.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(Exception):  # another process may have created it meanwhile
            mlflow.create_experiment(p.tracking.experiment, artifact_location=location.as_uri())
    mlflow.set_experiment(p.tracking.experiment)
    return mlflow


class _NullRun:
    """Stand-in when tracking is disabled: every call is a no-op."""

    info = type("Info", (), {"run_id": ""})()

    def __getattr__(self, name: str):
        return lambda *a, **k: None


@contextlib.contextmanager
def tracked_run(
    p: Params, stage: str, run_name: str, tags: dict[str, Any] | None = None, nested: bool = False
) -> Iterator[Any]:
    """An MLflow run with flattened params and the standard tags; yields the ``mlflow`` module."""
    if not p.tracking.enabled:
        yield _NullRun()
        return
    mlflow = _mlflow(p)
    all_tags = {
        "git_commit": git_commit(),
        "dvc_stage": os.environ.get("DVC_STAGE", stage),
        "dvc_exp_name": os.environ.get("DVC_EXP_NAME", ""),
        "stage": stage,
        "setting": p.setting.kind,
        "dataset": p.data.name,
        **{k: str(v) for k, v in (tags or {}).items()},
    }
    import tempfile

    log_dir = Path(tempfile.mkdtemp(prefix="inpformer-log-"))
    handler = logging.FileHandler(log_dir / f"{stage}.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root_logger = logging.getLogger()
    root_logger.addHandler(handler)
    try:
        with mlflow.start_run(run_name=run_name, nested=nested, tags=all_tags) as run:
            params = {k: str(v)[:500] for k, v in flatten(p).items()}
            items = list(params.items())
            for i in range(0, len(items), 100):
                mlflow.log_params(dict(items[i : i + 100]))
            mlflow.log_dict(p.model_dump(mode="json"), "params/resolved.json")
            try:
                yield mlflow
            finally:
                handler.flush()
                mlflow.log_artifact(str(log_dir / f"{stage}.log"), artifact_path="logs")
            logger.info("MLflow run %s (%s)", run.info.run_id, run_name)
    finally:
        root_logger.removeHandler(handler)
        handler.close()
        shutil.rmtree(log_dir, ignore_errors=True)


def _champion_mad(client: Any, name: str, dataset: str, setting: str, group: str) -> float | None:
    try:
        mv = client.get_model_version_by_alias(name, "champion")
    except Exception:
        return None
    tags = mv.tags or {}
    if tags.get("dataset") != dataset or tags.get("setting") != setting or tags.get("group", "all") != group:
        return None  # champion is for another dataset/setting: compare like with like only
    try:
        return float(tags.get("mad", "nan"))
    except ValueError:
        return None


def log_and_register_model(
    mlflow: Any, p: Params, model_dir: Path, inference: dict[str, Any], mad: float, group: str
) -> dict[str, Any]:
    """Log the pyfunc model, register a version with alias ``candidate``; promote to ``champion``
    when its mAD beats the champion's on the same dataset and setting. Returns what happened."""
    if not p.tracking.enabled or not p.tracking.log_model:
        return {}
    from mlflow import MlflowClient

    info_path = model_dir.parent / f".{model_dir.name}.inference.json"
    info_path.write_text(json.dumps(inference, indent=2))
    try:
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(Path(__file__).with_name("pyfunc_model.py")),  # models from code: no pickle
            artifacts={"model": str(model_dir), "inference": str(info_path)},
            pip_requirements=["torch", "timm", "safetensors", "numpy", "pillow"],
            code_paths=[str(Path(__file__).resolve().parents[1] / d) for d in ("components", "pipelines")],
        )
    finally:
        info_path.unlink(missing_ok=True)
    name = p.tracking.registered_model
    client = MlflowClient()
    mv = mlflow.register_model(info.model_uri, name)
    version = mv.version
    tags = {"dataset": p.data.name, "setting": p.setting.kind, "group": group, "mad": f"{mad:.6f}"}
    for k, v in tags.items():
        client.set_model_version_tag(name, version, k, v)
    client.set_registered_model_alias(name, "candidate", version)
    current = _champion_mad(client, name, p.data.name, p.setting.kind, group)
    try:
        client.get_model_version_by_alias(name, "champion")
        has_champion = True
    except Exception:
        has_champion = False
    # first version: champion; later: only a better mAD on the same dataset and setting
    promoted = not has_champion or (current is not None and math.isfinite(mad) and mad > current)
    if promoted:
        client.set_registered_model_alias(name, "champion", version)
    return {
        "model_uri": info.model_uri,
        "version": version,
        "champion": promoted,
        "previous_champion_mad": current,
    }
