"""Real datasets as users bring them (issue 20): the whole part in view, image-level labels, the
README's real-data lines verbatim, training that talks, thresholds that say when they flag all."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import TINY_PIPELINE, copy_repository
from PIL import Image

from components.data.transforms import IMAGENET_MEAN, ImageTransform
from components.evaluation.coverage import mask_coverage
from components.evaluation.metrics import evaluate_arrays, metric_set
from components.scoring.overlay import map_to_original
from pipelines.config import load_params

ROOT = Path(__file__).resolve().parents[1]


# -- field of view ---------------------------------------------------------------------------------------


def _image(w: int, h: int, value: int = 200) -> Image.Image:
    return Image.fromarray(np.full((h, w, 3), value, np.uint8))


def test_full_geometry_sees_every_pixel() -> None:
    tf = ImageTransform(resize=64, crop=28, geometry="full")
    unit = tf.to_unit(_image(40, 20))
    assert unit.shape == (3, 28, 28) and torch.allclose(unit, torch.full_like(unit, 200 / 255), atol=1e-6)
    assert tf.view((40, 20)).source == (0, 0, 40, 20)
    amap = np.arange(14 * 14, dtype=np.float32).reshape(14, 14)
    back = map_to_original(amap, (40, 20), tf)
    assert back.shape == (20, 40) and np.isfinite(back).all()  # no pixel outside the view


def test_letterbox_keeps_the_aspect_and_pads_with_the_mean() -> None:
    tf = ImageTransform(resize=28, crop=28, geometry="letterbox")
    unit = tf.to_unit(_image(40, 20))  # scale 28/40 = 0.7: 28 x 14, centred: rows 7..20
    assert tf.view((40, 20)).target == (0, 7, 28, 21)
    inside, pad = unit[:, 7:21], unit[:, :7]
    assert torch.allclose(inside, torch.full_like(inside, 200 / 255), atol=1e-6)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1).expand_as(pad)
    assert torch.allclose(pad, mean) and torch.allclose(tf.normalize(unit)[:, :7], torch.zeros_like(pad), atol=1e-6)
    mask = tf.mask(Image.fromarray(np.full((20, 40), 255, np.uint8)))
    assert mask[0, :7].sum() == 0 and torch.allclose(mask[0, 7:21], torch.ones(14, 28))
    amap = np.full((28, 28), 5.0, np.float32)
    amap[7:21] = 1.0  # the image's part of the map; the padding's score must not leak back
    back = map_to_original(amap, (40, 20), tf)
    assert back.shape == (20, 40) and np.allclose(back, 1.0)


def test_center_crop_is_the_paper_transform() -> None:
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8))
    import torchvision.transforms.functional as TF
    from torchvision.transforms import InterpolationMode

    ref = TF.center_crop(TF.to_tensor(TF.resize(img, [64, 64], interpolation=InterpolationMode.BILINEAR)), [56, 56])
    assert torch.equal(ImageTransform(64, 56).to_unit(img), ref)


def test_caches_never_serve_another_field_of_view(tmp_path) -> None:
    from components.data.cache import ImageCache
    from components.data.datasets import ImageDataset, Record

    _image(40, 20).save(tmp_path / "x.png")
    cache = ImageCache(tmp_path / "cache")
    crop, full = ImageTransform(32, 28), ImageTransform(32, 28, geometry="full")
    assert cache.key(tmp_path / "x.png", crop) != cache.key(tmp_path / "x.png", full)
    rec = [Record(str(tmp_path / "x.png"), "a", "train", 0)]
    ImageDataset(rec, crop, cache=cache)[0]
    ImageDataset(rec, full, cache=cache)[0]
    assert cache.misses == 2 and cache.hits == 0  # the centre-cropped entry is not the whole image


def _border_masks(folder: Path) -> list[Path]:
    """Masks of 100 x 60 images with defects at the border (and one wholly outside a centre crop)."""
    folder.mkdir(parents=True, exist_ok=True)
    boxes = [(0, 0, 10, 60), (0, 20, 40, 40), (45, 25, 55, 35), (90, 50, 100, 60)]
    paths = []
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        m = np.zeros((60, 100), np.uint8)
        m[y0:y1, x0:x1] = 255
        Image.fromarray(m).save(folder / f"{i}_mask.png")
        paths.append(folder / f"{i}_mask.png")
    return paths


def test_mask_coverage_matches_an_independent_count(tmp_path) -> None:
    paths = _border_masks(tmp_path)
    resize, crop = 128, 84  # the view: the central 84/128 of each side
    lo = (resize - crop) / 2 / resize
    x0, x1, y0, y1 = round(100 * lo), round(100 * (1 - lo)), round(60 * lo), round(60 * (1 - lo))
    total = inside = outside = 0
    for p in paths:
        m = np.asarray(Image.open(p)) > 127
        k = int(m[y0:y1, x0:x1].sum())
        total, inside, outside = total + int(m.sum()), inside + k, outside + int(k == 0)
    cov = mask_coverage(paths, ImageTransform(resize, crop))
    assert abs(cov.share - inside / total) < 0.01 and cov.outside == outside == 2 and cov.images == 4
    full = mask_coverage(paths, ImageTransform(resize, crop, geometry="full"))
    assert full.share == 1.0 and full.outside == 0


def test_coverage_warning_names_the_geometry_and_folder_data_default_to_full(tmp_path, caplog) -> None:
    from components.data.datasets import Record
    from pipelines.builders import build_transform
    from pipelines.view import report_coverage

    records = [Record(str(p), "part", "test", 1, str(p), "scratch") for p in _border_masks(tmp_path)]
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    p = load_params(tmp_path / "params.yaml", ["data.dataset=mvtec"])
    with caplog.at_level(logging.WARNING):
        cov = report_coverage(p, "part", records, build_transform(p))
    assert cov.share < 0.95 and "coverage" in caplog.text and "data.geometry to full" in caplog.text
    caplog.clear()
    folder = load_params(tmp_path / "params.yaml", ["data.dataset=folder"])
    assert build_transform(folder).geometry == "full"
    with caplog.at_level(logging.WARNING):
        assert report_coverage(folder, "part", records, build_transform(folder)).share == 1.0
    assert "coverage" not in caplog.text


def test_prepare_puts_the_view_share_in_the_count_table_and_warns_early(tmp_path, monkeypatch, caplog) -> None:
    from pipelines import stages

    cat = tmp_path / "src" / "part"
    masks = _border_masks(cat / "ground_truth" / "edge")
    for i in range(2):
        for split in ("train", "test"):
            (cat / split / "good").mkdir(parents=True, exist_ok=True)
            _image(100, 60).save(cat / split / "good" / f"{i}.png")
    (cat / "test" / "edge").mkdir(parents=True)
    for m in masks:
        _image(100, 60).save(cat / "test" / "edge" / m.name.replace("_mask", ""))
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    base = ["data.dataset=folder", "data.name=edges", f"data.source={tmp_path / 'src'}", "data.image_size=128"]
    expected = mask_coverage(masks, ImageTransform(128, 112))  # closed form checked above
    with caplog.at_level(logging.WARNING):
        stages.prepare(load_params("params.yaml", [*base, "data.crop_size=112", "data.geometry=center_crop"]))
    row = json.loads(Path("data/prepared/edges/counts.json").read_text())[0]
    assert row["coverage_%"] == round(100 * expected.share, 1) < 95 and row["outside_view"] == expected.outside
    assert "coverage" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        stages.prepare(load_params("params.yaml", [*base, "data.crop_size=112"]))  # folder default: full
    row = json.loads(Path("data/prepared/edges/counts.json").read_text())[0]
    assert (row["coverage_%"], row["outside_view"]) == (100.0, 0) and "mask coverage" not in caplog.text


# -- image-level labels ----------------------------------------------------------------------------------


def test_without_masks_the_mad_is_the_mean_of_the_image_metrics() -> None:
    scores, labels = np.array([0.1, 0.2, 0.8, 0.4, 0.9]), np.array([0, 0, 1, 0, 1])
    out = evaluate_arrays(scores, labels, None, None)
    assert math.isnan(out["pixel_auroc"]) and metric_set(out) == "image"
    assert out["mad"] == pytest.approx((out["image_auroc"] + out["image_ap"] + out["image_f1_max"]) / 3)
    assert out["image_auroc"] == 1.0  # every anomaly above every normal
    assert metric_set({**out, "pixel_auroc": 0.5}) == ""  # some pixel metrics only: no mAD to compare


def test_promotion_compares_only_within_one_metric_set() -> None:
    from pipelines.tracking.registry import should_promote

    scope = {"dataset": "parts", "setting": "multi_class", "group": "all", "metric_set": "image"}
    champion = {"dataset": "parts", "setting": "multi_class", "mad": "0.5"}  # registered before the tag: image+pixel
    assert not should_promote(champion, scope, 0.99)
    assert should_promote({**champion, "metric_set": "image"}, scope, 0.99)


def test_a_threshold_that_flags_most_normals_warns(tmp_path, caplog) -> None:
    from pipelines.stages.eval_checks import threshold_sanity

    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    p = load_params(tmp_path / "params.yaml")
    labels = np.array([0] * 3 + [1] * 6)  # 67 % anomalous, as the test split
    scores = np.array([0.5, 0.6, 0.7, 0.1, 0.2, 0.55, 0.65, 0.8, 0.9])
    with caplog.at_level(logging.WARNING):
        threshold_sanity(p, "part", scores, labels, 0.05)  # below every normal image
    assert "flags 100 % of the normal" in caplog.text and "split=validation" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        threshold_sanity(p, "part", scores[:6], np.array([0, 0, 0, 1, 1, 1]), 0.65)  # flags 1 of 3 normals
    assert caplog.text == ""


def test_metrics_json_writes_undefined_as_null() -> None:
    from pipelines.stages.eval_checks import json_safe

    text = json.dumps(json_safe({"a": math.nan, "b": [1.0, math.inf], "c": {"d": 0.5}}))
    assert json.loads(text) == {"a": None, "b": [1.0, None], "c": {"d": 0.5}}


# -- talking while training ------------------------------------------------------------------------------


def test_training_prints_iteration_rate_eta_and_loss(monkeypatch, capsys) -> None:
    from pipelines.stages import training

    clock = iter([0.0, 10.0, 31.0, 40.0, 62.0])
    monkeypatch.setattr(training.time, "monotonic", lambda: next(clock))
    logged = []
    mlflow = type("Fake", (), {"log_metrics": lambda self, m, step: logged.append((step, m))})()
    talk = training.IterationLog("all", mlflow, every_s=30, quiet=False)
    for it in range(1, 6):
        talk({"iteration": it, "iterations": 100, "phase": "main", "total": 1.0 / it, "lr": 1e-3})
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2  # at 31 s and at 62 s, not at every iteration
    # 3 iterations in 31 s since the first call: 97 left at 31/3 s each
    assert lines[0] == "[all] main iteration 3/100 (3 %), 0.10 it/s, ETA 1002 s, loss 0.3333"
    assert [step for step, _ in logged] == [1, 2, 3, 4, 5] and logged[0][1]["train_iter_total"] == 1.0


# -- predict counts what it ignores -------------------------------------------------------------------------


def test_predict_counts_stray_files(tmp_path, monkeypatch, capsys) -> None:
    from conftest import model_workspace

    from pipelines.cli import main

    monkeypatch.chdir(tmp_path)
    model_workspace(tmp_path, ["a"], {"a": {"image_threshold": 0.5, "pixel_threshold": 0.5}})
    (tmp_path / "new/a").mkdir(parents=True)
    _image(30, 20).save(tmp_path / "new/a/x.png")
    (tmp_path / "new/a/notes.txt").write_text("operator notes")
    assert main(["predict", "new", "--out", "out"]) == 0
    assert "1 non-image file(s) ignored, e.g. new/a/notes.txt" in capsys.readouterr().out


# -- the README's real-data lines, verbatim ---------------------------------------------------------------


def _parts(root: Path, masked_defects: tuple[str, ...]) -> Path:
    """An MVTec-layout folder of non-square parts (64 x 40): defects anywhere, masks for some kinds."""
    rng = np.random.default_rng(0)
    cat = root / "my_parts" / "part"

    def save(path: Path, defect: bool) -> None:
        img = rng.integers(90, 110, (40, 64, 3), dtype=np.uint8)
        mask = np.zeros((40, 64), np.uint8)
        if defect:
            x, y = int(rng.integers(0, 54)), int(rng.integers(0, 30))
            img[y : y + 10, x : x + 10] = 255
            mask[y : y + 10, x : x + 10] = 255
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(path)
        kind = path.parent.name
        if defect and kind in masked_defects:
            gt = cat / "ground_truth" / kind / f"{path.stem}_mask.png"
            gt.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(mask).save(gt)

    for i in range(8):
        save(cat / "train" / "good" / f"{i:03d}.png", False)
    for kind, defect in (("good", False), ("scratch", True), ("dent", True)):
        for i in range(3):
            save(cat / "test" / kind / f"{i:03d}.png", defect)
    return root / "my_parts"


def _readme_lines() -> str:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- real-data:begin -->\n```bash\n(.*?)```\n<!-- real-data:end -->", text, re.S)
    assert block, "README.md lost its real-data block"
    return block.group(1)


def _tiny_workspace(tmp_path: Path) -> Path:
    from pipelines.config.overrides import apply_overrides

    work = copy_repository(tmp_path / "repo")
    tiny = [o for o in TINY_PIPELINE if not o.startswith("data.synthetic")]
    tree = apply_overrides(yaml.safe_load((work / "params.yaml").read_text()), [*tiny, "train.epochs=1"])
    (work / "params.yaml").write_text(yaml.safe_dump(tree, sort_keys=False))
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run(["git", "add", "-A"], cwd=work, check=True)
    subprocess.run([*git, "commit", "-qm", "baseline"], cwd=work, check=True)
    return work


@pytest.mark.slow
@pytest.mark.parametrize("masked", [(), ("scratch",)], ids=["no-masks", "masks-for-some-defects"])
def test_readme_real_data_lines_run_verbatim(tmp_path, masked) -> None:
    work = _tiny_workspace(tmp_path)
    parts = _parts(tmp_path, masked)
    script = _readme_lines().replace("/path/to/my_parts", str(parts))
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", HF_HUB_OFFLINE="1")
    out = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script], cwd=work, env=env, capture_output=True, text=True, timeout=900
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "anomalous image(s) have no mask" in out.stdout
    metrics = json.loads((work / "metrics/metrics.json").read_text())
    part = metrics["categories"]["part"]
    assert all(math.isfinite(part[k]) for k in ("image_auroc", "image_ap", "image_f1_max", "mad"))
    assert part["mask_coverage"] == (1.0 if masked else None)  # folder data: the whole image in view
    if masked:
        assert metrics["metric_set"] == {"all": "image+pixel"} and math.isfinite(part["pixel_auroc"])
    else:
        assert metrics["metric_set"] == {"all": "image"}
        assert all(part[k] is None for k in ("pixel_auroc", "pixel_ap", "pixel_f1_max", "pixel_aupro"))
    package = json.loads((work / "artifacts/eval/packages/all/package.json").read_text())
    assert package["geometry"] == "full"
    record = json.loads((work / "artifacts/eval_run.json").read_text())
    assert record["registry"]["all"]["version"]  # registered
