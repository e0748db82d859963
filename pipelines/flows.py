"""Prefect flows: the DVC pipeline as stage-named tasks, scheduled reruns that rerun only what changed,
runs with overrides as DVC experiments, and a metrics table artifact.

prefect is imported at module top: this module is only imported by the commands that run flows.

One direction of control: Prefect → DVC → plain ``inpformer`` commands, one DVC command per workspace
at a time (a file lock), output streamed into the Prefect logs.

* **Scheduled / plain runs** ask ``dvc status`` first. Nothing changed (no new or changed image in
  ``sources/``, no code or params change): the run ends in a ``Completed`` state named ``NoChange``
  with a markdown artifact saying so; the old metrics are not republished as a new result.
  Otherwise each changed stage runs as its own task (named after the stage).
* **Runs with overrides** (``["loss.gamma=2"]``, e.g. from the Prefect UI) are
  ``dvc exp run --temp -S ...``: a DVC experiment in a temporary copy of the workspace, saved as an
  experiment ref; the workspace's params.yaml, dvc.lock and metrics are never touched. The
  experiment's metrics are published from ``dvc exp show``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.states import Completed

from components.evaluation.metrics import METRIC_KEYS
from pipelines.config import load_params
from pipelines.config.overrides import flatten
from pipelines.errors import CommandFailed
from pipelines.paths import METRICS_FILE, PIPELINE_RUN_FILE
from pipelines.tracking.guard import TRACKING_ROOT_ENV

__all__ = ["NO_CHANGE", "STAGES", "changed_stages", "file_overrides", "pipeline", "serve", "sweep_flow"]

CHECK_STAGE = "check"  # validates params.yaml first: bad params stop the run before DVC removes outputs
STAGES = (CHECK_STAGE, "prepare", "synthesize", "train", "evaluate")
IO_STAGES = ("prepare", "synthesize")  # retried: downloads and file systems fail transiently
IO_RETRY_DELAYS_S = [5, 30]
METRIC_COLUMNS = METRIC_KEYS  # the metrics.json keys, in table order
NO_CHANGE = "NoChange"  # the final state name of a run that found nothing to do


@contextlib.contextmanager
def workspace_lock(root: Path) -> Iterator[None]:
    """Exclusive lock: at most one DVC command per workspace at a time."""
    lock_dir = root / ".dvc" / "tmp"
    lock_dir.mkdir(parents=True, exist_ok=True)
    with open(lock_dir / "inpformer-flow.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def dvc_executable() -> str:
    local = Path(sys.executable).parent / "dvc"
    return str(local) if local.exists() else (shutil.which("dvc") or "dvc")


def run_command(cmd: list[str], root: Path, extra_env: dict[str, str] | None = None) -> None:
    """Run a command in ``root``, streaming its output to the Prefect logger; raise on failure."""
    logger = get_run_logger()
    env = dict(os.environ, **(extra_env or {}))
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    logger.info("$ %s", " ".join(cmd))
    with workspace_lock(root):
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip()
            if line:
                logger.info(line)
        code = proc.wait()
    if code != 0:
        msg = f"{' '.join(cmd)} exited with {code}"
        raise CommandFailed(msg)


def _command(cmd: list[str], root: Path) -> str:
    """Run a short command in ``root`` and return its output (raise with it on failure)."""
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        msg = f"{' '.join(cmd)} exited with {proc.returncode}: {proc.stderr[-2000:]}"
        raise CommandFailed(msg)
    return proc.stdout


@task(name="check-changes")
def changed_stages(root: str) -> list[str]:
    """The stages of dvc.yaml that ``dvc status`` reports as changed, in pipeline order."""
    with workspace_lock(Path(root)):
        status = json.loads(_command([dvc_executable(), "status", "--json"], Path(root)) or "{}")
    changed = {name.rsplit(":", 1)[-1] for name in status}
    # `check` reruns on any params.yaml edit (tracking.* too) but changes no output: not a change of its own
    return [stage for stage in STAGES if stage in changed and stage != CHECK_STAGE]


def stage_task(stage: str):
    """The task running one DVC stage, named after it; I/O stages retry, compute stages resume instead."""
    options: dict[str, Any] = {"name": stage, "task_run_name": stage}
    if stage in IO_STAGES:
        options.update(retries=len(IO_RETRY_DELAYS_S), retry_delay_seconds=IO_RETRY_DELAYS_S)
    return _run_stage.with_options(**options)


@task
def _run_stage(stage: str, root: str) -> str:
    run_command([dvc_executable(), "repro", "--single-item", stage], Path(root))
    return stage


@task(name="dvc-experiment", task_run_name="experiment {name}")
def run_experiment(overrides: list[str], name: str, root: str) -> dict[str, Any]:
    """``dvc exp run --temp -n NAME -S ...``; return the experiment's metrics from ``dvc exp show``."""
    load_params(Path(root) / "params.yaml", overrides)  # reject bad overrides before DVC starts
    cmd = [dvc_executable(), "exp", "run", "--temp", "-n", name] + [x for o in overrides for x in ("-S", o)]
    run_command(cmd, Path(root), {TRACKING_ROOT_ENV: root})  # MLflow runs of the temporary copy land here
    with workspace_lock(Path(root)):
        show = json.loads(_command([dvc_executable(), "exp", "show", "--json"], Path(root)))
    for entry in show:
        for exp in entry.get("experiments") or []:
            for rev in exp.get("revs") or []:
                if rev.get("name") == name:
                    files = (rev.get("data") or {}).get("metrics") or {}
                    return (files.get(str(METRICS_FILE)) or {}).get("data") or {}
    msg = f"experiment {name} finished but `dvc exp show` does not list it."
    raise CommandFailed(msg)


