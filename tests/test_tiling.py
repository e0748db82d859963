"""The ``tile`` geometry (issue 20): images much larger than the model input scored as overlapping
tiles whose maps are stitched back, on every path (train, synthesis, evaluate, predict, package)."""

from __future__ import annotations

import itertools
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_PIPELINE
from PIL import Image

from components.data.datasets import Record
from components.data.tiling import tile_records
from components.data.transforms import ImageTransform
from components.scoring.overlay import map_to_original
from components.scoring.package import ModelPackage
from components.scoring.schema import PackageError
from components.scoring.tiling import score_tiled, stitch, stitched_score
from pipelines.config import load_params

ROOT = Path(__file__).resolve().parents[1]


def _tiler(side: int = 112, overlap: float = 0.25) -> ImageTransform:
    return ImageTransform(resize=56, crop=56, geometry="tile", tile=side, tile_overlap=overlap)


def test_tile_grid_matches_the_closed_form() -> None:
    # 300 wide, side 112, overlap >= 28 px: stride <= 84 → ceil(188 / 84) + 1 = 4 starts spread over 0..188
    boxes = _tiler().tiles((300, 112))
    assert boxes == [(0, 0, 112, 112), (63, 0, 175, 112), (125, 0, 237, 112), (188, 0, 300, 112)]
    assert _tiler().tiles((100, 80)) == [(0, 0, 100, 80)]  # smaller than a tile: the whole image once
    assert ImageTransform(64, 56, geometry="full").tiles((300, 112)) == [(0, 0, 300, 112)]


@pytest.mark.parametrize(
    ("w", "h", "side", "overlap"), [(1000, 700, 224, 0.25), (517, 333, 100, 0.5), (225, 224, 224, 0)]
)
def test_tiles_cover_the_image_and_overlap_as_asked(w, h, side, overlap) -> None:
    boxes = _tiler(side, overlap).tiles((w, h))
    covered = np.zeros((h, w), bool)
    for left, top, right, bottom in boxes:
        assert 0 <= left < right <= w and 0 <= top < bottom <= h
        assert right - left == min(side, w) and bottom - top == min(side, h)
        covered[top:bottom, left:right] = True
    assert covered.all()
    xs = sorted({b[0] for b in boxes})
    assert all(side - (b - a) >= overlap * side - 1 for a, b in itertools.pairwise(xs))  # neighbours overlap enough


def test_stitch_averages_overlaps_and_one_box_is_the_full_geometry() -> None:
    size = (300, 112)
    boxes = _tiler().tiles(size)
    maps = [np.full((16, 16), float(i + 1), np.float32) for i in range(len(boxes))]
    full = stitch(maps, boxes, size)
    assert full.shape == (112, 300)
    assert np.allclose(full[:, :63], 1.0) and np.allclose(full[:, 63:112], 1.5)  # tiles 0 and 1 overlap on 63..111
    assert np.allclose(full[:, 112:125], 2.0) and np.allclose(full[:, 237:], 4.0)
    amap = np.random.default_rng(0).random((16, 16)).astype(np.float32)
    one = stitch([amap], [(0, 0, 90, 70)], (90, 70))
    assert np.array_equal(one, map_to_original(amap, (90, 70), ImageTransform(64, 56, geometry="full")))


