"""MLflow tracking: runs, params, per-epoch curves, artifacts, the pyfunc model and the registry.

Tracking URI ``sqlite:///mlruns/mlflow.db`` with artifacts under ``mlruns/artifacts`` (MLflow 3
refuses the plain file store); telemetry off; the experiment opens on MLflow's model-training view.

One MLflow run per pipeline execution (a ``dvc repro`` or ``dvc exp run``): the train stage begins a
parent run (named after the DVC experiment, tagged ``stage=pipeline``) with the flattened params;
train and evaluate log nested runs under it and evaluate adds the mean and per-category metrics, so
the runs table lines experiments up with params and mAD side by side. When DVC skips training
(unchanged, or restored from its run cache), evaluate begins the parent itself. Alias
``candidate`` goes to every new version;
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
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from components.files import atomic_write_text
from pipelines.config import Params, flatten
from pipelines.paths import PIPELINE_RUN_FILE
from pipelines.tracking.gitinfo import code_dirty, git_commit
from pipelines.tracking.guard import (
    TRACKING_ROOT_ENV,
    Guarded,
    NullRun,
    check_available,
    check_sqlite,
    close_stale_runs,
    owner_tags,
    sqlite_path,
    tracking_failed,
    tracking_root,
    tracking_uri,
)

logger = logging.getLogger(__name__)

__all__ = [
    "PIPELINE_STAGE",
    "TRACKING_ROOT_ENV",
    "MlflowTrialCallback",
    "active_run_id",
    "begin_pipeline_run",
    "code_dirty",
    "git_commit",
    "hermetic_env",
    "log_pipeline_metrics",
    "open_tracking",
    "pipeline_run_id",
    "safe_metric_name",
    "tracked_run",
]

MAX_PARAM_LENGTH = 500  # MLflow's limit on a param value
PARAMS_PER_CALL = 100  # MLflow's limit on params per log_params call
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"  # the MLflow UI opens an experiment on this kind's view
EXPERIMENT_KIND = "custom_model_development"  # (not the GenAI view)
PIPELINE_STAGE = "pipeline"  # the stage tag of the parent run of one pipeline execution
TRIAL_RUN_STATUS = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}  # Optuna → MLflow
COMPLETION_METRIC = "mad"  # a parent run with this metric is complete: the next execution begins a new one


def hermetic_env(root: str | os.PathLike = ".") -> None:
    """Keep every tool's state under the project and turn telemetry off (stack-notes §6)."""
    root = Path(root).resolve()
    defaults = {
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DO_NOT_TRACK": "true",
        "PREFECT_HOME": str(root / ".prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        # Prefect's temporary server gets 20 s to start by default: too little on 2 busy cores
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
        "PREFECT_UI_ENABLED": os.environ.get("PREFECT_UI_ENABLED", "true"),
        "DVC_NO_ANALYTICS": "1",
        "MPLCONFIGDIR": str(root / ".cache" / "matplotlib"),
        "GIT_PYTHON_REFRESH": "quiet",
    }
    for k, v in defaults.items():
        os.environ.setdefault(k, v)


def safe_metric_name(name: str) -> str:
    """A category name as an MLflow metric-key prefix (other characters become ``_``)."""
    return "".join(ch if ch.isalnum() or ch in "_-./ " else "_" for ch in name)


def _mlflow(p: Params):
    check_available(p)
    import mlflow  # heavy; see the module docstring

    root = tracking_root()
    db = sqlite_path(p)  # an absolute path stays absolute
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
        check_sqlite(db, p.tracking.timeout_s)
    mlflow.set_tracking_uri(tracking_uri(p))
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


def _tags(p: Params, stage: str, extra: dict[str, Any] | None = None) -> dict[str, str]:
    return {
        "git_commit": git_commit(),
        "git_dirty": str(code_dirty()).lower(),
        "dvc_stage": os.environ.get("DVC_STAGE", stage),
        "dvc_exp_name": os.environ.get("DVC_EXP_NAME", ""),
        "stage": stage,
        "setting": p.setting.kind,
        "dataset": p.data.name,
        **owner_tags(),
        **{k: str(v) for k, v in (extra or {}).items()},
    }


def _log_params(mlflow: Any, p: Params) -> None:
    params = {k: str(v)[:MAX_PARAM_LENGTH] for k, v in flatten(p).items()}
    items = list(params.items())
    for i in range(0, len(items), PARAMS_PER_CALL):
        mlflow.log_params(dict(items[i : i + PARAMS_PER_CALL]))
    mlflow.log_dict(p.model_dump(mode="json"), "params/resolved.json")


def begin_pipeline_run(p: Params, resume_id: str = "") -> str:
    """Begin the parent run of a new pipeline execution (or continue ``resume_id``, the parent of a
    training that is resuming); remember its id for the later stages. Tracking errors warn."""
    if not p.tracking.enabled:
        return ""
    try:
        mlflow = _mlflow(p)
        close_stale_runs(mlflow, p.tracking.experiment)
        if resume_id and _exists(mlflow, resume_id):
            run_id = resume_id
        else:
            name = os.environ.get("DVC_EXP_NAME") or f"pipeline-{git_commit()[:8]}"
            with mlflow.start_run(run_name=name, tags=_tags(p, PIPELINE_STAGE)) as run:
                _log_params(mlflow, p)
            run_id = run.info.run_id
    except Exception as err:
        tracking_failed(p, "beginning the pipeline run", err)
        return ""
    atomic_write_text(PIPELINE_RUN_FILE, json.dumps({"run_id": run_id}))
    return run_id


def _exists(mlflow: Any, run_id: str) -> bool:
    try:
        mlflow.MlflowClient().get_run(run_id)
    except Exception:  # MLflow raises its own exception for an unknown id
        return False
    return True


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
    try:
        from mlflow.entities import Metric  # heavy; see the module docstring

        mlflow = _mlflow(p)
        now = int(1000 * time.time())
        batch = [Metric(k, float(v), now, 0) for k, v in metrics.items() if math.isfinite(v)]
        mlflow.MlflowClient().log_batch(pipeline_run_id(p), metrics=batch)
    except Exception as err:
        tracking_failed(p, "logging the pipeline metrics", err)


def _open_runs(p: Params, stage: str, run_name: str, opts: dict[str, Any], runs: contextlib.ExitStack) -> Any:
    """Start (or continue) the stage's run, nested under the pipeline run when asked; guarded mlflow."""
    mlflow = _mlflow(p)
    close_stale_runs(mlflow, p.tracking.experiment)
    if opts["in_pipeline"]:
        parent = pipeline_run_id(p)
        runs.enter_context(mlflow.start_run(run_id=parent))
        mlflow.set_tags(owner_tags())
    if opts["run_id"] and _exists(mlflow, opts["run_id"]):
        runs.enter_context(mlflow.start_run(run_id=opts["run_id"], nested=opts["in_pipeline"]))
        mlflow.set_tags({**owner_tags(), "resumed": "true"})
    else:
        runs.enter_context(
            mlflow.start_run(run_name=run_name, nested=opts["in_pipeline"], tags=_tags(p, stage, opts["tags"]))
        )
        _log_params(mlflow, p)
    return Guarded(mlflow, p)


def open_tracking(p: Params) -> Any:
    """The ``mlflow`` module pointed at the params' tracking store (for reading records)."""
    return _mlflow(p)


def active_run_id(mlflow: Any) -> str:
    """The run id of the active run of what :func:`tracked_run` yields ('' when tracking is off)."""
    active = getattr(mlflow, "active_run", lambda: None)()
    return str(getattr(getattr(active, "info", None), "run_id", "") or "")


@contextlib.contextmanager
def tracked_run(
    p: Params,
    stage: str,
    run_name: str,
    tags: dict[str, Any] | None = None,
    in_pipeline: bool = False,
    run_id: str = "",
) -> Iterator[Any]:
    """An MLflow run with flattened params and the standard tags; yields the guarded ``mlflow`` module.

    ``in_pipeline``: nested under this execution's parent run (:func:`pipeline_run_id`). ``run_id``:
    continue that run (a resumed training) instead of starting one. Runs left RUNNING by killed
    processes are closed first. Tracking errors warn and the body runs on (``tracking.required``
    makes them fatal); an exception in the body ends the runs FAILED, an interrupt KILLED.
    """
    if not p.tracking.enabled:
        yield NullRun()
        return
    log_dir = Path(tempfile.mkdtemp(prefix="inpformer-log-"))
    handler = logging.FileHandler(log_dir / f"{stage}.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root_logger = logging.getLogger()
    root_logger.addHandler(handler)
    runs = contextlib.ExitStack()
    opts = {"in_pipeline": in_pipeline, "run_id": run_id, "tags": tags}
    try:
        try:
            mlflow: Any = _open_runs(p, stage, run_name, opts, runs)
        except Exception as err:
            _close(runs, None)
            tracking_failed(p, f"starting the {stage} run", err)
            mlflow = NullRun()
        try:
            yield mlflow
        except BaseException as err:
            _close(runs, err, p)
            raise
        handler.flush()
        mlflow.log_artifact(str(log_dir / f"{stage}.log"), artifact_path="logs")
        _close(runs, None, p)
    finally:
        root_logger.removeHandler(handler)
        handler.close()
        shutil.rmtree(log_dir, ignore_errors=True)


def _close(runs: contextlib.ExitStack, err: BaseException | None, p: Params | None = None) -> None:
    """End the runs: FINISHED, FAILED after an exception, KILLED after an interrupt (errors warn)."""
    try:
        if isinstance(err, KeyboardInterrupt):
            import mlflow  # heavy; see the module docstring

            while mlflow.active_run() is not None:
                mlflow.end_run("KILLED")
        runs.__exit__(type(err) if err else None, err, err.__traceback__ if err else None)
    except Exception as close_err:
        if p is not None:
            tracking_failed(p, "ending the run", close_err)


class MlflowTrialCallback:
    """One nested MLflow run per finished trial under ``parent_run_id`` (works across processes)."""

    def __init__(self, p: Params, parent_run_id: str) -> None:
        self.p = p
        self.parent = parent_run_id

    def __call__(self, study: Any, trial: Any) -> None:
        """Log ``trial`` (an Optuna ``FrozenTrial`` of ``study``) as a child run; tracking errors warn."""
        if not self.p.tracking.enabled or not self.parent:
            return
        try:
            self._log(study, trial)
        except Exception as err:
            tracking_failed(self.p, f"logging trial {trial.number}", err)

    def _log(self, study: Any, trial: Any) -> None:
        from mlflow import MlflowClient  # heavy; see the module docstring
        from mlflow.entities import Metric, Param

        _mlflow(self.p)  # the store, resolved as every other call resolves it
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
        client.set_terminated(run.info.run_id, TRIAL_RUN_STATUS.get(trial.state.name, "FAILED"))
