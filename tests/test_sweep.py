"""Optuna sweeps: pruning stops a trial early, two workers share one study exactly, best params validate (slow)."""

from __future__ import annotations

import json
import shutil
import wsgiref.util
from pathlib import Path

import optuna
import pytest
import yaml
from conftest import TINY_PIPELINE

from pipelines.config import load_params

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
TINY = [*TINY_PIPELINE, "data.synthetic.n_train=10", "tracking.enabled=false"]


@pytest.fixture
def project(tmp_path, monkeypatch):
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from pipelines import stages

    p = load_params("params.yaml", TINY)
    stages.prepare(p)
    stages.synthesize(p, progress=False)
    return tmp_path


def test_pruned_trial_stops_early(project) -> None:
    from pipelines.sweep.study import run_sweep

    over = [*TINY, "train.epochs=4", "sweep.n_trials=1"]
    p = load_params("params.yaml", over)
    run_sweep(p, "params.yaml", over, n_trials=1, pruner=optuna.pruners.ThresholdPruner(lower=2.0))
    study = optuna.load_study(study_name=p.sweep.study, storage=p.sweep.storage)
    (trial,) = study.trials
    assert trial.state == optuna.trial.TrialState.PRUNED
    assert trial.user_attrs["pruned_at_epoch"] == 1  # stopped after the first of 4 epochs
    assert list(trial.intermediate_values) == [1]


def test_two_workers_share_one_study_exactly(project) -> None:
    from pipelines.sweep.study import run_sweep

    over = [*TINY, "train.epochs=1", "sweep.pruner=none"]
    p = load_params("params.yaml", over)
    summary = run_sweep(p, "params.yaml", over, n_trials=3, workers=2)
    study = optuna.load_study(study_name=p.sweep.study, storage=p.sweep.storage)
    numbers = [t.number for t in study.trials]
    assert len(numbers) == 3 and sorted(numbers) == [0, 1, 2]
    assert all(t.state.is_finished() for t in study.trials)
    assert study.metric_names == ["mad"]  # the dashboard's label, not "Objective 0"
    assert summary["trials"] == 3
    best = yaml.safe_load((project / "artifacts" / "sweep" / "best_params.yaml").read_text())
    assert set(best) == {"model.num_prototypes", "loss.gamma", "loss.lam"}  # the searched keys only
    assert best == study.best_trial.params  # not train.epochs=1 etc.: applying trains at full length
    command = (project / "artifacts" / "sweep" / "best_command.txt").read_text()
    assert command.startswith("dvc exp run --temp -n inpformer-sweep-best -S loss.gamma=") and "epochs" not in command
    assert (project / "artifacts" / "sweep" / "optimization_history.png").is_file()
    load_params("params.yaml", [f"{k}={v}" for k, v in best.items()])  # the applied params validate


