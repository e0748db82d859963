"""MLflow tracking: runs, params, per-epoch curves, artifacts, the pyfunc model and the registry.

Tracking URI ``sqlite:///mlruns/mlflow.db`` with artifacts under ``mlruns/artifacts`` (MLflow 3
refuses the plain file store); telemetry off; the experiment opens on MLflow's model-training view.

One MLflow run per pipeline execution (a ``dvc repro`` or ``dvc exp run``): the train stage begins a
parent run (named after the DVC experiment, tagged ``stage=pipeline``) with the flattened params;
train and evaluate log nested runs under it and evaluate adds the mean and per-category metrics, so
the runs table lines experiments up with params and mAD side by side. When DVC skips training
(unchanged, or restored from its run cache), evaluate begins the parent itself. Alias ``candidate`` goes to every new version;
``champion`` moves only to a finite mAD that beats the current champion's on the same dataset,
setting and group (:func:`should_promote`).

mlflow is imported inside the functions that talk to it: it is heavy (~2 s) and tracking can be
switched off (``tracking.enabled: false``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from components.files import atomic_write_text
from pipelines.config import Params, flatten
from pipelines.paths import PIPELINE_RUN_FILE

logger = logging.getLogger(__name__)

__all__ = [
    "MODEL_PACKAGE_FILE",
    "PIPELINE_STAGE",
    "TRACKING_ROOT_ENV",
    "MlflowTrialCallback",
    "begin_pipeline_run",
    "git_commit",
    "hermetic_env",
    "log_and_register_model",
    "log_pipeline_metrics",
    "pipeline_run_id",
    "safe_metric_name",
    "should_promote",
    "tracked_run",
]

MODEL_PACKAGE_FILE = "scoring.json"  # written into the registered model folder, read by the pyfunc
MAX_PARAM_LENGTH = 500  # MLflow's limit on a param value
PARAMS_PER_CALL = 100  # MLflow's limit on params per log_params call
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"  # the MLflow UI opens an experiment on this kind's view
EXPERIMENT_KIND = "custom_model_development"  # (not the GenAI view)
PIPELINE_STAGE = "pipeline"  # the stage tag of the parent run of one pipeline execution
TRACKING_ROOT_ENV = "INPFORMER_TRACKING_ROOT"  # relative tracking paths resolve here (temporary exp copies)
COMPLETION_METRIC = "mad"  # a parent run with this metric is complete: the next execution begins a new one


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


def safe_metric_name(name: str) -> str:
    """A category name as an MLflow metric-key prefix (other characters become ``_``)."""
    return "".join(ch if ch.isalnum() or ch in "_-./ " else "_" for ch in name)


def _mlflow(p: Params):
    import mlflow  # heavy; see the module docstring

    root = Path(os.environ.get(TRACKING_ROOT_ENV, "."))
    uri = p.tracking.uri
    if uri.startswith("sqlite:///"):
        db = root / uri[len("sqlite:///") :]  # an absolute path stays absolute
        db.parent.mkdir(parents=True, exist_ok=True)
        uri = f"sqlite:///{db.resolve()}"
    mlflow.set_tracking_uri(uri)
    if mlflow.get_experiment_by_name(p.tracking.experiment) is None:
        location = (root / p.tracking.artifact_location).resolve()
        location.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(Exception):  # another process may have created it meanwhile
            mlflow.create_experiment(
                p.tracking.experiment, artifact_location=location.as_uri(), tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
            )
    experiment = mlflow.set_experiment(p.tracking.experiment)
    if experiment.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
        mlflow.MlflowClient().set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return mlflow


class _NullRun:
    """Stand-in when tracking is disabled: every call is a no-op."""

    info = type("Info", (), {"run_id": ""})()

    def __getattr__(self, name: str):
        return lambda *a, **k: None


def _tags(p: Params, stage: str, extra: dict[str, Any] | None = None) -> dict[str, str]:
    return {
        "git_commit": git_commit(),
        "dvc_stage": os.environ.get("DVC_STAGE", stage),
        "dvc_exp_name": os.environ.get("DVC_EXP_NAME", ""),
        "stage": stage,
        "setting": p.setting.kind,
        "dataset": p.data.name,
        **{k: str(v) for k, v in (extra or {}).items()},
    }


def _log_params(mlflow: Any, p: Params) -> None:
    params = {k: str(v)[:MAX_PARAM_LENGTH] for k, v in flatten(p).items()}
    items = list(params.items())
    for i in range(0, len(items), PARAMS_PER_CALL):
        mlflow.log_params(dict(items[i : i + PARAMS_PER_CALL]))
    mlflow.log_dict(p.model_dump(mode="json"), "params/resolved.json")


def begin_pipeline_run(p: Params) -> str:
    """Begin the parent run of a new pipeline execution; remember its id for the later stages."""
    if not p.tracking.enabled:
        return ""
    mlflow = _mlflow(p)
    name = os.environ.get("DVC_EXP_NAME") or f"pipeline-{git_commit()[:8]}"
    with mlflow.start_run(run_name=name, tags=_tags(p, PIPELINE_STAGE)) as run:
        _log_params(mlflow, p)
    atomic_write_text(PIPELINE_RUN_FILE, json.dumps({"run_id": run.info.run_id}))
    return run.info.run_id


def pipeline_run_id(p: Params) -> str:
    """This execution's parent run: the one train began, unless it is complete (then a new one)."""
    if not p.tracking.enabled:
        return ""
    mlflow = _mlflow(p)
    try:
        run_id = json.loads(PIPELINE_RUN_FILE.read_text())["run_id"]
        run = mlflow.MlflowClient().get_run(run_id)
    except Exception:  # no file, a damaged file, or a run of another tracking store
        return begin_pipeline_run(p)
    return run_id if COMPLETION_METRIC not in run.data.metrics else begin_pipeline_run(p)


