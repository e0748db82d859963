"""The inspection loop (issue 22): review queue → verdicts as data → prepare; drift on shifted batches."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from conftest import model_workspace
from PIL import Image

from components.scoring.drift import DriftReference, embedding_shift, ks_2samp, psi


def _parts(folder: Path, n: int, seed: int, invert: bool = False) -> list[Path]:
    """Smooth grey 'parts' (a bright disc on a dark ground, jittered) as PNGs."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:64, :64]
    out = []
    for i in range(n):
        cy, cx = 32 + rng.integers(-3, 4, 2)
        disc = ((yy - cy) ** 2 + (xx - cx) ** 2 < 18**2) * 150 + 50 + rng.normal(0, 6, (64, 64))
        img = np.clip(disc, 0, 255).astype(np.uint8)
        img = 255 - img if invert else img
        path = folder / f"{seed}_{i}.png"
        Image.fromarray(np.stack([img] * 3, -1)).save(path)
        out.append(path)
    return out


def test_drift_statistics_against_independent_references() -> None:
    scipy_stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    a, b = rng.normal(0, 1, 80), rng.normal(0.3, 1.2, 50)
    d, p = ks_2samp(a, b)
    ref = scipy_stats.ks_2samp(a, b, method="asymp")
    assert d == pytest.approx(ref.statistic, abs=1e-12)
    assert p == pytest.approx(ref.pvalue, rel=0.05, abs=1e-3)  # Stephens' correction vs scipy's asymptotics
    # PSI, closed form: reference quartile bins, the run puts all 4 images in the top bin
    reference = np.arange(1.0, 9.0)  # quartile edges 2.75, 4.5, 6.25: two per bin
    q = np.array([0.5, 0.5, 0.5, 4]) / 4
    expected = float(np.sum((q - 0.25) * np.log(q / 0.25)))
    assert psi(reference, np.array([7.0, 7.5, 8.0, 9.0]), 4) == pytest.approx(expected)
    assert psi(reference, reference, 4) == pytest.approx(0.0)
    # embedding z: a run shifted by 1 std in every channel of a reference of 100 → sqrt(1 / (1/n + 1/100))
    ref = DriftReference((), (0.0, 0.0), (1.0, 1.0), 100)
    feats = np.ones((25, 2))
    assert embedding_shift(ref, feats) == pytest.approx(math.sqrt(1 / (1 / 25 + 1 / 100)))
    with pytest.raises(ValueError, match="finite"):
        DriftReference.from_dict({"normal_scores": [1.0, float("nan")]})


def _scored(p, package, images: list[Path], out: Path) -> list[dict]:
    from pipelines.serve.predict import score_images

    return score_images(p, package, [(i, i.parent) for i in images], out, {"category": "a", "append": True}).rows


def test_review_queue_verdicts_become_prepared_data(tmp_path, monkeypatch) -> None:
    from components.data.datasets import read_manifest
    from pipelines.config import load_params
    from pipelines.loop.review import LEDGER_FILE, mark, pending, queue_rows
    from pipelines.serve.predict import open_model
    from pipelines.stages.prepare_data import prepare

    monkeypatch.chdir(tmp_path)
    model_workspace(tmp_path, ["a"], {"a": {"image_threshold": -1e9, "pixel_threshold": 0.5}})  # every image rejected
    p = load_params("params.yaml", ["train.device=cpu"])
    package = open_model(p, "artifacts/models/all", "cpu")
    inbox = _parts(tmp_path / "inbox" / "a", 3, seed=5)
    rows = _scored(p, package, inbox, Path("scored"))
    assert {r["action"] for r in rows} == {"reject"}
    assert queue_rows(p, rows, Path("scored")) == 3
    assert queue_rows(p, rows, Path("scored")) == 0  # the same images again: not queued twice
    items = pending(p)
    assert len(items) == 3 and all((Path(p.review.queue_dir) / i["image"]).is_file() for i in items)
    for image in inbox:
        image.unlink()  # the watched folder is cleaned up: the queued copies keep the images
    normal = mark(p, items[0]["id"][:6], "normal")
    defect = mark(p, str(inbox[1]), "defect", "scratch")
    again = mark(p, items[1]["id"], "defect", "scratch")  # marked twice: one file, two ledger entries
    root = Path(p.review.dir)
    assert (root / normal["file"]).parent == root / "a" / "test" / "good"
    assert (root / defect["file"]).parent == root / "a" / "test" / "scratch" and again["file"] == defect["file"]
    assert len(list(root.rglob("*.png"))) == 2
    assert [json.loads(x)["verdict"] for x in (root / LEDGER_FILE).read_text().splitlines()] == ["normal"] + [
        "defect"
    ] * 2
    assert [i["id"] for i in pending(p)] == [items[2]["id"]]
    mark(p, items[2]["id"], "defect")
    moved = mark(p, items[2]["id"], "normal")  # a changed verdict moves the image
    assert len(list(root.rglob(Path(moved["file"]).name))) == 1 and "test/good" in moved["file"]
    with pytest.raises(ValueError, match="no queued image"):
        mark(p, "ffffffffffff", "normal")
    with pytest.raises(ValueError, match="defect type"):
        mark(p, items[0]["id"], "normal", "scratch")
    # prepare adds the reviewed images to the dataset's category, labelled by verdict
    _parts(tmp_path / "sources" / "parts" / "a" / "train" / "good", 4, seed=1)
    _parts(tmp_path / "sources" / "parts" / "a" / "test" / "good", 2, seed=2)
    _parts(tmp_path / "sources" / "parts" / "a" / "test" / "dent", 2, seed=3, invert=True)
    q = load_params("params.yaml", ["data.dataset=folder", "data.source=sources/parts", "data.name=parts"])
    records = read_manifest(prepare(q))
    reviewed = {Path(r.path).name: r for r in records if "reviewed" in r.path}
    assert len(records) == 4 + 2 + 2 + 3 and len(reviewed) == 3
    assert reviewed[Path(defect["file"]).name].label == 1 and reviewed[Path(defect["file"]).name].split == "test"
    assert reviewed[Path(normal["file"]).name].label == 0 and reviewed[Path(normal["file"]).name].defect == "good"


