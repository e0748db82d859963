"""Pipeline end to end: DVC, the MLflow registry and pyfunc, the Prefect flow (slow)."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import SCORING_DEPTH, TINY_REDUCTION, max_rel_diff, reorder_tolerance

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
def _run(cmd: list[str], cwd: Path, env: dict, timeout: int = 900) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


def make_project(tmp: Path) -> tuple[Path, dict]:
    """A fresh git + DVC repository with the project's code and tiny params (nothing run yet)."""
    proj = tmp / "proj"
    proj.mkdir()
    for item in ("components", "pipelines", "sources", "dvc.yaml", ".dvcignore"):
        src = ROOT / item
        if src.is_dir():
            shutil.copytree(src, proj / item, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, proj / item)
    params = _merge(yaml.safe_load((ROOT / "params.yaml").read_text()), TINY_OVERRIDES)
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    shutil.copy(ROOT / ".gitignore", proj / ".gitignore")
    env = _env(tmp)
    for cmd in (["git", "init", "-q"], [str(BIN / "dvc"), "init", "-q"], ["git", "add", "-A"]):
        _run(cmd, proj, env)
    _run(["git", "commit", "-qm", "init"], proj, env)
    return proj, env


@pytest.fixture(scope="module")
def dvc_project(e2e_project):
    """The shared baseline project (conftest.e2e_project; test_settings runs its experiments on it later)."""
    return e2e_project


