"""Optuna sweeps over any params keys (default M, γ, λ) with pruning, shared storage and MLflow.

* Study in ``sweep.storage`` (default ``sqlite:///artifacts/sweep/optuna.db``; a PostgreSQL URL
  works unchanged), seeded TPE, heartbeats so a crashed worker's trial is marked failed.
* Objective on a validation split (held-out training normals + drawn or real anomalies), never the
  test set unless ``sweep.objective_split: test`` (the paper's protocol, with a warning).
* Pruning from per-epoch reports (median) or per-category results (Wilcoxon).
* MLflow: a parent run per sweep and one nested run per trial (our own callback; Optuna's MLflow
  callback is deprecated), also across worker processes.
* The encoder-feature cache makes every epoch of every trial skip the frozen encoder.
* Results: ``artifacts/sweep/best_params.yaml`` (valid params), the ``dvc exp run -S`` command,
  and PNGs of the optimisation history, parallel coordinates and parameter importances.
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import yaml

from components.data.datasets import ImageDataset, Record
from components.engine import predict, seed_everything
from components.engine import train as engine_train
from components.metrics import evaluate_arrays
from pipelines.builders import build_loss, build_model, build_synthesizer, build_train_config, build_transform, map_kind
from pipelines.config import Params, load_params

logger = logging.getLogger(__name__)

__all__ = ["build_objective", "run_sweep", "sample_overrides"]

SWEEP_DIR = Path("artifacts") / "sweep"


def sample_overrides(trial: optuna.Trial, space: dict[str, dict[str, Any]]) -> list[str]:
    """Draw one value per search-space entry; return ``KEY=VALUE`` overrides."""
    out = []
    for key, spec in space.items():
        kind = spec.get("type", "float")
        if kind == "int":
            v: Any = trial.suggest_int(key, int(spec["low"]), int(spec["high"]), log=bool(spec.get("log", False)))
        elif kind == "float":
            v = trial.suggest_float(key, float(spec["low"]), float(spec["high"]), log=bool(spec.get("log", False)))
        elif kind == "categorical":
            v = trial.suggest_categorical(key, list(spec["choices"]))
        else:
            msg = f"sweep.space.{key}: type must be int, float or categorical, got {kind!r}"
            raise ValueError(msg)
        out.append(f"{key}={json.dumps(v) if isinstance(v, str) else v}")
    return out


def _split(p: Params) -> tuple[list[Record], list[Record]]:
    from components.data.validation import make_validation_split
    from pipelines.stages import _records, _test_records

    records = _records(p)
    if p.sweep.objective_split == "test":
        warnings.warn("sweep.objective_split=test: tuning on the test set (the paper's protocol).", stacklevel=2)
        return [r for r in records if r.split == "train"], _test_records(p, records)
    reals: list[Record] = []
    if p.setting.kind == "semi_supervised":
        from components.data.semi import select_anomalies

        reals = select_anomalies(records, p.setting.semi_supervised_n, seed=p.seed)
    return make_validation_split(records, p.sweep.validation_fraction, SWEEP_DIR / "validation", p.sweep.seed, reals)


def _evaluate(model: Any, val: list[Record], p: Params, device: str) -> dict[str, float]:
    """Per-category metric of ``p.sweep.metric`` on the validation records."""
    tf = build_transform(p)
    e = p.eval
    kind = map_kind(p, model.seg_head is not None)
    out = {}
    for cat in dict.fromkeys(r.category for r in val):
        recs = [r for r in val if r.category == cat]
        res = predict(model, ImageDataset(recs, tf), kind, e.batch_size, device, e.resize, e.blur_kernel,
                      e.blur_sigma, e.top_ratio, e.fused_l2_norm, progress=False)  # fmt: skip
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m = evaluate_arrays(res.scores, res.labels, res.maps, res.masks, "exact", e.fpr_limit)
        out[cat] = float(m.get(p.sweep.metric, math.nan))
    return out


def build_objective(
    base: Params, params_path: str | None, overrides: list[str], train_recs, val, progress: bool = False
):
    """The Optuna objective: train on ``train_recs`` with sampled params, score on ``val``."""
    from components.data.cache import ImageCache
    from pipelines.stages import DATA, _bank, cached_dataset

    def objective(trial: optuna.Trial) -> float:
        trial_overrides = sample_overrides(trial, base.sweep.space)
        p = load_params(params_path, [*overrides, *trial_overrides])
        trial.set_user_attr("overrides", trial_overrides)
        seed_everything(p.seed, p.train.deterministic)
        model = build_model(p)
        cfg = build_train_config(p, progress)
        npm, dice = build_loss(p)
        tf = build_transform(p)
        synth = build_synthesizer(p) if cfg.residual_mode != "off" else None
        bank = _bank(p, train_recs) if synth is not None else None
        ds: Any = ImageDataset(train_recs, tf, synth, seed=p.synthesis.seed,
                               cache=ImageCache(DATA / "cache") if p.data.cache else None, bank=bank)  # fmt: skip
        if p.train.feature_cache:
            ds = cached_dataset(model, ds, tf, cfg.device, progress)
        wilcoxon = p.sweep.pruner == "wilcoxon"

        def on_epoch(m: dict[str, Any]) -> None:
            if wilcoxon or p.sweep.pruner == "none":
                return
            score = float(np.nanmean(list(_evaluate(model, val, p, cfg.device).values())))
            step = int(m["epoch"])
            trial.report(score, step)
            if trial.should_prune():
                trial.set_user_attr("pruned_at_epoch", step)
                raise optuna.TrialPruned(f"pruned after epoch {step}")

        engine_train(model, ds, cfg, npm, dice, None, on_epoch=on_epoch)
        per_cat = _evaluate(model, val, p, cfg.device)
        if wilcoxon:
            for i, v in enumerate(per_cat.values()):
                trial.report(v, i)
                if trial.should_prune():
                    raise optuna.TrialPruned(f"Wilcoxon-pruned after {i + 1} categories")
        trial.set_user_attr("per_category", per_cat)
        value = float(np.nanmean(list(per_cat.values())))
        if not math.isfinite(value):
            raise optuna.TrialPruned("objective is NaN (no anomalies in the validation split?)")
        return value

    return objective


class MlflowTrialCallback:
    """One nested MLflow run per finished trial under ``parent_run_id`` (works across processes)."""

    def __init__(self, p: Params, parent_run_id: str) -> None:
        self.p = p
        self.parent = parent_run_id

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if not self.p.tracking.enabled or not self.parent:
            return
        import mlflow
        from mlflow import MlflowClient
        from mlflow.entities import Metric, Param

        mlflow.set_tracking_uri(self.p.tracking.uri)
        client = MlflowClient()
        exp = client.get_run(self.parent).info.experiment_id
        run = client.create_run(exp, run_name=f"trial-{trial.number}", tags={
            "mlflow.parentRunId": self.parent, "optuna.study": study.study_name, "optuna.trial": str(trial.number),
            "state": trial.state.name, "stage": "sweep-trial"})  # fmt: skip
        now = int(1000 * (trial.datetime_complete or trial.datetime_start).timestamp()) if trial.datetime_start else 0
        metrics = [Metric("intermediate", float(v), now, int(s)) for s, v in sorted(trial.intermediate_values.items())]
        if trial.value is not None:
            metrics.append(Metric(self.p.sweep.metric, float(trial.value), now, 0))
        for cat, v in (trial.user_attrs.get("per_category") or {}).items():
            if math.isfinite(v):
                safe = "".join(ch if ch.isalnum() or ch in "_-./ " else "_" for ch in cat)
                metrics.append(Metric(f"{safe}/{self.p.sweep.metric}", float(v), now, 0))
        client.log_batch(run.info.run_id, metrics=metrics, params=[Param(k, str(v)) for k, v in trial.params.items()])
        client.set_terminated(run.info.run_id, "FINISHED" if trial.state.name == "COMPLETE" else "KILLED")


def _storage(url: str, heartbeat_s: int = 10, grace_s: int = 30) -> optuna.storages.BaseStorage:
    if url.startswith("sqlite:///"):
        Path(url[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
    if url.startswith(("sqlite", "postgresql", "mysql")):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(url, heartbeat_interval=heartbeat_s, grace_period=grace_s)
    return url  # type: ignore[return-value]


def _pruner(name: str) -> optuna.pruners.BasePruner:
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1)
    if name == "wilcoxon":
        return optuna.pruners.WilcoxonPruner(p_threshold=0.1)
    return optuna.pruners.NopPruner()


def open_study(p: Params, pruner: optuna.pruners.BasePruner | None = None) -> optuna.Study:
    """Create or load the study (seeded TPE)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.create_study(
        study_name=p.sweep.study,
        storage=_storage(p.sweep.storage, p.sweep.heartbeat_s, p.sweep.grace_s),
        load_if_exists=True,
        direction=p.sweep.direction,
        sampler=optuna.samplers.TPESampler(seed=p.sweep.seed + int(os.environ.get("INPFORMER_SWEEP_WORKER", "0"))),
        pruner=pruner or _pruner(p.sweep.pruner),
    )


