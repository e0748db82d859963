"""Edge export (issue 23): OpenVINO IR, INT8 with a gate on decisions; the failing gate leaves no file."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import model_workspace
from test_inspection_loop import _parts

from pipelines.serve.int8 import gate_verdict

pytest.importorskip("openvino")


@pytest.mark.parametrize(
    ("agreement", "drop", "passed"),
    [(1.0, 0.0, True), (0.99, 0.005, True), (0.989, 0.0, False), (1.0, 0.0051, False), (1.0, math.nan, True)],
)
def test_int8_gate_verdict(agreement: float, drop: float, passed: bool) -> None:
    assert gate_verdict(agreement, drop, 0.99, 0.005)[0] is passed


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    from pipelines.config import load_params
    from pipelines.stages.prepare_data import prepare

    monkeypatch.chdir(tmp_path)
    model_workspace(tmp_path, ["a"], {"a": {"image_threshold": 1.0, "pixel_threshold": 0.5}})
    _parts(tmp_path / "sources" / "parts" / "a" / "train" / "good", 4, seed=1)
    _parts(tmp_path / "sources" / "parts" / "a" / "test" / "good", 3, seed=2)
    _parts(tmp_path / "sources" / "parts" / "a" / "test" / "dent", 3, seed=3, invert=True)
    sets = ["data.dataset=folder", "data.source=sources/parts", "data.name=parts", "train.device=cpu"]
    sets += ["tracking.enabled=false", "export.format=openvino"]
    prepare(load_params("params.yaml", sets))
    return sets


def test_openvino_int8_export_scores_like_pytorch(workspace) -> None:
    from pipelines.config import load_params
    from pipelines.serve.export import export
    from pipelines.serve.predict import open_model

    p = load_params("params.yaml", [*workspace, "export.int8_mode=weights"])
    summary = export(p, "artifacts/models/all", "out/model.xml", int8=True)
    assert summary["images"] == 6 and 0.0 <= summary["agreement"] <= 1.0
    assert Path("out/model.xml").is_file() and Path("out/model.bin").is_file()
    loaded = open_model(p, "out/model.xml", "cpu")
    assert loaded.categories == ["a"] and loaded.rule.of("a").image_threshold == 1.0  # the metadata travels
    f32 = export(load_params("params.yaml", workspace), "artifacts/models/all", "out/f32.xml")  # parity-checked
    assert f32["passed"] and f32["map_rel"] < 1e-4
    assert Path("out/model.bin").stat().st_size < 0.5 * Path("out/f32.bin").stat().st_size  # INT8 weights


@pytest.mark.parametrize("fmt,suffix", [("openvino", ".xml"), ("onnx", ".onnx")])
def test_failing_int8_gate_removes_the_files(workspace, monkeypatch, fmt: str, suffix: str) -> None:
    """Full INT8 (weights and activations, calibrated on training normals), its gate forced to fail."""
    from components.errors import ExportParityError
    from pipelines.config import load_params
    from pipelines.serve import export as export_module

    seen = {}

    def failing(p, torch_model, int8):
        batch = torch.from_numpy(export_module.calibration_images(p, torch_model)[0])
        seen["scores"] = int8(batch)[1]  # the quantised model runs
        return {"images": 6, "agreement": 0.5, "passed": False, "reason": "decisions agree on 50.00% < 99.00%"}

    monkeypatch.setattr(export_module, "int8_gate", failing)
    sets = [*workspace, f"export.format={fmt}", "export.int8_mode=full", "export.int8_calibration_images=4"]
    with pytest.raises(ExportParityError, match="INT8 gate failed.*removed"):
        export_module.export(load_params("params.yaml", sets), "artifacts/models/all", f"out/model{suffix}", int8=True)
    assert seen["scores"].shape == (1,)
    assert not any(Path("out").iterdir())  # neither the model nor its weights nor a temporary ONNX


def test_onnxruntime_int8_export_keeps_the_contract(workspace) -> None:
    """ONNX Runtime INT8 (dynamic: INT8 weights per channel): gated, its metadata carried over, smaller."""
    import onnx

    from pipelines.config import load_params
    from pipelines.serve.export import export
    from pipelines.serve.predict import open_model

    p = load_params("params.yaml", [*workspace, "export.format=onnx", "export.int8_mode=weights"])
    summary = export(p, "artifacts/models/all", "out/model.onnx", int8=True)
    assert summary["images"] == 6 and summary["passed"] and summary["agreement"] >= 0.99
    loaded = open_model(p, "out/model.onnx", "cpu")
    assert loaded.categories == ["a"] and loaded.rule.of("a").image_threshold == 1.0  # the metadata travels
    export(load_params("params.yaml", [*workspace, "export.format=onnx"]), "artifacts/models/all", "out/f32.onnx")
    assert (
        Path("out/model.onnx").stat().st_size < Path("out/f32.onnx").stat().st_size
    )  # INT8 MatMuls (tiny: much stays f32)
    ops = {n.op_type for n in onnx.load("out/model.onnx").graph.node}
    assert "DynamicQuantizeLinear" in ops or "DynamicQuantizeMatMul" in ops, ops


def test_int8_needs_openvino_or_onnx_format(workspace) -> None:
    from pipelines.config import load_params
    from pipelines.serve.export import export

    p = load_params("params.yaml", [*workspace, "export.format=torchscript"])
    with pytest.raises(ValueError, match="openvino.onnx"):
        export(p, "artifacts/models/all", "out/model.pt", int8=True)


def test_benchmark_table_has_every_runtime(workspace) -> None:
    import json
    import subprocess
    import sys

    from pipelines.serve.benchmark import BENCH_DIR

    # the command as users run it, in its own process (ONNX Runtime, OpenVINO and TorchScript loaded together)
    sets = [x for s in workspace if s != "tracking.enabled=false" for x in ("--set", s)]  # logged to MLflow
    cli = Path(sys.executable).with_name("inpformer")
    out = subprocess.run([str(cli), "benchmark", "--model", "artifacts/models/all", "--runs", "5", *sets],
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    rows = json.loads((BENCH_DIR / "benchmark.json").read_text())["rows"]
    names = [r["runtime"] for r in rows]
    assert names[:2] == ["eager fp32", "eager bf16"] and "openvino int8 (weights)" in names
    measured = [r for r in rows if "skipped" not in r]
    want = {"eager fp32", "torchscript", "onnxruntime", "onnxruntime int8 (weights)", "openvino f32"}
    assert want <= {r["runtime"] for r in measured}
    for r in measured:
        assert 0 < r["p50_ms"] <= r["p95_ms"] <= r["p99_ms"] and r["images_per_s"] > 0
        assert r["agreement"] >= 5 / 6  # thresholds at 1.0: exports decide like eager (INT8: at most one flip)
    exact = {r["runtime"]: r for r in measured}
    assert exact["eager fp32"]["max_score_diff"] == 0.0 and exact["onnxruntime"]["max_score_diff"] < 1e-4
    assert exact["openvino int8 (weights)"]["file_mib"] < exact["openvino f32"]["file_mib"]
    assert exact["onnxruntime int8 (weights)"]["file_mib"] < exact["onnxruntime"]["file_mib"]
    summary = json.loads((BENCH_DIR / "benchmark.json").read_text())
    assert summary["gflops_per_image"] > 0 and summary["params_m"] > 0
    assert "p95 ms" in (BENCH_DIR / "benchmark.md").read_text()
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{Path.cwd() / 'mlruns' / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["inpformer-benchmark"], filter_string="tags.stage = 'benchmark'")
    assert len(runs) == 1 and runs["tags.model_version"][0] == summary["version"]
    assert runs["metrics.eager fp32.p50_ms"][0] == exact["eager fp32"]["p50_ms"]
    assert runs["metrics.openvino int8 _weights_.agreement"][0] == exact["openvino int8 (weights)"]["agreement"]