def test_dvc_repro_writes_metrics_and_registers_champion(dvc_project) -> None:
    proj, env, first = dvc_project
    metrics = json.loads((proj / "metrics" / "metrics.json").read_text())
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
    assert set(metrics) == {"mean", "categories", "weights", "metric_set"}
    assert set(metrics["mean"]) == keys and set(metrics["categories"]) == {"brick", "washer"}
    for vals in metrics["categories"].values():
        assert set(vals) == keys | {"mask_coverage", "masks_outside"}
        assert all(0.0 <= vals[k] <= 1.0 for k in (*keys, "mask_coverage"))
    weights = proj / "artifacts" / "models" / "all" / "model.safetensors"
    assert metrics["weights"] == {"all": hashlib.sha256(weights.read_bytes()).hexdigest()}  # the bytes scored
    assert metrics["metric_set"] == {"all": "image+pixel"}
    for kind, columns in (("roc", "fpr,tpr"), ("pr", "recall,precision"), ("pro", "fpr,pro")):
        for cat in ("brick", "washer"):
            assert (proj / "metrics" / "curves" / kind / f"{cat}.csv").read_text().startswith(columns)
    history = (proj / "metrics" / "train_history.csv").read_text().splitlines()
    assert history[0].startswith("group,") and "seg" in history[0] and len(history) == 2  # 1 epoch
    assert "seconds" not in (proj / "metrics" / "train.json").read_text()  # versioned files are deterministic
    plots = list((proj / "artifacts" / "eval" / "plots").glob("*.png"))
    assert any(p.name.endswith("_maps.png") for p in plots) and any("pixel_curves" in p.name for p in plots)
    assert "RANDOM-INIT encoder" in first.stdout
    for index in ("prepared/synthetic/manifest.csv", "synth/synthetic/index.csv"):
        assert str(proj) not in (proj / "data" / index).read_text()  # workspace-relative paths only

    code = (
        "import mlflow; from mlflow import MlflowClient; mlflow.set_tracking_uri('sqlite:///mlruns/mlflow.db');"
        "c = MlflowClient(); e = c.get_experiment_by_name('inpformer');"
        "runs = c.search_runs([e.experiment_id]);"
        "mv = c.get_model_version_by_alias('inpformer', 'champion');"
        "print(len(runs), sorted(r.data.tags.get('stage') for r in runs), mv.version,"
        " e.tags.get('mlflow.experimentKind'), runs[0].data.tags.get('encoder_pretrained'))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=proj, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("3 ['evaluate', 'pipeline', 'train']")  # one parent, two nested runs
    assert "custom_model_development" in out.stdout  # the model-training view, not GenAI
    assert out.stdout.strip().endswith("False")  # the run records that the encoder was random-init


def _f1_reference_accuracy(scores: np.ndarray, labels: np.ndarray) -> float:
    """Accuracy of the F1-optimal threshold, computed independently with scikit-learn."""
    from sklearn.metrics import precision_recall_curve

    precision, recall, thresholds = precision_recall_curve(labels, scores)
    f1 = 2 * precision[:-1] * recall[:-1] / (precision[:-1] + recall[:-1] + 1e-7)
    threshold = thresholds[int(np.argmax(f1))]
    return float(np.mean((scores >= threshold) == labels))


def test_reproduce_rebuilds_the_champion_from_its_record(dvc_project) -> None:
    """`inpformer reproduce models:/inpformer@champion`: a scratch worktree at the recorded commit, the
    recorded params and data, trained and evaluated again: bit-identical on this machine; the
    workspace, its lock and its worktree list untouched."""
    proj, env, _ = dvc_project
    lock = (proj / "dvc.lock").read_bytes()
    metrics = (proj / "metrics" / "metrics.json").read_bytes()
    out = subprocess.run(
        [str(BIN / "inpformer"), "reproduce", "models:/inpformer@champion"],
        cwd=proj, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "bit-identical" in out.stdout and "mad" in out.stdout  # same machine, kernels and threads
    assert (proj / "dvc.lock").read_bytes() == lock and (proj / "metrics" / "metrics.json").read_bytes() == metrics
    worktrees = _run(["git", "worktree", "list"], proj, env).stdout.strip().splitlines()
    assert len(worktrees) == 1  # the scratch tree is gone


def test_champion_predicts_exports_and_serves_per_category(dvc_project) -> None:
    """predict on the raw data → per-category accuracy of the F1 thresholds; export → same decisions."""
    import csv

    proj, env, _ = dvc_project
    _cli(["predict", "data/raw/synthetic", "--model", "models:/inpformer@champion", "--out", "preds"], proj, env)
    rows = list(csv.DictReader((proj / "preds" / "predictions.csv").open()))
    images = [f for f in (proj / "data" / "raw" / "synthetic").rglob("*.png") if "ground_truth" not in f.parts]
    assert len(rows) == len(images) and all((proj / r["overlay"]).is_file() for r in rows)
    assert {r["version"] for r in rows} == {"v1"}
    test_rows = [r for r in rows if "/test/" in r["path"]]
    for cat in ("brick", "washer"):
        mine = [r for r in test_rows if r["category"] == cat]
        labels = np.array(["/good/" not in r["path"] for r in mine], dtype=int)
        scores = np.array([float(r["score"]) for r in mine])
        accuracy = float(np.mean((np.array([r["decision"] for r in mine]) == "anomalous") == labels))
        assert abs(accuracy - _f1_reference_accuracy(scores, labels)) <= 0.02, cat

    _cli(["export"], proj, env)  # ONNX, parity-checked, logged next to the registered version
    onnx_file = "artifacts/export/model.onnx"
    _cli(["predict", "data/raw/synthetic", "--model", onnx_file, "--out", "preds_onnx"], proj, env)
    onnx_rows = list(csv.DictReader((proj / "preds_onnx" / "predictions.csv").open()))
    assert [r["decision"] for r in onnx_rows] == [r["decision"] for r in rows]
    scores = [(float(a["score"]), float(b["score"])) for a, b in zip(onnx_rows, rows)]
    assert max_rel_diff(*zip(*scores)) <= reorder_tolerance(TINY_REDUCTION, SCORING_DEPTH)
    code = (
        "import mlflow; mlflow.set_tracking_uri('sqlite:///mlruns/mlflow.db');"
        "c = mlflow.MlflowClient(); print(c.get_model_version('inpformer', '1').tags.get('export_onnx'))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=proj, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip().endswith("export-all/model.onnx"), out


def _stage_runs(stdout: str) -> set[str]:
    return {line.split("'")[1] for line in stdout.splitlines() if line.startswith("Running stage")}


def _mad_by_experiment(show: list[dict]) -> dict[str, float]:
    """``dvc exp show --json`` → {baseline rev name or experiment name: mean mAD}."""
    out = {}
    for entry in show:
        revs = [entry] + [r for exp in entry.get("experiments") or [] for r in exp["revs"]]
        for rev in revs:
            data = (rev.get("data") or {}).get("metrics") or {}
            mad = ((data.get("metrics/metrics.json") or {}).get("data") or {}).get("mean", {}).get("mad")
            out[rev.get("name") or rev["rev"]] = mad
    return out


def test_user_journey_repro_experiments_compare_sweep_survives(dvc_project) -> None:
    """dvc repro → sweep → apply (an experiment) → another experiment → exp show / diff / plots → MLflow runs."""
    proj, env, _ = dvc_project
    dvc = str(BIN / "dvc")
    assert not _stage_runs(_run([dvc, "repro"], proj, env).stdout)  # nothing changed: nothing runs
    assert "up to date" in _run([dvc, "status"], proj, env).stdout.lower()
    sweep = ["sweep", "--n-trials", "1", "--set", "train.epochs=1", "--set", "sweep.pruner=none"]
    _cli(sweep, proj, env)
    before = sorted(p.name for p in (proj / "artifacts" / "sweep").iterdir())
    assert "optuna.db" in before and "best_params.yaml" in before
    applied = _cli(["sweep", "--apply", "--name", "best"], proj, env)  # tuned → a DVC experiment
    assert "dvc exp run --temp -n best -S loss.gamma=" in applied.stdout  # the baseline + the best values

    exp = [dvc, "exp", "run", "--temp"]  # as the README: each experiment is the baseline + its own -S
    ran = _stage_runs(_run([*exp, "-n", "m4", "-S", "model.num_prototypes=4"], proj, env).stdout)
    assert ran == {"check", "train", "evaluate"}  # check: params.yaml changed (cheap; outputs unchanged)
    assert sorted(p.name for p in (proj / "artifacts" / "sweep").iterdir()) == before  # the sweep survives
    assert "up to date" in _run([dvc, "status"], proj, env).stdout.lower()  # the workspace kept its baseline

    show = json.loads(_run([dvc, "exp", "show", "--json"], proj, env).stdout)
    mads = _mad_by_experiment(show)
    for name in ("best", "m4"):
        assert isinstance(mads.get(name), float) and math.isfinite(mads[name]), mads
    baseline = [v for k, v in mads.items() if k not in ("best", "m4", "workspace")]
    assert baseline and all(isinstance(v, float) and math.isfinite(v) for v in baseline), mads
    params = {
        rev["name"]: rev["data"]["params"]["params.yaml"]["data"]
        for entry in show
        for x in entry.get("experiments") or []
        for rev in x.get("revs") or []
    }
    base = yaml.safe_load((proj / "params.yaml").read_text())
    best = yaml.safe_load((proj / "artifacts" / "sweep" / "best_params.yaml").read_text())
    assert params["m4"]["model"]["num_prototypes"] == 4  # the second experiment: its own change only,
    assert params["m4"]["loss"]["gamma"] == base["loss"]["gamma"] != best["loss.gamma"]  # not the sweep's
    diff = _run([dvc, "exp", "diff", "HEAD", "m4", "--json"], proj, env).stdout
    assert "mean.mad" in diff and "model.num_prototypes" in diff  # the experiment against the baseline commit
    plots = json.loads(_run([dvc, "plots", "show", "--json"], proj, env).stdout)["data"]
    assert any("curves/roc" in k for k in plots) and any("train_history" in k for k in plots)

    code = (
        "import mlflow; from mlflow import MlflowClient; mlflow.set_tracking_uri('sqlite:///mlruns/mlflow.db');"
        "c = MlflowClient(); e = c.get_experiment_by_name('inpformer');"
        "runs = c.search_runs([e.experiment_id], filter_string=\"tags.stage = 'pipeline'\");"
        "import json; print(json.dumps([[r.info.run_name, r.data.tags.get('dvc_exp_name'),"
        " r.data.params.get('model.num_prototypes'), r.data.params.get('loss.gamma'), r.data.metrics.get('mad')]"
        " for r in runs]))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=proj, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    rows = {r[0]: r for r in json.loads(out.stdout.splitlines()[-1])}
    assert {"best", "m4"} <= set(rows) and len(rows) == 3, rows  # one row per execution: baseline + 2
    assert rows["m4"][1] == "m4" and rows["m4"][2] == "4" and rows["best"][3] == str(best["loss.gamma"])
    assert all(isinstance(r[4], float) and math.isfinite(r[4]) for r in rows.values())  # params and mAD side by side
    assert rows["m4"][4] == pytest.approx(mads["m4"]) and rows["best"][4] == pytest.approx(mads["best"])


def test_moved_workspace_is_up_to_date(dvc_project, tmp_path_factory) -> None:
    proj, env, _ = dvc_project
    moved = tmp_path_factory.mktemp("moved") / "elsewhere"
    shutil.copytree(proj, moved, symlinks=True)  # the built workspace, at another path
    status = _run([str(BIN / "dvc"), "status"], moved, env).stdout
    assert "up to date" in status.lower(), status
    again = _run([str(BIN / "dvc"), "repro"], moved, env).stdout
    assert not _stage_runs(again), again


def _inverted(src: Path, dst: Path) -> None:
    from PIL import Image, ImageOps

    dst.mkdir(parents=True, exist_ok=True)
    for f in sorted(src.iterdir()):
        ImageOps.invert(Image.open(f).convert("RGB")).save(dst / f.name)


def test_inspection_loop_journey(dvc_project, tmp_path_factory) -> None:
    """Issue 22's journey, as commands: score a line's folder, review, retrain on the verdicts, drift.

    Last in the module: it changes the shared project (verdicts in sources/, a retrain experiment)."""
    from components.data.synthetic import generate_synthetic

    proj, env, _ = dvc_project
    inbox = proj / "line" / "brick"
    shutil.copytree(proj / "data" / "raw" / "synthetic" / "brick" / "test", inbox)
    scored = _cli(["serve-scoring", "--once", "--watch", "line"], proj, env).stdout
    assert "flagged" in scored, scored
    queue = json.loads(_cli(["review", "list", "--json"], proj, env).stdout)
    assert len(queue) >= 2 and {i["action"] for i in queue} <= {"reject", "review"}, queue
    first, second = queue[0], queue[1]
    _cli(["review", "mark", first["id"], "--verdict", "normal"], proj, env)
    _cli(["review", "mark", second["path"], "--verdict", "defect", "--defect", "chip"], proj, env)
    _cli(["review", "mark", second["id"], "--verdict", "defect", "--defect", "chip"], proj, env)  # twice: no copy
    assert len(json.loads(_cli(["review", "list", "--json"], proj, env).stdout)) == len(queue) - 2
    reviewed = proj / "sources" / "reviewed" / "brick"
    assert len(list(reviewed.rglob("*.png"))) == 2
    status = _run([str(BIN / "dvc"), "status"], proj, env).stdout
    assert "prepare:" in status and "sources" in status, status  # DVC sees the verdicts
    counts = {c["category"]: c for c in json.loads((proj / "data/prepared/synthetic/counts.json").read_text())}
    retrain = _cli(["retrain", "--reason", "verdicts"], proj, env, check=False)
    # the verdicts went to test/ (review.normals_to): the same training images give the same weights, so
    # the candidate cannot beat the champion on the updated test split and the gate keeps it (exit 3)
    log = retrain.stdout + retrain.stderr  # the flow prints through Prefect's logger (stderr)
    assert retrain.returncode == 3 and "kept the champion" in log, log
    assert "metric" in log and "parity" in log and "latency" in log
    manifest = (proj / "data" / "prepared" / "synthetic" / "manifest.csv").read_text()
    assert Path(first["image"]).name in manifest and Path(second["image"]).name in manifest
    after = {c["category"]: c for c in json.loads((proj / "data/prepared/synthetic/counts.json").read_text())}
    assert after["brick"]["test_good"] == counts["brick"]["test_good"] + 1
    assert after["brick"]["test_anomalous"] == counts["brick"]["test_anomalous"] + 1
    package = json.loads((proj / "artifacts" / "eval" / "packages" / "all" / "package.json").read_text())
    assert len(package["drift"]["brick"]["normal_scores"]) == after["brick"]["test_good"]  # scored by evaluate
    exps = _run([str(BIN / "dvc"), "exp", "list", "--name-only"], proj, env).stdout
    assert "retrain-" in exps, exps
    # drift: held-out normals (more images of the training stream) pass, their inverted copies drift
    fresh = generate_synthetic(tmp_path_factory.mktemp("heldout"), 0, 64, 14, 0, 0, ["brick"])
    held = proj / "heldout" / "brick"
    held.mkdir(parents=True)
    for f in sorted((fresh / "brick" / "train" / "good").iterdir())[8:]:  # the first 8 are the training images
        shutil.copy(f, held / f.name)
    _inverted(held, proj / "inverted" / "brick")
    from prefect.testing.utilities import prefect_test_harness

    from pipelines.serve.scoring import scoring_flow

    with prefect_test_harness(server_startup_timeout=None):  # the two runs in one Prefect server (CI time)
        for folder, drifts in (("heldout", False), ("inverted", True)):
            scoring_flow(watch=str(proj / folder), out=f"artifacts/scoring-{folder}", root=str(proj))
            report = json.loads((proj / "artifacts" / f"scoring-{folder}" / "drift.json").read_text())
            assert report["categories"]["brick"]["drift"] is drifts, report
