"""`inpformer predict`: rows, overlays in the original frame, per-category thresholds, bad files."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import model_workspace
from PIL import Image

from components.data.transforms import ImageTransform
from components.scoring.overlay import crop_box, map_to_original, mask_outline
from pipelines.config import load_params

ROOT = Path(__file__).resolve().parents[1]


def test_map_footprint_in_the_original_frame() -> None:
    # resize 64, crop 56: offset 4, so the crop covers [4/64, 60/64] of each side
    tf = ImageTransform(64, 56)
    assert crop_box((128, 64), tf) == (8, 4, 120, 60)
    full = map_to_original(np.ones((7, 7), np.float32), (128, 64), tf)
    assert full.shape == (64, 128)
    assert np.isnan(full[:4]).all() and np.isnan(full[:, :8]).all() and np.isnan(full[60:]).all()
    assert np.allclose(full[4:60, 8:120], 1.0)
    ramp = map_to_original(np.tile(np.arange(8, dtype=np.float32), (8, 1)), (80, 80), ImageTransform(80, 80))
    assert np.all(np.diff(ramp[40]) >= 0) and ramp[40, 0] < ramp[40, -1]  # left stays left


def test_mask_outline_is_the_boundary() -> None:
    mask = np.zeros((6, 6), bool)
    mask[1:5, 1:5] = True
    edge = mask_outline(mask)
    assert edge.sum() == 12 and not edge[2:4, 2:4].any()


@pytest.fixture
def scored_workspace(tmp_path, monkeypatch):
    """A workspace with a tiny model of categories a and b, their thresholds, and images to score."""
    monkeypatch.chdir(tmp_path)
    thresholds = {
        "a": {"image_threshold": -1e9, "pixel_threshold": 0.5},
        "b": {"image_threshold": 1e9, "pixel_threshold": 0.5},
    }
    model_workspace(tmp_path, ["a", "b"], thresholds)
    rng = np.random.default_rng(0)
    for cat, size in (("a", (90, 70)), ("b", (64, 64))):
        folder = tmp_path / "new" / cat / "line1"
        folder.mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(folder / f"{i}.png")
    (tmp_path / "new" / "a" / "line1" / "broken.png").write_bytes(b"not a png")
    (tmp_path / "new" / "a" / "ground_truth").mkdir()
    Image.fromarray(np.zeros((70, 90), np.uint8)).save(tmp_path / "new" / "a" / "ground_truth" / "0_mask.png")
    return tmp_path


def test_predict_writes_rows_and_overlays_per_category(scored_workspace) -> None:
    from pipelines.serve.predict import predict_images

    p = load_params("params.yaml", ["train.device=cpu"])
    summary = predict_images(p, ["new"], "out", {"save_maps": "npy"})
    assert summary.scored == 6 and len(summary.skipped) == 1 and "broken.png" in summary.skipped[0]
    rows = list(csv.DictReader((scored_workspace / "out" / "predictions.csv").open()))
    assert [r["category"] for r in rows] == ["a"] * 3 + ["b"] * 3  # from the folder names
    assert {r["decision"] for r in rows if r["category"] == "a"} == {"anomalous"}  # its threshold is -1e9
    assert {r["decision"] for r in rows if r["category"] == "b"} == {"normal"}  # its threshold is 1e9
    lines = (scored_workspace / "out" / "predictions.jsonl").read_text().splitlines()
    assert [json.loads(x)["score"] for x in lines] == pytest.approx([float(r["score"]) for r in rows])
    for r in rows:
        original = Image.open(r["path"])
        assert Image.open(r["overlay"]).size == original.size  # the original pixel frame
    amap = np.load(scored_workspace / "out" / "maps" / "a" / "line1" / "0.png.npy")
    assert amap.shape == (70, 90) and np.isfinite(amap).any() and np.isnan(amap).any()


def test_predict_unknown_category_is_an_error_before_writing(scored_workspace) -> None:
    from pipelines.serve.predict import predict_images

    other = scored_workspace / "new" / "c"
    shutil.copytree(scored_workspace / "new" / "a", other)
    p = load_params("params.yaml", ["train.device=cpu"])
    with pytest.raises(ValueError, match="no category of the model"):
        predict_images(p, [str(other)], "out", {})
    assert not (scored_workspace / "out").exists()
    summary = predict_images(p, [str(other)], "out", {"category": "b", "limit": 2})
    assert summary.scored == 2


def test_predict_cli(scored_workspace) -> None:
    from pipelines.cli import main

    assert main(["predict", "new/b", "--out", "o2", "--set", "train.device=cpu"]) == 0
    assert len((scored_workspace / "o2" / "predictions.csv").read_text().splitlines()) == 4
    assert main(["predict", "missing-folder"]) == 1