def test_drift_flags_a_shifted_batch_and_not_held_out_normals(tmp_path, monkeypatch) -> None:
    from dataclasses import replace

    from components.data.datasets import ImageDataset, Record
    from components.scoring.inference import pooled_features
    from pipelines.config import load_params
    from pipelines.loop.monitor import DRIFT_FILE, run_drift
    from pipelines.serve.predict import open_model

    monkeypatch.chdir(tmp_path)
    model_workspace(tmp_path, ["a"], {"a": {"image_threshold": 0.0, "pixel_threshold": 0.5}})
    p = load_params("params.yaml", ["train.device=cpu"])
    package = open_model(p, "artifacts/models/all", "cpu")
    train = [Record(str(x), "a", "train", 0) for x in _parts(tmp_path / "train", 40, seed=10)]
    reference_normals = _scored(p, package, _parts(tmp_path / "held" / "a", 30, seed=11), Path("ref"))
    features = pooled_features(package.model, ImageDataset(train, package.transform), 8)
    reference = DriftReference.of(np.array([r["raw_score"] for r in reference_normals]), features)
    package.package = replace(package.package, drift={"a": reference})
    good = run_drift(
        p, package, _scored(p, package, _parts(tmp_path / "good" / "a", 20, seed=12), Path("g")), Path("g")
    )
    entry = good["categories"]["a"]
    assert good["drift"] is False and entry["embedding_z"] < p.drift.embedding_max, entry
    shifted = _parts(tmp_path / "inv" / "a", 20, seed=12, invert=True)
    bad = run_drift(p, package, _scored(p, package, shifted, Path("b")), Path("b"))
    assert bad["drift"] is True and bad["categories"]["a"]["reasons"], bad
    assert json.loads((Path("b") / DRIFT_FILE).read_text())["drift"] is True
    few = run_drift(p, package, _scored(p, package, shifted[:2], Path("f")), Path("f"))
    assert few["categories"]["a"]["drift"] is None  # fewer than drift.min_images: no verdict