def test_the_image_score_comes_from_the_stitched_map() -> None:
    rng = np.random.default_rng(1)
    img = rng.integers(0, 60, (112, 300, 3), dtype=np.uint8)
    img[10:20, 280:290] = 255  # a bright defect inside the last tile only
    tf = _tiler()

    def scorer(batch: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:  # map = the tile's brightest value
        top = batch.amax(dim=(1, 2, 3)).numpy()
        return np.broadcast_to(top[:, None, None], (len(top), 8, 8)).copy(), top

    [(full, score)] = score_tiled(scorer, [Image.fromarray(img)], tf, top_ratio=0.01, batch_size=3)
    tiles = [tf(Image.fromarray(img).crop(b)).amax().item() for b in tf.tiles((300, 112))]
    assert np.allclose(full[:, 237:], tiles[3], atol=1e-6) and np.allclose(full[:, :63], tiles[0], atol=1e-6)
    values = np.sort(full.ravel())[::-1]
    assert score == pytest.approx(values[: int(values.size * 0.01)].mean(), rel=1e-6)
    assert score == pytest.approx(stitched_score(full, 0.01))


def test_training_tiles_are_the_crops_written_once(tmp_path) -> None:
    arr = np.random.default_rng(2).integers(0, 255, (112, 300, 3), dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / "big.png")
    Image.fromarray(arr[:50, :50]).save(tmp_path / "small.png")
    recs = [Record(str(tmp_path / "big.png"), "c", "train", 0), Record(str(tmp_path / "small.png"), "c", "train", 0)]
    out = tile_records(recs, _tiler(), tmp_path / "tiles")
    assert len(out) == 5 and out[4] == recs[1]  # the small image is one tile: itself
    for rec, (left, top, right, bottom) in zip(out, _tiler().tiles((300, 112))):
        assert np.array_equal(np.asarray(Image.open(rec.path)), arr[top:bottom, left:right])
        assert (rec.category, rec.split, rec.label) == ("c", "train", 0)
    stamp = Path(out[0].path).stat().st_mtime_ns
    assert tile_records(recs, _tiler(), tmp_path / "tiles") == out and Path(out[0].path).stat().st_mtime_ns == stamp
    Image.fromarray(255 - arr).save(tmp_path / "big.png")  # changed pixels: new tiles, never the old ones
    assert {r.path for r in tile_records(recs, _tiler(), tmp_path / "tiles")[:4]}.isdisjoint(r.path for r in out[:4])
    assert tile_records(recs, ImageTransform(64, 56, geometry="full"), tmp_path / "tiles") == recs


def test_the_package_carries_the_tiles_and_refuses_hostile_ones(tiny) -> None:
    pkg = ModelPackage(model=tiny.config, resize=56, geometry="tile", tile=200, tile_overlap=0.5)
    back = ModelPackage.from_json(pkg.to_json())
    assert back.transform().tiles((400, 200)) == [(0, 0, 200, 200), (100, 0, 300, 200), (200, 0, 400, 200)]
    data = json.loads(pkg.to_json())
    with pytest.raises(PackageError, match="tile_overlap"):
        ModelPackage.from_dict({**data, "tile_overlap": 0.999})
    with pytest.raises(PackageError, match="'tile' is 2"):
        ModelPackage.from_dict({**data, "tile": 2})


def test_bad_tile_params_are_refused() -> None:
    from pipelines.config import ConfigError

    with pytest.raises(ConfigError, match="tile_overlap"):
        load_params(ROOT / "params.yaml", ["data.tile_overlap=0.95"])
    with pytest.raises(ConfigError, match="tile_size"):
        load_params(ROOT / "params.yaml", ["data.tile_size=5"])


def _wide_parts(root: Path) -> Path:
    """Folder data: 224 x 112 parts (4 × 2 tiles of 56 px), a bright 8 px defect anywhere, with masks."""
    rng = np.random.default_rng(0)
    cat = root / "wide" / "part"

    def save(path: Path, defect: bool) -> None:
        img = rng.integers(90, 110, (112, 224, 3), dtype=np.uint8)
        mask = np.zeros((112, 224), np.uint8)
        if defect:
            x, y = int(rng.integers(0, 216)), int(rng.integers(0, 104))
            img[y : y + 8, x : x + 8] = 255
            mask[y : y + 8, x : x + 8] = 255
            gt = cat / "ground_truth" / path.parent.name / f"{path.stem}_mask.png"
            gt.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(mask).save(gt)
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(path)

    for i in range(3):
        save(cat / "train" / "good" / f"{i:03d}.png", False)
    for kind, defect in (("good", False), ("spot", True)):
        for i in range(2):
            save(cat / "test" / kind / f"{i:03d}.png", defect)
    return root / "wide"


def test_a_tiled_folder_dataset_trains_evaluates_and_predicts(tmp_path, monkeypatch) -> None:
    from pipelines import stages
    from pipelines.cli import main

    parts = _wide_parts(tmp_path / "src")
    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(ROOT / "params.yaml", work / "params.yaml")
    monkeypatch.chdir(work)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tiny = [o for o in TINY_PIPELINE if not o.startswith("data.synthetic")]
    over = [*tiny, "train.epochs=1", "data.dataset=folder", "data.name=wide", f"data.source={parts}"]
    over += ["data.geometry=tile", "data.tile_size=56", "data.tile_overlap=0", "eval.plots=true"]
    p = load_params("params.yaml", over)
    stages.prepare(p)
    stages.synthesize(p, progress=False)
    bank = (work / "data/synth/wide/index.csv").read_text().splitlines()[1:]
    assert len(bank) == 3 * 8  # one pseudo anomaly per training tile: 3 images × 8 tiles
    stages.train(p, progress=False)
    metrics = stages.evaluate(p, progress=False)
    part = metrics["categories"]["part"]
    assert part["mask_coverage"] == 1.0 and all(math.isfinite(part[k]) for k in ("image_auroc", "pixel_auroc"))
    package = json.loads((work / "artifacts/eval/packages/all/package.json").read_text())
    assert (package["geometry"], package["tile"], package["tile_overlap"]) == ("tile", 56, 0.0)
    out = work / "preds"
    model = "models:/inpformer@champion"
    assert main(["predict", str(parts / "part/test"), "--model", model, "--out", str(out), "--save-maps", "npy"]) == 0
    rows = (out / "predictions.csv").read_text().splitlines()
    assert len(rows) == 5
    saved = sorted((out / "maps").rglob("*.npy"))
    assert saved and np.load(saved[0]).shape == (112, 224) and np.isfinite(np.load(saved[0])).all()
