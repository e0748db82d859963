"""Reproducibility (issue 21): pinned CPU kernels, the noise floor and the champion gate that uses
it, data hashes, and ``inpformer reproduce``."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import pipelines
from pipelines.config import load_params
from pipelines.repro.record import min_gain
from pipelines.tracking.registry import promotion

ROOT = Path(__file__).resolve().parents[1]
SCOPE = {"dataset": "synthetic", "setting": "multi_class", "group": "all"}
NOISE = {"noise": {"synthetic/multi_class": {"k": 3, "std": {"mad": 0.01}}}}  # metrics/noise.json, std 0.01


# -- pinned kernels ------------------------------------------------------------------------------------


@pytest.fixture
def clean_env(monkeypatch):
    for key in [*pipelines.CPU_KERNEL_PINS, pipelines.KERNELS_ENV]:
        monkeypatch.delenv(key, raising=False)
    return monkeypatch


def _cpuinfo(tmp_path: Path, flags: str) -> str:
    path = tmp_path / "cpuinfo"
    path.write_text(f"processor\t: 0\nmodel name\t: Test CPU\nflags\t\t: fpu sse2 {flags}\n\nprocessor\t: 1\n")
    return str(path)


def test_kernels_are_pinned_on_avx2_cpus_only_and_never_over_a_user_value(clean_env, tmp_path) -> None:
    avx512 = _cpuinfo(tmp_path, "avx avx2 fma avx512f amx_tile")
    assert pipelines.pin_cpu_kernels(avx512) == pipelines.CPU_KERNEL_PINS
    assert os.environ["MKL_CBWR"] == "AVX2,STRICT" and os.environ["ATEN_CPU_CAPABILITY"] == "avx2"
    assert "ONEDNN_MAX_CPU_ISA" not in pipelines.CPU_KERNEL_PINS  # it breaks OpenVINO INT8 on AVX-512 CPUs
    for key in pipelines.CPU_KERNEL_PINS:
        clean_env.delenv(key)
    clean_env.setenv("MKL_CBWR", "COMPATIBLE")  # the user's value wins
    assert pipelines.pin_cpu_kernels(avx512)["MKL_CBWR"] == "COMPATIBLE"
    for key in pipelines.CPU_KERNEL_PINS:
        clean_env.delenv(key, raising=False)
    assert pipelines.pin_cpu_kernels(_cpuinfo(tmp_path, "avx sse4_2")) == {}  # no AVX2: nothing to pin
    assert pipelines.pin_cpu_kernels(str(tmp_path / "absent")) == {}  # not Linux: nothing
    clean_env.setenv(pipelines.KERNELS_ENV, "native")
    assert pipelines.pin_cpu_kernels(avx512) == {} and "MKL_CBWR" not in os.environ


@pytest.mark.skipif(not pipelines.has_avx2(), reason="needs an x86 CPU with AVX2 (the pins apply only there)")
def test_a_pipeline_process_runs_the_pinned_kernels_and_no_onednn() -> None:
    env = {k: v for k, v in os.environ.items() if k not in pipelines.CPU_KERNEL_PINS}
    code = (
        "import pipelines, torch; from pipelines.builders import apply_cpu_policy, cpu_runtime; "
        "from pipelines.config import load_params; apply_cpu_policy(load_params('params.yaml', [])); "
        "import json; print(json.dumps(cpu_runtime()))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    runtime = json.loads(out.stdout.strip().splitlines()[-1])
    assert (runtime["cpu_kernels"], runtime["mkl_cbwr"], runtime["onednn"]) == ("AVX2", "AVX2,STRICT", "False")
    assert runtime["num_threads"] == "2"  # train.num_threads of params.yaml


@pytest.mark.skipif(not pipelines.has_avx2(), reason="needs an x86 CPU with AVX2 (the pins apply only there)")
def test_bf16_training_keeps_onednn_on_the_pinned_kernels(monkeypatch) -> None:
    """CPU bf16 matrix products need oneDNN (14x slower without it): only fp32 turns it off."""
    import torch

    from pipelines.builders import apply_cpu_policy
    from pipelines.config import load_params

    monkeypatch.setenv("MKL_CBWR", pipelines.CPU_KERNEL_PINS["MKL_CBWR"])  # pinned, as in every stage
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", True)
    apply_cpu_policy(load_params(ROOT / "params.yaml", ["train.amp=bf16"]), threads=False)
    assert torch.backends.mkldnn.enabled is True
    apply_cpu_policy(load_params(ROOT / "params.yaml", []), threads=False)
    assert torch.backends.mkldnn.enabled is False


# -- the champion gate ---------------------------------------------------------------------------------


def test_a_gain_inside_the_noise_does_not_promote_and_one_outside_does(tmp_path) -> None:
    noise = tmp_path / "noise.json"
    noise.write_text(json.dumps(NOISE))
    p = load_params(ROOT / "params.yaml", [])
    gain, source = min_gain(p, noise)
    assert gain == pytest.approx(0.02) and "3 seeds" in source  # 2 x std
    champion = {**SCOPE, "mad": "0.600000"}
    inside, why = promotion(champion, SCOPE, 0.615, gain)
    assert not inside and "not more than min_gain 0.0200" in why
    outside, why = promotion(champion, SCOPE, 0.625, gain)
    assert outside and "+0.0250 > min_gain 0.0200" in why
    assert min_gain(p, tmp_path / "none.json") == (0.0, "no noise floor measured for this scope (inpformer noise)")
    fixed = load_params(ROOT / "params.yaml", ["registry.min_gain=0.05"])
    assert min_gain(fixed, noise)[0] == 0.05 and not promotion(champion, SCOPE, 0.64, 0.05)[0]


def test_the_gate_in_the_registry_says_why(tmp_path, monkeypatch, capsys) -> None:
    from test_registry import PACKAGE, _register

    from components.scoring.package import write_package

    monkeypatch.chdir(tmp_path)
    model_dir = tmp_path / "models" / "all"
    model_dir.mkdir(parents=True)
    (model_dir / "model.safetensors").write_bytes(b"weights")
    write_package(model_dir, PACKAGE)
    Path("metrics").mkdir()
    Path("metrics/noise.json").write_text(json.dumps(NOISE))
    assert _register(model_dir, 0.60)["champion"]
    inside = _register(model_dir, 0.61)
    assert not inside["champion"] and inside["min_gain"] == pytest.approx(0.02)
    assert "not promoted" in capsys.readouterr().out
    assert _register(model_dir, 0.63)["champion"]


# -- data hash and reproduce ----------------------------------------------------------------------------


def test_the_data_hash_sees_an_image_edited_in_place(tmp_path, monkeypatch) -> None:
    from components.data.datasets import Record, write_manifest
    from pipelines.stages.records import data_hash, manifest_hash

    monkeypatch.chdir(tmp_path)
    img = tmp_path / "outside" / "a.png"
    img.parent.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(img)
    write_manifest(Path("data/prepared/mine/manifest.csv"), [Record(str(img), "c", "train", 0)])
    p = load_params(ROOT / "params.yaml", ["data.name=mine"])
    before, manifest = data_hash(p), manifest_hash(p)
    Image.fromarray(np.ones((8, 8, 3), np.uint8)).save(img)
    assert data_hash(p) != before and manifest_hash(p) == manifest  # the manifest alone cannot see it


def test_compare_uses_the_tolerance_per_metric() -> None:
    from components.evaluation.metrics import METRIC_KEYS
    from pipelines.repro.reproduce import compare

    recorded = {k: 0.5 for k in METRIC_KEYS} | {"brick/mad": 0.7}
    rebuilt = {"mean": {k: 0.5 for k in METRIC_KEYS} | {"mad": 0.52}, "categories": {"brick": {"mad": None}}}
    rows = {r["metric"]: r for r in compare(recorded, rebuilt, {k: 0.01 for k in METRIC_KEYS})}
    assert rows["image_auroc"]["ok"] and rows["image_auroc"]["diff"] == 0
    assert not rows["mad"]["ok"] and rows["mad"]["diff"] == pytest.approx(0.02)
    assert not rows["brick/mad"]["ok"] and math.isnan(rows["brick/mad"]["reproduced"])  # undefined vs 0.7


def test_reproduce_exits_1_naming_the_data_hash_when_the_data_changed(tmp_path, monkeypatch, capsys) -> None:
    from components.evaluation.metrics import METRIC_KEYS
    from pipelines.repro import reproduce as rep

    metrics = {k: 0.5 for k in METRIC_KEYS}
    record = {
        "run_id": "r" * 32,
        "commit": "c" * 40,
        "dirty": False,
        "params": {},
        "data_hash": "aaaa",
        "metrics": metrics,
    }
    monkeypatch.setattr(rep, "resolve_run", lambda p, ref: "r" * 32)
    monkeypatch.setattr(rep, "_record", lambda p, run_id: record)
    monkeypatch.setattr(rep, "_rebuild", lambda rec, scratch, ws: {"metrics": {"mean": metrics, "categories": {}}})
    monkeypatch.setattr(rep, "_rebuilt_data_hash", lambda scratch, params: "bbbb")
    monkeypatch.chdir(tmp_path)
    p = load_params(ROOT / "params.yaml", [])
    assert rep.reproduce(p, "models:/inpformer@champion") == 1
    out = capsys.readouterr().out
    assert "data differs: the record's data_hash is aaaa, the rebuild's is bbbb" in out and "NOT reproduced" in out
    monkeypatch.setattr(rep, "_rebuilt_data_hash", lambda scratch, params: "aaaa")
    assert rep.reproduce(p, "models:/inpformer@champion") == 0
    assert "bit-identical" in capsys.readouterr().out


def test_noise_is_the_sample_std_over_seeds_and_merges_scopes(tmp_path, monkeypatch) -> None:
    from components.evaluation.metrics import METRIC_KEYS
    from pipelines.repro import noise

    monkeypatch.chdir(tmp_path)
    mads = {1: 0.60, 2: 0.62, 3: 0.67}
    seen = []

    def fake(q, progress):
        seen.append(q.seed)
        return {"c": {k: (mads[q.seed] if k == "mad" else math.nan) for k in METRIC_KEYS}}

    monkeypatch.setattr(noise, "_seed_metrics", fake)
    path = tmp_path / "noise.json"
    path.write_text(json.dumps({"noise": {"other/few_shot": {"k": 2}}}))
    p = load_params(ROOT / "params.yaml", ["seed=1", "tracking.enabled=false"])
    record = noise.measure_noise(p, 3, path=path)
    assert seen == [1, 2, 3] and record["seeds"] == [1, 2, 3]
    mean = sum(mads.values()) / 3
    std = math.sqrt(sum((v - mean) ** 2 for v in mads.values()) / 2)  # sample std (n - 1)
    assert record["mean"]["mad"] == pytest.approx(mean) and record["std"]["mad"] == pytest.approx(std)
    stored = json.loads(path.read_text())["noise"]
    assert set(stored) == {"other/few_shot", "synthetic/multi_class"} and "runs" not in stored["synthetic/multi_class"]
    assert stored["synthetic/multi_class"]["std"]["image_auroc"] is None  # undefined: null, not NaN
    assert min_gain(p, path)[0] == pytest.approx(2 * std)
    with pytest.raises(ValueError, match="at least 2 seeds"):
        noise.measure_noise(p, 1, path=path)


def test_the_sweep_says_whether_its_best_trial_beats_the_noise(tmp_path, monkeypatch, capsys) -> None:
    from pipelines.sweep.apply import beats_noise

    monkeypatch.chdir(tmp_path)
    p = load_params(ROOT / "params.yaml", [])
    assert beats_noise(p, [0.60, 0.61, 0.62], 0.62) is None  # no noise measured: unknown, and said so
    assert "Noise floor unknown" in capsys.readouterr().out
    Path("metrics").mkdir()
    Path("metrics/noise.json").write_text(json.dumps(NOISE))  # min_gain 0.02
    assert beats_noise(p, [0.60, 0.61, 0.62], 0.62) is False  # 0.01 over the median
    assert beats_noise(p, [0.60, 0.61, 0.64], 0.64) is True  # 0.03 over the median
    assert "beats the noise: +0.0300" in capsys.readouterr().out


def test_sweep_apply_runs_the_committed_baseline_with_its_set_and_refuses_edits(tmp_path, monkeypatch) -> None:
    from pipelines.sweep import apply

    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    for cmd in (["git", "init", "-q"], ["git", "add", "params.yaml"], [*git, "commit", "-qm", "base"]):
        subprocess.run(cmd, check=True)
    apply.BEST_PARAMS_FILE.parent.mkdir(parents=True)
    apply.BEST_PARAMS_FILE.write_text("loss.gamma: 2.5\n")
    ran: list[list[str]] = []
    real = subprocess.run

    def fake_run(cmd, *a, **kw):
        if "exp" in cmd:
            ran.append(cmd)
            return subprocess.CompletedProcess(cmd, 0)
        return real(cmd, *a, **kw)

    monkeypatch.setattr(apply.subprocess, "run", fake_run)
    p = load_params("params.yaml", [])
    assert apply.apply_best(p, "params.yaml", "tuned", ["train.epochs=1"]) == 0
    assert ran[0][1:] == ["exp", "run", "--temp", "-n", "tuned", "-S", "loss.gamma=2.5", "-S", "train.epochs=1"]
    Path("params.yaml").write_text(Path("params.yaml").read_text().replace("epochs: 8", "epochs: 2"))
    with pytest.raises(ValueError, match="differs from the last commit"):
        apply.apply_best(p, "params.yaml", "tuned")


def test_runs_of_a_temporary_dvc_experiment_land_in_the_workspace_store(tmp_path, monkeypatch) -> None:
    from pipelines.tracking.guard import TRACKING_ROOT_ENV, sqlite_path, tracking_root

    monkeypatch.delenv(TRACKING_ROOT_ENV, raising=False)
    temp = tmp_path / "ws" / ".dvc" / "tmp" / "exps" / "tmpab12" / "sub"
    temp.mkdir(parents=True)
    monkeypatch.chdir(temp)
    assert tracking_root() == tmp_path / "ws"
    assert sqlite_path(load_params(ROOT / "params.yaml", [])) == tmp_path / "ws" / "mlruns" / "mlflow.db"
    monkeypatch.chdir(tmp_path)
    assert tracking_root() == Path()
    monkeypatch.setenv(TRACKING_ROOT_ENV, str(tmp_path / "elsewhere"))
    assert tracking_root() == tmp_path / "elsewhere"