def run_worker(p: Params, params_path: str | None, overrides: list[str], n_trials: int, timeout: float | None,
               parent_run_id: str, progress: bool = False, pruner: optuna.pruners.BasePruner | None = None) -> None:  # fmt: skip
    """Run ``n_trials`` trials of the shared study in this process."""
    study = open_study(p, pruner)
    train_recs, val = _split_cached(p)
    objective = build_objective(p, params_path, overrides, train_recs, val, progress)
    study.optimize(objective, n_trials=n_trials, timeout=timeout, callbacks=[MlflowTrialCallback(p, parent_run_id)],
                   catch=(RuntimeError, ValueError, FloatingPointError))  # fmt: skip


def _split_cached(p: Params) -> tuple[list[Record], list[Record]]:
    """The validation split, built once per sweep (a JSON index shared by the workers)."""
    index = SWEEP_DIR / "validation.json"
    if index.is_file():
        data = json.loads(index.read_text())
        return [Record(**r) for r in data["train"]], [Record(**r) for r in data["val"]]
    from dataclasses import asdict

    from components.checkpoint import atomic_write_text

    train_recs, val = _split(p)
    atomic_write_text(index, json.dumps({"train": [asdict(r) for r in train_recs], "val": [asdict(r) for r in val]}))
    return train_recs, val


