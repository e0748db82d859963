"""ONNX / TorchScript export: parity with PyTorch, dynamic batch, metadata, and predict on the artifact."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SCORING_DEPTH, TINY_REDUCTION, max_rel_diff, model_workspace, reorder_tolerance, tiny_model
from PIL import Image

from components.scoring.export import ExportParityError, export_model, load_exported, parity
from components.scoring.inference import ScoringConfig, score_batch
from pipelines.config import load_params

ROOT = Path(__file__).resolve().parents[1]
SCORING = ScoringConfig(map_kind="fused", resize=64)
TOLERANCE = reorder_tolerance(TINY_REDUCTION, SCORING_DEPTH)  # another runtime: the same sums reordered


META = {"image_size": 64, "crop_size": 56, "thresholds": {"a": {"image_threshold": 0.1}}}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The tiny model and its exports (traced at batch 2), once per module: ``{suffix: path}``."""
    folder = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    model = tiny_model().eval()
    files = {
        s: export_model(model, SCORING, META, folder / f"m{s}", torch.randn(2, 3, 56, 56)) for s in (".onnx", ".pt")
    }
    assert all(f.is_file() for f in files.values()) and not list(folder.glob("*.partial"))
    return model, files


@pytest.mark.parametrize("suffix", [".onnx", ".pt"])
def test_export_matches_pytorch_at_any_batch(exported, suffix, torch_threads) -> None:
    model, files = exported
    scorer = load_exported(files[suffix])
    assert scorer.metadata == META  # the contract travels inside the file
    images = torch.randn(5, 3, 56, 56)  # another batch size than traced with
    diff = parity(model, SCORING, scorer, images, batch_size=5)
    assert diff["map_rel"] <= TOLERANCE and diff["score_rel"] <= TOLERANCE and diff["images"] == 5
    maps, scores = scorer(images[:3])
    ref_maps, ref_scores = score_batch(model, images[:3], SCORING)
    assert maps.shape == (3, 64, 64) and scores.shape == (3,)
    assert max_rel_diff(scores, ref_scores) <= TOLERANCE and max_rel_diff(maps, ref_maps[:, 0]) <= TOLERANCE


def test_openvino_runs_the_same_onnx_file(exported, torch_threads) -> None:
    model, files = exported
    diff = parity(model, SCORING, load_exported(files[".onnx"], runtime="openvino"), torch.randn(3, 3, 56, 56))
    assert diff["map_rel"] <= TOLERANCE and diff["score_rel"] <= TOLERANCE


def test_parity_sees_a_different_model(exported) -> None:
    _, files = exported
    torch.manual_seed(1)
    other = tiny_model().eval()
    diff = parity(other, SCORING, load_exported(files[".onnx"]), torch.randn(2, 3, 56, 56))
    assert diff["map_rel"] > 1e-3


def test_export_rejects_unknown_suffix(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"\.onnx or \.pt"):
        export_model(tiny_model(), SCORING, {}, tmp_path / "m.bin", torch.randn(1, 3, 56, 56))
    assert not list(tmp_path.iterdir())


@pytest.fixture
def export_workspace(tmp_path, monkeypatch):
    """A workspace with a tiny model (categories a, b), thresholds and a prepared manifest."""
    monkeypatch.chdir(tmp_path)
    model_workspace(tmp_path, ["a", "b"])
    thresholds = {}
    prepared = tmp_path / "data" / "prepared" / "synthetic"
    prepared.mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    for cat in ("a", "b"):
        folder = tmp_path / "new" / cat
        folder.mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (70, 90, 3), dtype=np.uint8)).save(folder / f"{i}.png")
            rows.append({"path": str(folder / f"{i}.png"), "category": cat, "split": "test", "label": i % 2})
    with (prepared / "manifest.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["path", "category", "split", "label", "mask_path", "defect"])
        writer.writeheader()
        writer.writerows(rows)
    # thresholds in the middle of each category's scores, so decisions split
    from pipelines.serve.predict import predict_images

    p = load_params("params.yaml", ["train.device=cpu"])
    scores = {r["path"]: r["score"] for r in predict_images(p, ["new"], "probe", {}).rows}
    for cat in ("a", "b"):
        mid = float(np.median([s for k, s in scores.items() if f"/{cat}/" in k]))
        thresholds[cat] = {"image_threshold": mid, "pixel_threshold": 0.5, "rule": "f1"}
    model_workspace(tmp_path, ["a", "b"], thresholds)  # the same (seeded) model, now calibrated
    return tmp_path


def test_export_cli_then_predict_with_the_artifact(export_workspace) -> None:
    from pipelines.cli import main

    assert main(["export", "--set", "tracking.enabled=false", "--set", "train.device=cpu"]) == 0
    onnx_file = export_workspace / "artifacts" / "export" / "model.onnx"
    report = json.loads((export_workspace / "artifacts" / "export" / "model.onnx.parity.json").read_text())
    assert report["passed"] and report["map_rel"] <= TOLERANCE and report["score_rel"] <= TOLERANCE
    assert report["images"] == 8
    assert main(["predict", "new", "--out", "torch_out", "--set", "train.device=cpu"]) == 0
    assert main(["predict", "new", "--model", str(onnx_file), "--out", "onnx_out"]) == 0
    torch_rows = list(csv.DictReader((export_workspace / "torch_out" / "predictions.csv").open()))
    onnx_rows = list(csv.DictReader((export_workspace / "onnx_out" / "predictions.csv").open()))
    assert [r["decision"] for r in onnx_rows] == [r["decision"] for r in torch_rows]
    assert {r["decision"] for r in onnx_rows} == {"anomalous", "normal"}  # both occur: a real comparison
    scores = [(float(a["score"]), float(b["score"])) for a, b in zip(onnx_rows, torch_rows)]
    assert max_rel_diff(*zip(*scores)) <= TOLERANCE
    assert [a["threshold"] for a in onnx_rows] == [b["threshold"] for b in torch_rows]
    assert main(["export", "--format", "torchscript", "--set", "tracking.enabled=false"]) == 0
    assert main(["predict", "new/a", "--model", "artifacts/export/model.pt", "--out", "ts_out"]) == 0
    assert main(["export", "--model", str(onnx_file)]) == 1  # an exported file cannot be exported again


def test_failed_parity_keeps_nothing(export_workspace, monkeypatch) -> None:
    import pipelines.serve.export as exp

    monkeypatch.setattr(exp, "parity", lambda *a, **k: {"map_rel": 0.5, "score_rel": 0.0, "images": 8})
    p = load_params("params.yaml", ["tracking.enabled=false"])
    with pytest.raises(ExportParityError, match="maps differ"):
        exp.export(p)
    assert not (export_workspace / "artifacts" / "export" / "model.onnx").exists()