def log_pipeline_metrics(p: Params, metrics: dict[str, float]) -> None:
    """Log finite ``metrics`` to this execution's parent run (the experiment's row in the runs table)."""
    if not p.tracking.enabled:
        return
    from mlflow.entities import Metric  # heavy; see the module docstring

    mlflow = _mlflow(p)
    now = int(1000 * time.time())
    batch = [Metric(k, float(v), now, 0) for k, v in metrics.items() if math.isfinite(v)]
    mlflow.MlflowClient().log_batch(pipeline_run_id(p), metrics=batch)


@contextlib.contextmanager
def tracked_run(
    p: Params, stage: str, run_name: str, tags: dict[str, Any] | None = None, in_pipeline: bool = False
) -> Iterator[Any]:
    """An MLflow run with flattened params and the standard tags; yields the ``mlflow`` module.

    ``in_pipeline``: nested under this execution's parent run (:func:`pipeline_run_id`).
    """
    if not p.tracking.enabled:
        yield _NullRun()
        return
    mlflow = _mlflow(p)
    log_dir = Path(tempfile.mkdtemp(prefix="inpformer-log-"))
    handler = logging.FileHandler(log_dir / f"{stage}.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root_logger = logging.getLogger()
    root_logger.addHandler(handler)
    try:
        with contextlib.ExitStack() as runs:
            if in_pipeline:
                runs.enter_context(mlflow.start_run(run_id=pipeline_run_id(p)))
            run = runs.enter_context(
                mlflow.start_run(run_name=run_name, nested=in_pipeline, tags=_tags(p, stage, tags))
            )
            _log_params(mlflow, p)
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


def _champion(client: Any, name: str) -> Any | None:
    try:
        return client.get_model_version_by_alias(name, "champion")
    except Exception:  # MLflow raises a generic exception when the alias does not exist
        return None


def should_promote(champion_tags: dict[str, str] | None, scope: dict[str, str], mad: float) -> bool:
    """Whether a new version with ``mad`` in ``scope`` (dataset, setting, group) becomes champion.

    Never with a NaN or infinite mAD; always when there is no champion; otherwise only when the
    champion is of the same scope and ``mad`` is strictly better. A champion of another scope is
    kept (like is compared with like only).
    """
    if not math.isfinite(mad):
        return False
    if champion_tags is None:
        return True
    if any(champion_tags.get(k, "all" if k == "group" else "") != v for k, v in scope.items()):
        return False
    try:
        current = float(champion_tags.get("mad", "nan"))
    except ValueError:
        return True
    return not math.isfinite(current) or mad > current


def _stage_package(model_dir: Path, package: dict[str, Any]) -> Path:
    """A copy of the model folder with :data:`MODEL_PACKAGE_FILE` added (what gets registered)."""
    staged = Path(tempfile.mkdtemp(prefix="inpformer-model-")) / model_dir.name
    shutil.copytree(model_dir, staged)
    (staged / MODEL_PACKAGE_FILE).write_text(json.dumps(package, indent=2, sort_keys=True))
    return staged


def log_and_register_model(
    mlflow: Any, p: Params, model_dir: Path, package: dict[str, Any], mad: float, group: str
) -> dict[str, Any]:
    """Log the pyfunc model (weights + ``package``), register a version with alias ``candidate``,
    and move ``champion`` to it when :func:`should_promote` says so. Returns what happened."""
    if not p.tracking.enabled or not p.tracking.log_model:
        return {}
    from mlflow import MlflowClient  # heavy; see the module docstring

    staged = _stage_package(model_dir, package)
    try:
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(Path(__file__).with_name("pyfunc_model.py")),  # models from code: no pickle
            artifacts={"model": str(staged)},
            pip_requirements=["torch", "timm", "safetensors", "numpy", "pillow"],
            code_paths=[str(Path(__file__).resolve().parents[1] / d) for d in ("components", "pipelines")],
        )
    finally:
        shutil.rmtree(staged.parent, ignore_errors=True)
    name = p.tracking.registered_model
    client = MlflowClient()
    version = mlflow.register_model(info.model_uri, name).version
    scope = {"dataset": p.data.name, "setting": p.setting.kind, "group": group}
    for k, v in {**scope, "mad": f"{mad:.6f}"}.items():
        client.set_model_version_tag(name, version, k, v)
    client.set_registered_model_alias(name, "candidate", version)
    champion = _champion(client, name)
    champion_tags = dict(champion.tags or {}) if champion is not None else None
    promoted = should_promote(champion_tags, scope, mad)
    if promoted:
        client.set_registered_model_alias(name, "champion", version)
    previous = float(champion_tags.get("mad", "nan")) if champion_tags else None
    return {"model_uri": info.model_uri, "version": version, "champion": promoted, "previous_champion_mad": previous}