def run_sweep(p: Params, params_path: str | None, overrides: list[str], n_trials: int | None = None,
              timeout: float | None = None, workers: int = 1, progress: bool = False,
              pruner: optuna.pruners.BasePruner | None = None) -> dict[str, Any]:  # fmt: skip
    """Run the study with ``workers`` processes, then write best params, command and plots."""
    from pipelines.tracking import tracked_run

    n_trials = n_trials or p.sweep.n_trials
    timeout = timeout if timeout is not None else p.sweep.timeout_s
    parent = os.environ.get("INPFORMER_SWEEP_PARENT_RUN")
    if parent is not None:  # a worker process started by the coordinator below
        run_worker(p, params_path, overrides, n_trials, timeout, parent, progress, pruner)
        return {}
    SWEEP_DIR.mkdir(parents=True, exist_ok=True)
    _ensure_inputs(p)
    (SWEEP_DIR / "validation.json").unlink(missing_ok=True)
    open_study(p, pruner)  # create tables and the study once, before any worker starts
    _split_cached(p)
    with tracked_run(p, "sweep", f"sweep-{p.sweep.study}", {"study": p.sweep.study}) as mlflow:
        active = getattr(mlflow, "active_run", lambda: None)()
        parent_id = active.info.run_id if active is not None else ""
        shares = [n_trials // workers + (1 if i < n_trials % workers else 0) for i in range(max(workers, 1))]
        procs = []
        for worker, share in enumerate(shares[1:], start=1):
            if share == 0:
                continue
            cmd = [sys.executable, "-m", "pipelines.cli", "sweep", "--no-progress", "--n-trials", str(share)]
            if params_path:
                cmd += ["--params", params_path]
            for o in overrides:
                cmd += ["--set", o]
            env = dict(os.environ, INPFORMER_SWEEP_PARENT_RUN=parent_id, INPFORMER_SWEEP_WORKER=str(worker),
                       OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // workers)))  # fmt: skip
            procs.append(subprocess.Popen(cmd, env=env))
        if workers > 1:
            import torch

            torch.set_num_threads(max(1, (os.cpu_count() or 2) // workers))
        run_worker(p, params_path, overrides, shares[0], timeout, parent_id, progress, pruner)
        codes = [proc.wait() for proc in procs]
        if any(codes):
            logger.warning(
                "sweep workers exited with %s; their unfinished trials are marked failed by heartbeat", codes
            )
        summary = _results(p, params_path, overrides)
        if p.tracking.enabled and summary.get("best_value") is not None:
            mlflow.log_metric(f"best_{p.sweep.metric}", summary["best_value"])
            mlflow.log_params({f"best.{k}": v for k, v in summary["best_params"].items()})
            mlflow.log_artifacts(str(SWEEP_DIR), artifact_path="sweep")
    return summary


def _ensure_inputs(p: Params) -> None:
    """Prepare the dataset(s) and the pseudo-anomaly bank when a fresh clone has none yet."""
    from pipelines import stages

    for name in [p.data.name, *p.data.extra_sources]:
        if not stages._manifest_path(name).is_file():
            if name != p.data.name:
                msg = f"data.extra_sources: {name} is not prepared; run `inpformer prepare --name {name} ...` first."
                raise FileNotFoundError(msg)
            print(f"No prepared data for '{name}': running prepare first.")
            stages.prepare(p)
    bank = stages.DATA / "synth" / p.data.name / "index.csv"
    if p.synthesis.enabled and p.synthesis.bank_copies > 0 and not bank.is_file():
        print("No pseudo-anomaly bank yet: running synthesize first.")
        stages.synthesize(p, progress=False)


def _results(p: Params, params_path: str | None, overrides: list[str]) -> dict[str, Any]:
    from components.checkpoint import atomic_write_text

    study = open_study(p)
    states = [t.state.name for t in study.trials]
    summary: dict[str, Any] = {"trials": len(states), "states": {s: states.count(s) for s in set(states)}}
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        print(f"No complete trial yet ({summary['states']}).")
        return summary
    best = study.best_trial
    best_overrides = list(best.user_attrs.get("overrides", []))
    best_params = load_params(params_path, [*overrides, *best_overrides])
    atomic_write_text(
        SWEEP_DIR / "best_params.yaml", yaml.safe_dump(best_params.model_dump(mode="json"), sort_keys=False)
    )
    command = "dvc exp run " + " ".join(f"-S '{o}'" for o in best_overrides)
    atomic_write_text(SWEEP_DIR / "best_command.txt", command + "\n")
    summary.update(best_value=best.value, best_params=best.params, best_trial=best.number, command=command)
    atomic_write_text(SWEEP_DIR / "summary.json", json.dumps(summary, indent=2, default=str))
    _plots(study)
    print(f"Best {p.sweep.metric} = {best.value:.4f} (trial {best.number}): {best.params}")
    print(f"Trials: {summary['states']}. Apply with:\n  {command}")
    print(f"Dashboard: optuna-dashboard {p.sweep.storage} --host 127.0.0.1 --port 8081")
    return summary


def _plots(study: optuna.Study) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, fn in (("optimization_history", ovm.plot_optimization_history),
                         ("parallel_coordinates", ovm.plot_parallel_coordinate),
                         ("param_importances", ovm.plot_param_importances)):  # fmt: skip
            try:
                ax = fn(study)
                fig = ax.figure if hasattr(ax, "figure") else ax[0].figure
                fig.set_size_inches(8, 5)
                fig.tight_layout()
                fig.savefig(SWEEP_DIR / f"{name}.png", dpi=80)
                plt.close(fig)
            except (ValueError, RuntimeError, ZeroDivisionError) as err:  # e.g. importances need ≥ 2 trials
                logger.info("skipped %s plot: %s", name, err)