def _mlflow_link(run_id: str) -> str:
    ui = os.environ.get("MLFLOW_UI_URL", "http://127.0.0.1:5000")
    return f"{ui}/#/runs/{run_id}" if run_id else "(tracking disabled)"


@task(name="publish-metrics")
def publish_metrics(metrics: dict[str, Any], title: str, run_id: str = "") -> dict[str, Any]:
    """Table artifact of the metrics (percent) with a link to the MLflow run."""
    rows = []
    for cat, vals in [*metrics["categories"].items(), ("mean", metrics["mean"])]:
        rows.append({"category": cat, **{k: round(100 * float(vals[k]), 2) for k in METRIC_COLUMNS if k in vals}})
    link = _mlflow_link(run_id)
    create_table_artifact(key="inpformer-metrics", table=rows, description=f"{title}. Metrics (%); MLflow run: {link}")
    create_markdown_artifact(key="inpformer-mlflow-run", markdown=f"{title}: [MLflow run {run_id}]({link})")
    return {"rows": rows, "mlflow_run": link}


def _workspace_metrics(root: Path) -> tuple[dict[str, Any], str]:
    """The workspace's metrics and the MLflow parent run of the execution that wrote them."""
    metrics = json.loads((root / METRICS_FILE).read_text())
    record = root / PIPELINE_RUN_FILE
    run_id = json.loads(record.read_text()).get("run_id", "") if record.is_file() else ""
    return metrics, run_id


def file_overrides(root: Path, params_path: str) -> list[str]:
    """``KEY=VALUE`` overrides that turn the workspace's params.yaml into ``params_path`` (none when
    they are the same file): DVC stages read params.yaml, so another file runs as an experiment."""
    path = (root / params_path).resolve()
    base_path = (root / "params.yaml").resolve()
    if path == base_path:
        return []
    ours = flatten(load_params(path).model_dump(mode="json"))
    base = flatten(load_params(base_path).model_dump(mode="json"))
    dropped = sorted(set(base) - set(ours))
    if dropped:
        msg = f"{path}: keys {dropped} of params.yaml have no value there (a DVC experiment cannot unset them)."
        raise CommandFailed(msg)
    return [f"{k}={json.dumps(v)}" for k, v in ours.items() if base.get(k) != v]