class MlflowTrialCallback:
    """One nested MLflow run per finished trial under ``parent_run_id`` (works across processes)."""

    def __init__(self, p: Params, parent_run_id: str) -> None:
        self.p = p
        self.parent = parent_run_id

    def __call__(self, study: Any, trial: Any) -> None:
        """Log ``trial`` (an Optuna ``FrozenTrial`` of ``study``) as a child run."""
        if not self.p.tracking.enabled or not self.parent:
            return
        import mlflow  # heavy; see the module docstring
        from mlflow import MlflowClient
        from mlflow.entities import Metric, Param

        mlflow.set_tracking_uri(self.p.tracking.uri)
        client = MlflowClient()
        exp = client.get_run(self.parent).info.experiment_id
        tags = {
            "mlflow.parentRunId": self.parent,
            "optuna.study": study.study_name,
            "optuna.trial": str(trial.number),
            "state": trial.state.name,
            "stage": "sweep-trial",
        }
        run = client.create_run(exp, run_name=f"trial-{trial.number}", tags=tags)
        when = trial.datetime_complete or trial.datetime_start
        now = int(1000 * when.timestamp()) if when else 0
        metrics = [Metric("intermediate", float(v), now, int(s)) for s, v in sorted(trial.intermediate_values.items())]
        if trial.value is not None:
            metrics.append(Metric(self.p.sweep.metric, float(trial.value), now, 0))
        for cat, v in (trial.user_attrs.get("per_category") or {}).items():
            if math.isfinite(v):
                metrics.append(Metric(f"{safe_metric_name(cat)}/{self.p.sweep.metric}", float(v), now, 0))
        client.log_batch(run.info.run_id, metrics=metrics, params=[Param(k, str(v)) for k, v in trial.params.items()])
        client.set_terminated(run.info.run_id, "FINISHED" if trial.state.name == "COMPLETE" else "KILLED")