def test_progress_line_per_trial_and_dashboard_reads_the_study(project, capsys) -> None:
    from optuna_dashboard import wsgi

    from pipelines.sweep.study import run_sweep

    over = [*TINY, "train.epochs=1", "sweep.pruner=none"]
    p = load_params("params.yaml", over)
    run_sweep(p, "params.yaml", over, n_trials=2)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[trial ")]
    assert len(lines) == 2 and "mad=" in lines[0] and "1/2 here" in lines[0] and "best " in lines[1]
    app = wsgi(p.sweep.storage)  # what `optuna-dashboard <storage>` serves, without a server
    environ: dict = {"REQUEST_METHOD": "GET", "PATH_INFO": "/api/studies", "QUERY_STRING": ""}
    wsgiref.util.setup_testing_defaults(environ)
    status = []
    body = b"".join(app(environ, lambda s, h, exc_info=None: status.append(s)))
    assert status[0].startswith("200")
    studies = json.loads(body)["study_summaries"]
    assert [s["study_name"] for s in studies] == [p.sweep.study] and studies[0]["directions"] == ["maximize"]


def test_validation_split_is_not_the_test_set(project) -> None:
    from pipelines.stages.records import load_records
    from pipelines.sweep.objective import cached_validation_split

    p = load_params("params.yaml", TINY)
    train_recs, val = cached_validation_split(p)
    test_paths = {r.path for r in load_records(p) if r.split == "test"}
    assert not ({r.path for r in val} & test_paths)
    assert not ({r.path for r in val if r.label == 0} & {r.path for r in train_recs})
    assert {r.label for r in val} == {0, 1}


def test_two_workers_on_a_real_postgresql_server(project) -> None:
    """2 workers × 3 trials on PostgreSQL: exactly 6 finished trials with unique numbers, and
    optuna-dashboard reads the study from the same URL."""
    from optuna_dashboard import wsgi
    from postgres_server import postgres_server

    from pipelines.sweep.study import WORKER_ATTR, run_sweep

    with postgres_server() as url:
        over = [*TINY, "train.epochs=1", "sweep.pruner=none", f"sweep.storage={url}"]
        p = load_params("params.yaml", over)
        run_sweep(p, "params.yaml", over, n_trials=6, workers=2)
        study = optuna.load_study(study_name=p.sweep.study, storage=url)
        numbers = sorted(t.number for t in study.trials)
        assert numbers == [0, 1, 2, 3, 4, 5] and all(t.state.is_finished() for t in study.trials)
        workers = {t.user_attrs[WORKER_ATTR].rsplit("/", 1)[-1] for t in study.trials}
        assert workers == {"0", "1"}, workers  # both workers ran trials
        app = wsgi(url)
        environ: dict = {"REQUEST_METHOD": "GET", "PATH_INFO": "/api/studies", "QUERY_STRING": ""}
        wsgiref.util.setup_testing_defaults(environ)
        status: list[str] = []
        body = b"".join(app(environ, lambda s, h, exc_info=None: status.append(s)))
        summaries = json.loads(body)["study_summaries"]
        assert status[0].startswith("200") and [s["study_name"] for s in summaries] == [p.sweep.study]


def test_prefect_work_pool_runs_the_trials(project, monkeypatch) -> None:
    """`inpformer sweep --prefect-pool`: a process work pool with one local worker runs 2 trials; they
    land in the same study and under the sweep's MLflow parent run."""
    import os
    import subprocess
    import sys

    import mlflow
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    from pipelines.cli import main

    over = [x for x in TINY if x != "tracking.enabled=false"] + ["train.epochs=1", "sweep.pruner=none"]
    with prefect_test_harness(server_startup_timeout=None):  # None: the 120 s setting in conftest, not 30 s
        env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PREFECT_WORKER_QUERY_SECONDS": "1"}
        prefect = str(Path(sys.executable).with_name("prefect"))
        subprocess.run([prefect, "work-pool", "create", "cpu-pool", "--type", "process"], env=env, check=True,
                       capture_output=True)  # fmt: skip
        worker = subprocess.Popen([prefect, "worker", "start", "--pool", "cpu-pool"], env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        try:
            sets = [x for o in over for x in ("--set", o)]
            assert main(["sweep", "--n-trials", "2", "--workers", "2", "--prefect-pool", "cpu-pool", *sets]) == 0
        finally:
            worker.terminate()
            try:
                worker.wait(timeout=60)
            except subprocess.TimeoutExpired:  # a graceful stop can outlast 60 s on 2 loaded cores
                worker.kill()
                worker.wait(timeout=60)
    p = load_params("params.yaml", over)
    study = optuna.load_study(study_name=p.sweep.study, storage=p.sweep.storage)
    assert sorted(t.number for t in study.trials) == [0, 1] and all(t.state.name == "COMPLETE" for t in study.trials)
    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlruns' / 'mlflow.db'}")  # absolute: MLflow caches stores by URI
    runs = mlflow.search_runs(experiment_names=[p.tracking.experiment])
    parent = runs[runs["tags.stage"] == "sweep"]
    trials = runs[runs["tags.stage"] == "sweep-trial"]
    assert len(parent) == 1 and len(trials) == 2
    assert set(trials["tags.mlflow.parentRunId"]) == {parent["run_id"].iloc[0]}