@flow(name="inpformer-pipeline", log_prints=True)
def pipeline(
    overrides: list[str] | None = None,
    experiment_name: str | None = None,
    root: str = ".",
    params_path: str = "params.yaml",
) -> Any:
    """Rerun what changed (or nothing), or run ``overrides`` as a DVC experiment; publish the metrics.

    Args:
        overrides: ``KEY=VALUE`` params overrides (as ``dvc exp run -S``); the run becomes the DVC
            experiment ``experiment_name`` (default: a name from the overrides) and the workspace
            is left as it is.
        experiment_name: name of the DVC experiment (with overrides).
        root: the project workspace.
        params_path: a params file other than the workspace's params.yaml runs as an experiment of
            its differences (plus ``overrides``).
    """
    root = str(Path(root).resolve())
    overrides = [*file_overrides(Path(root), params_path), *(overrides or [])]
    if overrides:
        name = experiment_name or "prefect-" + "-".join(o.replace("=", "_").replace(".", "_") for o in overrides)[:60]
        metrics = run_experiment(list(overrides), name, root)
        run_id = experiment_run_id(Path(root), name)
        return publish_metrics(metrics, f"DVC experiment {name} ({', '.join(overrides)})", run_id)
    changed = changed_stages(root)
    if not changed:
        note = "No stage changed since the last run (no new or changed source images, code or params): nothing ran."
        create_markdown_artifact(key="inpformer-no-change", markdown=note)
        return Completed(name=NO_CHANGE, message=note)
    print(f"Changed: {', '.join(changed)}; rerunning from there.")
    before = _metrics_bytes(Path(root))
    for stage in STAGES:
        stage_task(stage)(stage, root)  # DVC skips the unchanged ones
    metrics, run_id = _workspace_metrics(Path(root))
    if _metrics_bytes(Path(root)) == before and "evaluate" not in changed:
        note = (
            f"{', '.join(changed)} reran, but their outputs did not change, so nothing downstream reran and the "
            "metrics are the previous run's (e.g. new images in sources/ that data.source does not point at)."
        )
        create_markdown_artifact(key="inpformer-no-change", markdown=note)
        return Completed(name=NO_CHANGE, message=note)
    return publish_metrics(metrics, f"Pipeline rerun ({', '.join(changed)} changed)", run_id)


def _metrics_bytes(root: Path) -> bytes:
    path = root / METRICS_FILE
    return path.read_bytes() if path.is_file() else b""


def experiment_run_id(root: Path, name: str) -> str:
    """The MLflow parent run of DVC experiment ``name`` ('' when tracking is off or none is found)."""
    p = load_params(root / "params.yaml")
    if not p.tracking.enabled:
        return ""
    from mlflow import MlflowClient

    from pipelines.tracking.runs import PIPELINE_STAGE, open_tracking

    cwd = os.getcwd()
    try:
        os.chdir(root)
        open_tracking(p)
        client = MlflowClient()
        exp = client.get_experiment_by_name(p.tracking.experiment)
        if exp is None:
            return ""
        safe = name.replace("'", "\\'")
        query = f"tags.dvc_exp_name = '{safe}' and tags.stage = '{PIPELINE_STAGE}'"
        runs = client.search_runs([exp.experiment_id], query, order_by=["attributes.start_time DESC"], max_results=1)
        return runs[0].info.run_id if runs else ""
    finally:
        os.chdir(cwd)


def serve(cron: str = "0 2 * * *", name: str = "nightly", params_path: str = "params.yaml") -> None:
    """Serve the pipeline with a cron schedule (visible in the Prefect UI; reruns with parameters)."""
    parameters = {"overrides": [], "root": os.getcwd(), "params_path": str(Path(params_path).resolve())}
    pipeline.serve(name=name, cron=cron, parameters=parameters, limit=1)


@flow(name="inpformer-sweep", log_prints=True)
def sweep_flow(
    n_trials: int = 8,
    workers: int = 2,
    overrides: list[str] | None = None,
    root: str = ".",
    params_path: str = "params.yaml",
) -> dict[str, Any]:
    """N parallel workers on one Optuna study (shared storage), then the best params and plots:
    :func:`pipelines.sweep.study.run_sweep`, with its input checks and lost-trial recovery."""
    from pipelines.sweep.study import run_sweep  # optuna: only for sweeps

    overrides = list(overrides or [])
    cwd = os.getcwd()
    os.chdir(Path(root).resolve())
    try:
        p = load_params(params_path, overrides)
        return run_sweep(p, params_path, overrides, n_trials, workers=workers)
    finally:
        os.chdir(cwd)
