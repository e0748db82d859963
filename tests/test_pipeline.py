"""Pipeline end to end: DVC, the MLflow registry and pyfunc, the Prefect flow (slow)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

TINY_SYNTHETIC = {"size": 64, "n_train": 8, "n_test_good": 3, "n_test_per_defect": 1, "categories": ["brick", "washer"]}
TINY_OVERRIDES = {
    "data": {"image_size": 64, "crop_size": 56, "synthetic": TINY_SYNTHETIC},
    "synthesis": {"bank_copies": 1},
    "model": {"encoder_overrides": {"embed_dim": 32, "num_heads": 2}, "seg_head_channels": 8, "num_prototypes": 3},
    "train": {"epochs": 1, "batch_size": 4, "warmup_iters": 2},
    "eval": {"grid_images": 2, "resize": 64},
}


def _merge(base: dict, extra: dict) -> dict:
    for k, v in extra.items():
        base[k] = _merge(base.get(k, {}), v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return base


def _env(tmp: Path) -> dict:
    env = dict(os.environ)
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        DVC_NO_ANALYTICS="1",
        MLFLOW_DISABLE_TELEMETRY="true",
        HF_HUB_OFFLINE="1",
        DVC_SITE_CACHE_DIR=str(tmp / ".dvc-site"),
        XDG_CONFIG_HOME=str(tmp / ".xdg"),
        XDG_CACHE_HOME=str(tmp / ".xdg-cache"),
        PREFECT_HOME=str(tmp / ".prefect"),
        GIT_AUTHOR_NAME="t",
        GIT_AUTHOR_EMAIL="t@t",
        GIT_COMMITTER_NAME="t",
        GIT_COMMITTER_EMAIL="t@t",
    )
    return env


def _cli(args: list[str], cwd: Path, env: dict, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [str(BIN / "inpformer"), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"inpformer {args} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


# -- DVC end to end --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dvc_project(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    proj = tmp / "proj"
    proj.mkdir()
    for item in ("components", "pipelines", "dvc.yaml", "sweep"):
        src = ROOT / item
        if src.is_dir():
            shutil.copytree(src, proj / item, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, proj / item)
    params = _merge(yaml.safe_load((ROOT / "params.yaml").read_text()), TINY_OVERRIDES)
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (proj / ".gitignore").write_text("/data/\n/artifacts/\n/mlruns/\n/.prefect/\n/.cache/\n")
    env = _env(tmp)
    for cmd in (
        ["git", "init", "-q"],
        [str(BIN / "dvc"), "init", "-q"],
        ["git", "add", "-A"],
        ["git", "commit", "-qm", "init"],
    ):
        subprocess.run(cmd, cwd=proj, env=env, check=True, capture_output=True)
    first = subprocess.run([str(BIN / "dvc"), "repro"], cwd=proj, env=env, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stdout + first.stderr
    return proj, env, first


def test_dvc_repro_writes_metrics_and_registers_champion(dvc_project) -> None:
    proj, env, first = dvc_project
    metrics = json.loads((proj / "artifacts" / "metrics.json").read_text())
    keys = {
        "image_auroc",
        "image_ap",
        "image_f1_max",
        "pixel_auroc",
        "pixel_ap",
        "pixel_f1_max",
        "pixel_aupro",
        "mad",
    }
    assert set(metrics) == {"mean", "categories"}
    assert set(metrics["mean"]) == keys and set(metrics["categories"]) == {"brick", "washer"}
    for vals in metrics["categories"].values():
        assert set(vals) == keys and all(0.0 <= v <= 1.0 for v in vals.values())
    assert (proj / "dvc.lock").is_file()
    plots = list((proj / "artifacts" / "eval" / "plots").glob("*.png"))
    assert any(p.name.endswith("_maps.png") for p in plots) and any("pixel_curves" in p.name for p in plots)
    assert "RANDOM-INIT encoder" in first.stdout
    assert "Running stage 'sweep'" not in first.stdout  # the sweep is never part of plain `dvc repro`

    code = (
        "import mlflow; from mlflow import MlflowClient; mlflow.set_tracking_uri('sqlite:///mlruns/mlflow.db');"
        "c = MlflowClient(); e = c.get_experiment_by_name('inpformer');"
        "runs = c.search_runs([e.experiment_id]);"
        "mv = c.get_model_version_by_alias('inpformer', 'champion');"
        "print(len(runs), sorted(r.data.tags.get('stage') for r in runs), mv.version,"
        " runs[0].data.tags.get('encoder_pretrained'))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=proj, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    n_runs = int(out.stdout.split(maxsplit=1)[0])
    assert n_runs >= 2 and "'evaluate'" in out.stdout and "'train'" in out.stdout
    assert out.stdout.strip().endswith("False")  # the run records that the encoder was random-init


def test_second_repro_does_nothing_and_gamma_reruns_train_and_eval(dvc_project) -> None:
    proj, env, _ = dvc_project
    dvc = str(BIN / "dvc")
    second = subprocess.run([dvc, "repro"], cwd=proj, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0
    assert "Running stage" not in second.stdout
    status = subprocess.run([dvc, "status", "dvc.yaml"], cwd=proj, env=env, capture_output=True, text=True)
    assert "up to date" in status.stdout.lower() or status.stdout.strip() == ""
    params = yaml.safe_load((proj / "params.yaml").read_text())
    params["loss"]["gamma"] = 2.0
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    third = subprocess.run([dvc, "repro"], cwd=proj, env=env, capture_output=True, text=True, timeout=900)
    assert third.returncode == 0, third.stderr
    ran = {line.split("'")[1] for line in third.stdout.splitlines() if line.startswith("Running stage")}
    assert ran == {"train", "evaluate"}


def test_pyfunc_model_scores_a_batch_of_any_size(dvc_project) -> None:
    proj, env, _ = dvc_project
    code = (
        "import numpy as np, mlflow; mlflow.set_tracking_uri('sqlite:///mlruns/mlflow.db');"
        "m = mlflow.pyfunc.load_model('models:/inpformer@champion');"
        "x = (np.random.default_rng(0).random((3, 70, 90, 3)) * 255).astype(np.uint8);"
        "o = m.predict(x); print(o['anomaly_maps'].shape, o['image_scores'].shape, type(o['threshold']).__name__)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=proj, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "(3, 64, 64) (3,) float" in out.stdout


# -- Prefect ---------------------------------------------------------------------------------------
def test_prefect_flow_runs_stages_and_publishes_artifact(tmp_path, monkeypatch) -> None:
    from prefect.testing.utilities import prefect_test_harness

    import pipelines.flows as flows

    ran: list[list[str]] = []

    def fake_run(cmd: list[str], root: Path) -> None:
        ran.append(cmd[1:])
        if cmd[-1] == "evaluate":
            (root / "artifacts").mkdir(exist_ok=True)
            vals = {k: 0.5 for k in flows.METRIC_COLUMNS}
            (root / "artifacts" / "metrics.json").write_text(json.dumps({"mean": vals, "categories": {"a": vals}}))
            (root / "artifacts" / "eval_run.json").write_text(json.dumps({"run_id": "abc123"}))

    monkeypatch.setattr(flows, "run_command", fake_run)
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    original = (tmp_path / "params.yaml").read_text()
    with prefect_test_harness():
        result = flows.pipeline(overrides=["loss.gamma=2.5"], experiment_name="ui-rerun", root=str(tmp_path))
        assert [c[-1] for c in ran if c[0] == "repro"] == list(flows.STAGES)
        assert ["exp", "save", "-f", "-n", "ui-rerun"] in ran
        assert result["rows"][-1]["category"] == "mean" and result["rows"][-1]["mad"] == 50.0
        assert "abc123" in result["mlflow_run"]
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

        async def _read():
            async with get_client() as client:
                return await client.read_artifacts(
                    artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["inpformer-metrics"]))
                )

        import asyncio

        arts = asyncio.run(_read())
        assert arts and arts[0].type == "table"
    assert (tmp_path / "params.yaml").read_text() == original  # overrides were temporary