@pytest.mark.slow  # a real MLflow store and three ONNX exports
def test_gate_keeps_the_champion_unless_every_check_passes(tmp_path, monkeypatch) -> None:
    from components.scoring.package import read_package
    from pipelines.config import load_params
    from pipelines.loop.gate import gate
    from pipelines.loop.thresholds import history, set_threshold, show
    from pipelines.serve.predict import open_model
    from pipelines.stages.prepare_data import prepare
    from pipelines.tracking.registry import PROMOTION_ENV, log_and_register_model
    from pipelines.tracking.runs import tracked_run

    monkeypatch.chdir(tmp_path)
    champ = tmp_path / "old"
    champ.mkdir()
    model_workspace(champ, ["b"], {"b": {"image_threshold": 0.0, "pixel_threshold": 0.5}})  # scores no test image
    model_workspace(tmp_path, ["a"], {"a": {"image_threshold": 0.0, "pixel_threshold": 0.5}})
    _parts(tmp_path / "sources" / "parts" / "a" / "train" / "good", 3, seed=1)
    _parts(tmp_path / "sources" / "parts" / "a" / "test" / "good", 3, seed=2)
    _parts(tmp_path / "sources" / "parts" / "a" / "test" / "dent", 3, seed=3, invert=True)
    sets = ["data.dataset=folder", "data.source=sources/parts", "data.name=parts", "train.device=cpu"]
    p = load_params("params.yaml", sets)
    prepare(p)

    def register(root: Path, mad: float) -> str:
        package = read_package(root / "artifacts" / "eval" / "packages" / "all")
        with tracked_run(p, "evaluate", "evaluate") as mlflow:
            return str(
                log_and_register_model(mlflow, p, root / "artifacts" / "models" / "all", package, mad, "all")["version"]
            )

    assert register(champ, 0.5) == "1"  # the first version is the champion
    monkeypatch.setenv(PROMOTION_ENV, "gate")
    assert register(tmp_path, 0.9) == "2"  # better, but the gate decides
    monkeypatch.delenv(PROMOTION_ENV)
    champion = "models:/inpformer@champion"
    assert open_model(p, champion, "cpu").version == "v1"
    failing = ["serve.latency_budget_ms=1e-6", "export.map_rtol=1e-300", "export.score_rtol=1e-300"]
    bad = gate(load_params("params.yaml", [*sets, *failing]))
    assert not bad["passed"] and [c["check"] for c in bad["checks"] if not c["passed"]] == ["parity", "latency"]
    assert bad["checks"][0]["passed"]  # the metric alone passes: the champion scores no test image
    assert open_model(p, champion, "cpu").version == "v1"  # kept
    passed = gate(p)
    assert passed["passed"] and passed["promoted"] and open_model(p, champion, "cpu").version == "v2"
    # an audited threshold change travels with the version and is what predict decides with
    entry = set_threshold(p, champion, "a", 0.25, 0.1, "line trial: fewer false rejects")
    assert entry["previous"]["image_threshold"] == 0.0 and entry["status"] == "approved" and entry["user"]
    assert history(p, "models:/inpformer/2")[-1]["reason"] == "line trial: fewer false rejects"
    assert show(p, champion)[0]["image_threshold"] == 0.25
    loaded = open_model(p, champion, "cpu")
    assert loaded.rule.of("a").image_threshold == 0.25 and loaded.rule.of("a").rule == "manual@t0001"
    assert loaded.rule.action("a", 0.2) == "review" and loaded.rule.action("a", 0.05) == "pass"
    with pytest.raises(ValueError, match="reason"):
        set_threshold(p, champion, "a", 0.3, None, "")
    with pytest.raises(ValueError, match="below"):
        set_threshold(p, champion, "a", 0.3, 0.5, "x")


def test_retrain_triggers(tmp_path, monkeypatch) -> None:
    """A scoring run starts a retrain on drift only with drift.retrain, and after review.retrain_after verdicts."""
    from pipelines.config import load_params
    from pipelines.loop.review import LEDGER_FILE, RETRAIN_MARK, due_for_retrain
    from pipelines.serve.scoring import retrain_reason

    monkeypatch.chdir(tmp_path)
    p = load_params(Path(__file__).resolve().parents[1] / "params.yaml", ["review.retrain_after=2"])
    assert retrain_reason(p, {"drift": True}) == ""  # drift.retrain: false by default
    q = load_params(Path(__file__).resolve().parents[1] / "params.yaml", ["drift.retrain=true"])
    assert retrain_reason(q, {"drift": True}) == "drift" and retrain_reason(q, {"drift": False}) == ""
    ledger = Path(p.review.dir) / LEDGER_FILE
    ledger.parent.mkdir(parents=True)
    ledger.write_text(json.dumps({"id": "a"}) + "\n")
    assert not due_for_retrain(p)
    ledger.write_text(ledger.read_text() + json.dumps({"id": "b"}) + "\n")
    assert due_for_retrain(p) and retrain_reason(p, {"drift": False}) == "review.retrain_after verdicts"
    mark = Path(p.review.queue_dir) / RETRAIN_MARK
    mark.parent.mkdir(parents=True)
    mark.write_text(json.dumps({"verdicts": 2}))  # the last retrain saw both
    assert not due_for_retrain(p)
