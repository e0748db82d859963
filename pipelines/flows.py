"""Prefect flows: the DVC stages as tasks, scheduled reruns, and a metrics table artifact.

prefect is imported at module top: this module is only imported by the commands that run flows.

One direction of control: Prefect → DVC → plain ``inpformer`` commands. Each task runs
``dvc repro --single-item <stage>`` under a workspace file lock (DVC allows one command per
workspace), streams its output into the Prefect logs and retries the I/O stages. Flow parameters
(``overrides``) are written into params.yaml the way ``dvc exp run -S`` does (comments kept) and
the finished run is saved as a DVC experiment (``dvc exp save``), so a rerun from the UI with other
values is a DVC experiment; params.yaml is restored afterwards.
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

import yaml
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from ruamel.yaml import YAML

from components.metrics import METRIC_KEYS
from pipelines.config import load_params, set_dotted
from pipelines.paths import EVAL_RUN_FILE, METRICS_FILE, SWEEP_DIR
from pipelines.sweep import PARENT_ENV, WORKER_ENV, open_study, worker_shares, write_results
from pipelines.sweep_objective import cached_validation_split
from pipelines.tracking import tracked_run

__all__ = ["STAGES", "pipeline", "serve"]

STAGES = ("prepare", "synthesize", "train", "evaluate")
METRIC_COLUMNS = METRIC_KEYS  # the metrics.json keys, in table order


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


def _dvc() -> str:
    local = Path(sys.executable).parent / "dvc"
    return str(local) if local.exists() else (shutil.which("dvc") or "dvc")


def run_command(cmd: list[str], root: Path) -> None:
    """Run a command in ``root``, streaming its output to the Prefect logger; raise on failure."""
    logger = get_run_logger()
    env = dict(os.environ)
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
        raise RuntimeError(msg)


@task(name="dvc-stage-io", retries=2, retry_delay_seconds=[5, 30])
def io_stage(stage: str, root: str) -> str:
    """An I/O stage (prepare, synthesize): retried on failure."""
    run_command([_dvc(), "repro", "--single-item", stage], Path(root))
    return stage


@task(name="dvc-stage")
def compute_stage(stage: str, root: str) -> str:
    """A compute stage (train, evaluate): resumes from checkpoints if rerun, so no blind retries."""
    run_command([_dvc(), "repro", "--single-item", stage], Path(root))
    return stage


@task(name="apply-params")
def apply_params(overrides: list[str], root: str) -> str:
    """Write ``KEY=VALUE`` overrides into params.yaml (comments kept); return the backup path."""
    path = Path(root) / "params.yaml"
    backup = path.with_name(".params.yaml.flow-backup")
    shutil.copyfile(path, backup)
    load_params(path, overrides)  # validate before touching the file
    ry = YAML()
    ry.preserve_quotes = True
    tree = ry.load(path.read_text())
    for item in overrides:
        key, raw = item.split("=", 1)
        set_dotted(tree, key.strip(), yaml.safe_load(raw))
    with open(path, "w") as fh:
        ry.dump(tree, fh)
    return str(backup)


@task(name="save-experiment")
def save_experiment(name: str | None, root: str) -> None:
    """Record the workspace (params, lock, metrics) as a DVC experiment."""
    cmd = [_dvc(), "exp", "save", "-f"] + (["-n", name] if name else [])
    run_command(cmd, Path(root))


@task(name="publish-metrics")
def publish_metrics(root: str) -> dict:
    """Table artifact of the metrics (percent) with a link to the MLflow run."""
    root_p = Path(root)
    metrics = json.loads((root_p / METRICS_FILE).read_text())
    rows = []
    for cat, vals in [*metrics["categories"].items(), ("mean", metrics["mean"])]:
        rows.append({"category": cat, **{k: round(100 * float(vals[k]), 2) for k in METRIC_COLUMNS if k in vals}})
    run_file = root_p / EVAL_RUN_FILE
    run_id = json.loads(run_file.read_text()).get("run_id", "") if run_file.is_file() else ""
    ui = os.environ.get("MLFLOW_UI_URL", "http://127.0.0.1:5000")
    link = f"{ui}/#/runs/{run_id}" if run_id else "(tracking disabled)"
    create_table_artifact(key="inpformer-metrics", table=rows, description=f"Metrics (%); MLflow run: {link}")
    create_markdown_artifact(key="inpformer-mlflow-run", markdown=f"[MLflow run {run_id}]({link})")
    return {"rows": rows, "mlflow_run": link}


@flow(name="inpformer-pipeline", log_prints=True)
def pipeline(overrides: list[str] | None = None, experiment_name: str | None = None, root: str = ".") -> dict:
    """Run prepare → synthesize → train → evaluate as tasks; publish the metrics table.

    Args:
        overrides: ``KEY=VALUE`` params overrides (as ``dvc exp run -S``); the run is saved as a DVC
            experiment named ``experiment_name``.
        experiment_name: name of the saved DVC experiment (with overrides).
        root: the project workspace.
    """
    root = str(Path(root).resolve())
    backup = apply_params(list(overrides), root) if overrides else None
    try:
        for stage in STAGES:
            (io_stage if stage in ("prepare", "synthesize") else compute_stage)(stage, root)
        if backup:
            save_experiment(experiment_name, root)
        return publish_metrics(root)
    finally:
        if backup:
            shutil.move(backup, Path(root) / "params.yaml")


def serve(cron: str = "0 2 * * *", name: str = "nightly") -> None:
    """Serve the pipeline with a cron schedule (visible in the Prefect UI; reruns with parameters)."""
    pipeline.serve(name=name, cron=cron, parameters={"overrides": [], "root": os.getcwd()}, limit=1)


@task(name="sweep-worker")
def sweep_worker(n_trials: int, worker: int, parent_run_id: str, overrides: list[str], root: str) -> int:
    """One Optuna worker process on the shared study (its trials, its share of the CPUs)."""
    env = dict(os.environ, **{PARENT_ENV: parent_run_id, WORKER_ENV: str(worker)})
    cmd = [sys.executable, "-m", "pipelines.cli", "sweep", "--no-progress", "--n-trials", str(n_trials)]
    for o in overrides:
        cmd += ["--set", o]
    return subprocess.run(cmd, cwd=root, env=env, check=False).returncode


@flow(name="inpformer-sweep", log_prints=True)
def sweep_flow(n_trials: int = 8, workers: int = 2, overrides: list[str] | None = None, root: str = ".") -> dict:
    """N parallel workers on one Optuna study (shared storage), then the best params and plots."""
    root = str(Path(root).resolve())
    overrides = list(overrides or [])
    cwd = os.getcwd()
    os.chdir(root)
    try:
        p = load_params("params.yaml", overrides)
        SWEEP_DIR.mkdir(parents=True, exist_ok=True)
        (SWEEP_DIR / "validation.json").unlink(missing_ok=True)
        open_study(p)
        cached_validation_split(p)
        with tracked_run(
            p, "sweep", f"sweep-{p.sweep.study}", {"study": p.sweep.study, "orchestrator": "prefect"}
        ) as ml:
            active = getattr(ml, "active_run", lambda: None)()
            parent = active.info.run_id if active is not None else ""
            shares = worker_shares(n_trials, workers)
            futures = [sweep_worker.submit(s, i, parent, overrides, root) for i, s in enumerate(shares) if s]
            codes = [f.result() for f in futures]
            summary = write_results(p, "params.yaml", overrides)
        summary["worker_exit_codes"] = codes
        return summary
    finally:
        os.chdir(cwd)
