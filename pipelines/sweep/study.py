"""Optuna sweeps over any params keys (default M, γ, λ) with pruning, shared storage and MLflow.

* Study in ``sweep.storage`` (SQLite by default, PostgreSQL for many machines), seeded TPE,
  heartbeats; workers are local processes or flow runs on a Prefect work pool (``sweep_pool``).
* A killed worker loses nothing: each trial records its sweep and worker; when the workers have
  exited, the coordinator marks their trials still RUNNING as FAIL (with a FAILED MLflow child run)
  and runs the missing share itself, so ``--n-trials N`` ends with N finished trials.
* Objective on a validation split (held-out training normals + drawn or real anomalies), never the
  test set unless ``sweep.objective_split: test`` (the paper's protocol, with a warning). Pruning
  from per-epoch reports (median) or per-category results (Wilcoxon).
* MLflow: a parent run per sweep and one nested run per trial (our own callback), across workers.
  Each trial trains exactly what ``inpformer train`` trains (:mod:`pipelines.stages.training_data`);
  optuna is imported at module top: only the sweep commands import this module.
* Results: ``artifacts/sweep/best_params.yaml`` (the searched keys only, as ``KEY: value``), the
  ``dvc exp run -S`` command that applies them at full training length (``inpformer sweep
  --apply`` runs it: a DVC experiment, logged to MLflow and registered through the champion gate),
  and PNGs of the optimisation history, parallel coordinates and parameter importances; one
  progress line per finished trial."""

from __future__ import annotations

import json
import logging
import os
import uuid
import warnings
from pathlib import Path
from typing import Any

import matplotlib
import optuna
import torch
import yaml
from optuna.visualization import matplotlib as ovm

from components.files import atomic_write_text
from pipelines.builders import apply_cpu_policy
from pipelines.config import Params, load_params
from pipelines.paths import SWEEP_DIR, manifest_path, synth_index
from pipelines.stages import prepare, synthesize
from pipelines.sweep.apply import BEST_PARAMS_FILE, apply_command, beats_noise
from pipelines.sweep.command import WORKER_ENV, start_workers, stop_workers
from pipelines.sweep.objective import SweepRun, build_objective, cached_validation_split
from pipelines.tracking.runs import MlflowTrialCallback, active_run_id, tracked_run

matplotlib.use("Agg")
import matplotlib.pyplot as plt

logger = logging.getLogger(__name__)

__all__ = [
    "BEST_PARAMS_FILE",
    "ProgressCallback",
    "fail_lost_trials",
    "open_study",
    "run_sweep",
    "run_worker",
    "worker_shares",
    "write_results",
]


SWEEP_ID_ENV = "INPFORMER_SWEEP_ID"  # set in worker processes: this sweep's id (tags its trials)
WORKER_ATTR = "worker"  # trial user attribute: "<sweep id>/<worker index>"
ERROR_ATTR = "error"  # trial user attribute: the exception that failed it (absent: its process died)
MAX_ERROR_CHARS = 500
PARENT_ENV = "INPFORMER_SWEEP_PARENT_RUN"  # set in worker processes: the MLflow parent run
CAUGHT_ERRORS = (RuntimeError, ValueError, FloatingPointError)  # a failing trial does not end the study
MEDIAN_STARTUP_TRIALS = 2
MEDIAN_WARMUP_STEPS = 1
WILCOXON_P_THRESHOLD = 0.1
PLOT_SIZE_INCHES = (8, 5)
PLOT_DPI = 80


def _storage(url: str, heartbeat_s: int, grace_s: int) -> optuna.storages.BaseStorage | str:
    if url.startswith("sqlite:///"):
        Path(url[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
    if url.startswith(("sqlite", "postgresql", "mysql")):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(url, heartbeat_interval=heartbeat_s, grace_period=grace_s)
    return url


def _pruner(name: str) -> optuna.pruners.BasePruner:
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=MEDIAN_STARTUP_TRIALS, n_warmup_steps=MEDIAN_WARMUP_STEPS)
    if name == "wilcoxon":
        return optuna.pruners.WilcoxonPruner(p_threshold=WILCOXON_P_THRESHOLD)
    return optuna.pruners.NopPruner()


def open_study(p: Params, pruner: optuna.pruners.BasePruner | None = None) -> optuna.Study:
    """Create or load the study (seeded TPE, offset by the worker index)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        study_name=p.sweep.study,
        storage=_storage(p.sweep.storage, p.sweep.heartbeat_s, p.sweep.grace_s),
        load_if_exists=True,
        direction=p.sweep.direction,
        sampler=optuna.samplers.TPESampler(seed=p.sweep.seed + int(os.environ.get(WORKER_ENV, "0"))),
        pruner=pruner or _pruner(p.sweep.pruner),
    )
    if study.metric_names is None:  # the dashboard's axis: "mad", not "Objective 0"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names([p.sweep.metric])
    return study


def run_worker(run: SweepRun, n_trials: int, timeout: float | None, parent_run_id: str) -> None:
    """Run ``n_trials`` trials of the shared study in this process."""
    apply_cpu_policy(run.params, threads=False)  # the kernels train runs; the thread share is the sweep's
    study = open_study(run.params, run.pruner)
    train_recs, val = cached_validation_split(run.params)
    inner = build_objective(run, train_recs, val)
    worker = os.environ.get(WORKER_ENV, "0")
    token = f"{os.environ.get(SWEEP_ID_ENV, '')}/{worker}"

    def objective(trial: optuna.Trial) -> float:
        trial.set_user_attr(WORKER_ATTR, token)
        try:
            return inner(trial)
        except CAUGHT_ERRORS as err:  # a failure of the trial itself, not of its process
            trial.set_user_attr(ERROR_ATTR, f"{type(err).__name__}: {err}"[:MAX_ERROR_CHARS])
            raise

    callbacks = [MlflowTrialCallback(run.params, parent_run_id), ProgressCallback(n_trials, run.params.sweep.metric)]
    study.optimize(objective, n_trials=n_trials, timeout=timeout, callbacks=callbacks, catch=CAUGHT_ERRORS)


class ProgressCallback:
    """One line per finished trial: state, value, params, duration, best so far."""

    def __init__(self, n_trials: int, metric: str) -> None:
        self.n_trials, self.metric, self.done = n_trials, metric, 0

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        self.done += 1
        value = f"{self.metric}={trial.value:.4f}" if trial.value is not None else trial.state.name.lower()
        took = trial.duration.total_seconds() if trial.duration else float("nan")
        params = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in trial.params.items())
        try:
            best = f"best {study.best_value:.4f} (trial {study.best_trial.number})"
        except ValueError:  # no complete trial yet
            best = "no complete trial yet"
        print(f"[trial {trial.number}, {self.done}/{self.n_trials} here] {value} ({params}) in {took:.1f}s; {best}")


def worker_shares(n_trials: int, workers: int) -> list[int]:
    """``n_trials`` split as evenly as possible over ``workers`` (the first ones get one more)."""
    workers = max(workers, 1)
    return [n_trials // workers + (1 if i < n_trials % workers else 0) for i in range(workers)]


def run_sweep(
    p: Params,
    params_path: str,
    overrides: list[str],
    n_trials: int | None = None,
    timeout: float | None = None,
    workers: int = 1,
    progress: bool = False,
    pruner: optuna.pruners.BasePruner | None = None,
) -> dict[str, Any]:
    """Run the study with ``workers`` processes, then write best params, command and plots."""
    run = SweepRun(p, params_path, list(overrides), progress, pruner)
    n_trials = n_trials or p.sweep.n_trials
    timeout = timeout if timeout is not None else p.sweep.timeout_s
    parent = os.environ.get(PARENT_ENV)
    if parent is not None:  # a worker process started by the coordinator below
        run_worker(run, n_trials, timeout, parent)
        return {}
    SWEEP_DIR.mkdir(parents=True, exist_ok=True)
    _ensure_inputs(p)
    (SWEEP_DIR / "validation.json").unlink(missing_ok=True)
    open_study(p, pruner)  # create tables and the study once, before any worker starts
    cached_validation_split(p)
    with tracked_run(p, "sweep", f"sweep-{p.sweep.study}", {"study": p.sweep.study}) as mlflow:
        parent_id = active_run_id(mlflow)
        shares = worker_shares(n_trials, workers)
        sweep_id = uuid.uuid4().hex[:12]
        os.environ[SWEEP_ID_ENV] = sweep_id  # this process's trials and (inherited) the workers' ones
        if p.sweep.prefect_pool:  # every share as a flow run on the work pool
            from pipelines.sweep.pool import run_on_pool  # prefect: only for --prefect-pool

            ids = {PARENT_ENV: parent_id, SWEEP_ID_ENV: sweep_id}
            jobs = [(share, {**ids, WORKER_ENV: str(w)}) for w, share in enumerate(shares) if share]
            codes = run_on_pool(p.sweep.prefect_pool, os.getcwd(), jobs, run.params_path, run.overrides)
        else:
            try:
                codes = _local_workers(run, shares, timeout, parent_id)
            except BaseException:  # SIGINT/SIGTERM: the workers are stopped; their trials fail now, not later
                fail_lost_trials(p, sweep_id, parent_id)
                raise
        if any(codes):
            logger.warning("sweep workers exited with %s", codes)
        lost = fail_lost_trials(p, sweep_id, parent_id)
        done = sum(t.state.is_finished() and t.number not in lost for t in _trials_of(open_study(p), sweep_id))
        missing = len(lost) if timeout else n_trials - done
        if missing > 0:
            print(f"{len(lost)} trial(s) lost with a worker; running the missing {missing} here.")
            os.environ[WORKER_ENV] = str(len(shares))  # a sampler seed of its own: not worker 0's samples again
            try:
                run_worker(run, missing, timeout, parent_id)
            finally:
                os.environ.pop(WORKER_ENV, None)
        summary = write_results(p, params_path, overrides)
        if p.tracking.enabled and summary.get("best_value") is not None:
            mlflow.log_metric(f"best_{p.sweep.metric}", summary["best_value"])
            mlflow.log_params({f"best.{k}": v for k, v in summary["best_params"].items()})
            mlflow.log_artifacts(str(SWEEP_DIR), artifact_path="sweep")
    return summary


def _local_workers(run: SweepRun, shares: list[int], timeout: float | None, parent_id: str) -> list[int]:
    """Shares 1… as worker processes (:func:`start_workers`), share 0 in this one; the workers' exit codes."""
    threads = str(max(1, (os.cpu_count() or 2) // len(shares)))
    env = {PARENT_ENV: parent_id, "OMP_NUM_THREADS": threads}
    procs = start_workers(run.params_path, run.overrides, shares, env, run.params.sweep.grace_s)
    try:
        if len(shares) > 1:
            torch.set_num_threads(int(threads))
        run_worker(run, shares[0], timeout, parent_id)
        return [proc.wait() for proc in procs]
    except BaseException:
        stop_workers(procs, run.params.sweep.grace_s)
        raise


def _trials_of(study: optuna.Study, sweep_id: str) -> list[optuna.trial.FrozenTrial]:
    return [t for t in study.trials if str(t.user_attrs.get(WORKER_ATTR, "")).startswith(f"{sweep_id}/")]


def fail_lost_trials(p: Params, sweep_id: str, parent_run_id: str) -> set[int]:
    """The trials of sweep ``sweep_id`` lost with their worker process, once the workers have exited:
    still RUNNING (marked FAIL here) or already failed by Optuna's heartbeat (FAIL without an error of
    their own). Each is logged as a FAILED MLflow child run; returns their numbers."""
    study = open_study(p)
    running, fail = optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.FAIL
    lost = [
        t
        for t in _trials_of(study, sweep_id)
        if t.state == running or (t.state == fail and ERROR_ATTR not in t.user_attrs)
    ]
    if not lost:
        return set()
    storage = optuna.storages.get_storage(p.sweep.storage)
    study_id = storage.get_study_id_from_name(p.sweep.study)
    for t in (t for t in lost if t.state == running):
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, t.number)
        storage.set_trial_user_attr(trial_id, ERROR_ATTR, "its worker process exited mid-trial")
        storage.set_trial_state_values(trial_id, fail)
    numbers = {t.number for t in lost}
    callback = MlflowTrialCallback(p, parent_run_id)
    for t in open_study(p).trials:
        if t.number in numbers:
            callback(study, t)
    logger.warning("trials %s were lost with a worker process that exited: FAIL", sorted(numbers))
    return numbers


def _ensure_inputs(p: Params) -> None:
    """Prepare the dataset(s) and the pseudo-anomaly bank when a fresh clone has none yet."""
    for name in [p.data.name, *p.data.extra_sources]:
        if not manifest_path(name).is_file():
            if name != p.data.name:
                msg = f"data.extra_sources: {name} is not prepared; run `inpformer prepare --name {name} ...` first."
                raise FileNotFoundError(msg)
            print(f"No prepared data for '{name}': running prepare first.")
            prepare(p)
    if p.synthesis.enabled and p.synthesis.bank_copies > 0 and not synth_index(p.data.name).is_file():
        print("No pseudo-anomaly bank yet: running synthesize first.")
        synthesize(p, progress=False)


def write_results(p: Params, params_path: str, overrides: list[str]) -> dict[str, Any]:
    """``best_params.yaml``, ``best_command.txt``, ``summary.json`` and the plots; return the summary."""
    study = open_study(p)
    states = [t.state.name for t in study.trials]
    summary: dict[str, Any] = {"trials": len(states), "states": {s: states.count(s) for s in set(states)}}
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        print(f"No complete trial yet ({summary['states']}).")
        return summary
    best = study.best_trial
    best_overrides = list(best.user_attrs.get("overrides", []))
    load_params(params_path, [*overrides, *best_overrides])  # the applied experiment must validate
    header = (
        f"# Best of study '{p.sweep.study}': {p.sweep.metric} = {best.value:.6g} (trial {best.number}, "
        f"{p.sweep.objective_split} split).\n# The searched keys only; apply at full training length with:\n"
        "#   inpformer sweep --apply\n"
    )
    atomic_write_text(BEST_PARAMS_FILE, header + yaml.safe_dump(dict(best.params), sort_keys=True))
    command = apply_command(best.params, f"{p.sweep.study}-best")
    atomic_write_text(SWEEP_DIR / "best_command.txt", " ".join(command) + "\n")
    summary.update(best_value=best.value, best_params=best.params, best_trial=best.number, command=" ".join(command))
    summary["beats_noise"] = beats_noise(p, [t.value for t in complete], best.value)
    atomic_write_text(SWEEP_DIR / "summary.json", json.dumps(summary, indent=2, default=str))
    _plots(study)
    print(f"Best {p.sweep.metric} = {best.value:.4f} (trial {best.number}): {best.params}")
    print(
        f"Trials: {summary['states']}. Apply at full length with `inpformer sweep --apply`, i.e.:\n"
        f"  {' '.join(command)}"
    )
    print(f"Dashboard: optuna-dashboard {p.sweep.storage} --host 127.0.0.1 --port 8081")
    return summary


def _plots(study: optuna.Study) -> None:
    plots = (
        ("optimization_history", ovm.plot_optimization_history),
        ("parallel_coordinates", ovm.plot_parallel_coordinate),
        ("param_importances", ovm.plot_param_importances),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, fn in plots:
            try:
                ax = fn(study)
                fig = ax.figure if hasattr(ax, "figure") else ax[0].figure
                fig.set_size_inches(*PLOT_SIZE_INCHES)
                fig.tight_layout()
                fig.savefig(SWEEP_DIR / f"{name}.png", dpi=PLOT_DPI)
                plt.close(fig)
            except (ValueError, RuntimeError, ZeroDivisionError) as err:  # e.g. importances need ≥ 2 trials
                logger.info("skipped %s plot: %s", name, err)
