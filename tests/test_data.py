"""Data: readers, bad input, synthesis, few-shot, semi-supervised, synthetic dataset, cache, transforms."""

from __future__ import annotations

import csv
import json
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from components.data.datasets import ImageDataset, Record, read_manifest, write_manifest
from components.data.fewshot import NUM_AUGMENTATIONS, augment_22, select_shots
from components.data.io import ImageReadError, read_mask, read_rgb
from components.data.readers import (
    DatasetError,
    ScanReport,
    convert_visa,
    flat_records,
    mvtec_records,
    realiad_records,
    validate_records,
)
from components.data.semi import paste_anomaly, select_anomalies
from components.data.synthesis import AUGMENTERS, PseudoAnomalySynthesizer, TextureBank, perlin_mask
from components.data.transforms import ImageTransform


def _img(path: Path, size=(20, 16), mode="RGB", value=128) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.full((size[1], size[0], 3), value, np.uint8)
    Image.fromarray(arr).convert(mode).save(path)
    return path


def _mask(path: Path, size=(20, 16), box=(2, 2, 6, 6), high=255) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.zeros((size[1], size[0]), np.uint8)
    arr[box[1] : box[3], box[0] : box[2]] = high
    Image.fromarray(arr, "L").save(path)
    return path


def _mvtec_tree(root: Path, cats=("a", "b"), n_train=3) -> Path:
    for c in cats:
        for i in range(n_train):
            _img(root / c / "train" / "good" / f"{i:03d}.png")
        _img(root / c / "test" / "good" / "000.png")
        _img(root / c / "test" / "crack" / "000.png")
        _mask(root / c / "ground_truth" / "crack" / "000_mask.png")
    return root


def test_mvtec_reader_counts_and_order(tmp_path) -> None:
    root = _mvtec_tree(tmp_path / "t", cats=("zeta", "alpha", "carpet"))
    (root / "alpha" / "train" / "good" / "notes.txt").write_text("stray")
    report = ScanReport()
    recs = mvtec_records(root, order=("carpet",), report=report)
    assert list(dict.fromkeys(r.category for r in recs)) == ["carpet", "alpha", "zeta"]
    c = Counter((r.category, r.split, r.label) for r in recs)
    assert c[("alpha", "train", 0)] == 3 and c[("alpha", "test", 0)] == 1 and c[("alpha", "test", 1)] == 1
    anomalous = [r for r in recs if r.label == 1]
    assert all(r.mask_path.endswith("000_mask.png") for r in anomalous)
    assert len(report.skipped_non_images) == 1 and report.skipped_non_images[0].endswith("notes.txt")
    single = mvtec_records(root / "alpha")  # a category folder itself
    assert {r.category for r in single} == {"alpha"}


def test_missing_mask_and_empty_category_are_reported(tmp_path) -> None:
    root = _mvtec_tree(tmp_path / "t", cats=("a",))
    (root / "a" / "ground_truth" / "crack" / "000_mask.png").unlink()
    (root / "b" / "train" / "good").mkdir(parents=True)
    report = ScanReport()
    mvtec_records(root, report=report)
    with pytest.raises(DatasetError) as err:
        report.raise_if_problems("fix it")
    msg = str(err.value)
    assert "000_mask.png" in msg and "no training images" in msg and str(root / "b") in msg


def test_no_category_found(tmp_path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no category found"):
        mvtec_records(tmp_path / "empty")


def test_bad_images_named_in_errors(tmp_path) -> None:
    good = _img(tmp_path / "ok.png")
    trunc = tmp_path / "trunc.png"
    trunc.write_bytes(good.read_bytes()[:40])
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"not an image at all")
    for p in (trunc, empty, junk):
        with pytest.raises(ImageReadError, match=p.name):
            read_rgb(p)


def test_modes_are_converted(tmp_path) -> None:
    assert read_rgb(_img(tmp_path / "g.png", mode="L")).mode == "RGB"
    assert read_rgb(_img(tmp_path / "a.png", mode="RGBA")).mode == "RGB"
    cmyk = tmp_path / "c.jpg"
    Image.new("CMYK", (8, 8), (0, 0, 0, 0)).save(cmyk)
    assert read_rgb(cmyk).mode == "RGB"
    # 16-bit greyscale is scaled by its range (PIL's own conversion would clip to white)
    arr16 = np.full((4, 4), 32896, np.uint16)  # ≈ half range
    p16 = tmp_path / "d.png"
    Image.fromarray(arr16).save(p16)
    out = np.asarray(read_rgb(p16))
    assert out.shape == (4, 4, 3) and abs(int(out[0, 0, 0]) - 128) <= 1


def test_masks_binarised_and_sizes_checked(tmp_path) -> None:
    m01 = _mask(tmp_path / "m01.png", high=1)  # saved as 0/1
    assert np.asarray(read_mask(m01)).max() == 255
    soft = tmp_path / "soft.png"
    Image.fromarray(np.array([[0, 100, 200]], np.uint8), "L").save(soft)
    assert np.asarray(read_mask(soft)).tolist() == [[0, 0, 255]]
    rgbm = tmp_path / "rgb.png"
    Image.fromarray(np.stack([np.zeros((2, 2)), np.full((2, 2), 255), np.zeros((2, 2))], -1).astype(np.uint8)).save(
        rgbm
    )
    assert np.asarray(read_mask(rgbm)).min() == 255  # channel max
    with pytest.raises(ImageReadError, match="must have the image's size"):
        read_mask(_mask(tmp_path / "m.png", size=(10, 10)), expected_size=(20, 16))


def test_validate_records_collects_or_skips(tmp_path) -> None:
    ok = _img(tmp_path / "ok.png")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG garbage")
    small = _mask(tmp_path / "small_mask.png", size=(5, 5))
    recs = [Record(str(ok), "c", "train", 0), Record(str(bad), "c", "train", 0),
            Record(str(ok), "c", "test", 1, str(small), "x")]  # fmt: skip
    report = ScanReport()
    kept = validate_records(recs, report, progress=False)
    assert len(report.problems) == 2 and len(kept) == 3
    assert any("bad.png" in p for p in report.problems) and any("small_mask.png" in p for p in report.problems)
    report2 = ScanReport()
    kept2 = validate_records(recs, report2, skip_bad=True, progress=False)
    assert len(kept2) == 1 and len(report2.skipped_bad) == 2 and not report2.problems


def test_flat_reader(tmp_path) -> None:
    for i in range(10):
        _img(tmp_path / "good" / f"n{i}.png")
    _img(tmp_path / "bad" / "x.png")
    _mask(tmp_path / "masks" / "x_mask.png")
    recs = flat_records(tmp_path / "good", tmp_path / "bad", tmp_path / "masks", test_ratio=0.2, seed=0)
    c = Counter((r.split, r.label) for r in recs)
    assert c[("train", 0)] == 8 and c[("test", 0)] == 2 and c[("test", 1)] == 1
    assert [r for r in recs if r.label == 1][0].mask_path.endswith("x_mask.png")
    with pytest.raises(DatasetError, match="no images"):
        (tmp_path / "none").mkdir()
        flat_records(tmp_path / "none")


def test_visa_conversion_from_fake_csv(tmp_path) -> None:
    raw = tmp_path / "raw"
    rows = [("candle", "train", "normal", "candle/Data/Images/Normal/0000.JPG", ""),
            ("candle", "test", "normal", "candle/Data/Images/Normal/0001.JPG", ""),
            ("candle", "test", "anomaly", "candle/Data/Images/Anomaly/0002.JPG",
             "candle/Data/Masks/Anomaly/0002.png")]  # fmt: skip
    for *_, img, mask in rows:
        _img(raw / img)
        if mask:
            _mask(raw / mask, high=3)  # VisA masks are not 0/255: every non-zero becomes 255
    csv_path = tmp_path / "1cls.csv"
    with csv_path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["object", "split", "label", "image", "mask"])
        w.writerows(rows)
    out = convert_visa(raw, csv_path, tmp_path / "visa")
    assert (out / "candle" / "train" / "good" / "0000.JPG").is_file()
    m = np.asarray(Image.open(out / "candle" / "ground_truth" / "bad" / "0002.png"))
    assert set(np.unique(m)) == {0, 255}
    recs = mvtec_records(out)
    assert Counter((r.split, r.label) for r in recs) == {("train", 0): 1, ("test", 0): 1, ("test", 1): 1}


def test_realiad_from_fake_json(tmp_path) -> None:
    root = tmp_path / "realiad_1024"
    _img(root / "toy" / "OK" / "a.jpg")
    _img(root / "toy" / "NG" / "b.jpg")
    _mask(root / "toy" / "NG" / "b.png")
    js = tmp_path / "jsons"
    js.mkdir()
    (js / "toy.json").write_text(json.dumps({
        "train": [{"image_path": "OK/a.jpg", "anomaly_class": "OK"}],
        "test": [{"image_path": "NG/b.jpg", "anomaly_class": "AK", "mask_path": "NG/b.png"}],
    }))  # fmt: skip
    recs = realiad_records(root, js)
    assert [(r.split, r.label) for r in recs] == [("train", 0), ("test", 1)]
    assert recs[1].mask_path.endswith("b.png") and recs[1].defect == "AK"


def test_manifest_roundtrip_relative_paths(tmp_path) -> None:
    recs = [Record("imgs/a.png", "c", "train", 0), Record("imgs/b.png", "c", "test", 1, "gt/b.png", "crack")]
    write_manifest(tmp_path / "m" / "manifest.csv", recs)
    back = read_manifest(tmp_path / "m" / "manifest.csv")
    assert back[1].path == str(tmp_path / "m" / "imgs/b.png") and back[1].mask_path == str(tmp_path / "m" / "gt/b.png")
    write_manifest(tmp_path / "m" / "up.csv", [Record("../raw/x.png", "c", "train", 0)])
    assert read_manifest(tmp_path / "m" / "up.csv")[0].path == str(tmp_path / "raw" / "x.png")  # normalised
    assert back[1].defect == "crack" and back[0].label == 0
    with pytest.raises(FileNotFoundError, match="inpformer prepare"):
        read_manifest(tmp_path / "nope.csv")


def test_transforms_match_official_recipe(tmp_path) -> None:
    arr = (np.random.default_rng(0).random((50, 70, 3)) * 255).astype(np.uint8)
    img = Image.fromarray(arr)
    tf = ImageTransform(resize=32, crop=28)
    out = tf(img)
    ref = np.asarray(img.resize((32, 32), Image.BILINEAR), dtype=np.float32) / 255.0
    ref = ref[2:30, 2:30]
    ref = (ref - np.array(tf.mean)) / np.array(tf.std)
    assert out.shape == (3, 28, 28)
    assert np.allclose(out.permute(1, 2, 0).numpy(), ref, atol=1e-5)
    assert torch.allclose(tf.denormalize(out), tf.to_unit(img), atol=1e-6)
    with pytest.raises(ValueError, match=r"crop \(14\) must be between 1 and resize \(10\)"):
        ImageTransform(resize=10, crop=14)


# -- synthesis -------------------------------------------------------------------------------------
def _synth(**kw) -> PseudoAnomalySynthesizer:
    args = dict(textures=TextureBank(None, procedural_size=64), empty_prob=0.0, rotate_prob=0.0)
    args.update(kw)
    return PseudoAnomalySynthesizer(**args)


def test_synthesis_mask_binary_and_outside_unchanged() -> None:
    img = np.random.default_rng(1).random((56, 56, 3)).astype(np.float32)
    s = _synth()
    hits = 0
    for seed in range(6):
        aug, mask, beta = s(img, np.random.default_rng(seed))
        assert set(np.unique(mask)) <= {0.0, 1.0}
        assert np.array_equal(aug[mask == 0], img[mask == 0])
        if mask.any():
            hits += 1
            assert 0.0 <= beta <= 0.8
            assert not np.allclose(aug[mask == 1], img[mask == 1])
    assert hits >= 3


def test_synthesis_same_seed_same_bytes_and_empty_prob() -> None:
    img = np.random.default_rng(1).random((40, 40, 3)).astype(np.float32)
    s = _synth(rotate_prob=0.3, empty_prob=0.5)
    a = s(img, np.random.default_rng(7))
    b = s(img, np.random.default_rng(7))
    assert a[0].tobytes() == b[0].tobytes() and a[1].tobytes() == b[1].tobytes()
    empty = _synth(empty_prob=1.0)
    aug, mask, beta = empty(img, np.random.default_rng(0))
    assert not mask.any() and np.array_equal(aug, img) and beta == -1.0


def test_blend_factor_formula() -> None:
    class Flat(TextureBank):
        def sample(self, size, rng):
            return np.zeros((*size, 3), np.uint8)

    img = np.full((32, 32, 3), 0.5, np.float32)
    s = PseudoAnomalySynthesizer(textures=Flat(None), empty_prob=0, rotate_prob=0, num_augmenters=0)
    for seed in range(10):
        aug, mask, beta = s(img, np.random.default_rng(seed))
        if mask.any():
            # inside: (1 − β)·0 + β·0.5
            assert np.allclose(aug[mask == 1], 0.5 * beta, atol=1e-6)
            break
    else:
        pytest.fail("no anomaly drawn")


def test_perlin_mask_any_size_and_augmenters() -> None:
    rng = np.random.default_rng(0)
    m = perlin_mask((392, 392), rng)  # 392 is not divisible by 16 or 32
    assert m.shape == (392, 392)
    assert len(AUGMENTERS) == 10
    tex = (np.random.default_rng(0).random((16, 16, 3)) * 255).astype(np.uint8)
    for aug in AUGMENTERS:
        out = aug(tex, np.random.default_rng(0))
        assert out.shape == tex.shape and out.dtype == np.uint8


def test_texture_folder(tmp_path) -> None:
    _img(tmp_path / "tex" / "banded" / "a.jpg", size=(30, 30))
    bank = TextureBank(tmp_path / "tex")
    assert bank.source == "folder:1"
    assert bank.sample((12, 10), np.random.default_rng(0)).shape == (12, 10, 3)
    with pytest.raises(FileNotFoundError, match="holds no images"):
        (tmp_path / "none").mkdir()
        TextureBank(tmp_path / "none")


# -- few-shot / semi-supervised --------------------------------------------------------------------
def test_few_shot_selection_equals_python_random_seed_1() -> None:
    recs = [Record(f"/d/{c}/train/good/{i:03d}.png", c, "train", 0) for c in ("b", "a") for i in range(30)]
    random.seed(1)  # the official setup_seed(1), then random.sample per category in dataset order
    want = [
        p for c in ("b", "a") for p in random.sample(sorted(f"/d/{c}/train/good/{i:03d}.png" for i in range(30)), 4)
    ]
    got = [r.path for r in select_shots(recs, 4, seed=1)]
    assert got == want
    with pytest.raises(ValueError, match="fewer than"):
        select_shots(recs[:2], 4)


def test_22_augmentations_first_identity() -> None:
    x = torch.randn(3, 16, 16)
    aug = augment_22(x, shuffle=False)
    assert aug.shape == (NUM_AUGMENTATIONS, 3, 16, 16) and NUM_AUGMENTATIONS == 22
    assert torch.equal(aug[0], x)
    assert torch.allclose(aug[17], torch.flip(x, dims=[2]))  # horizontal flip
    assert torch.allclose(aug[18][0], 0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2])  # grey on normalised values
    assert torch.equal(aug[19], torch.rot90(x, 1, dims=(1, 2)))
    shuffled = augment_22(x, torch.Generator().manual_seed(0))
    assert sorted(float(a.sum()) for a in shuffled) == pytest.approx(sorted(float(a.sum()) for a in aug))


def test_semi_supervised_selection_and_paste() -> None:
    recs = [Record(f"/t/{c}/{i}.png", c, "test", 1, f"/m/{c}/{i}.png", "x") for c in ("a", "b") for i in range(5)]
    recs += [Record("/t/a/g.png", "a", "test", 0)]
    chosen = select_anomalies(recs, 2, seed=1)
    assert Counter(r.category for r in chosen) == {"a": 2, "b": 2}
    assert select_anomalies(recs, 2, seed=1) == chosen
    normal = np.zeros((20, 20, 3), np.float32)
    patch = np.ones((4, 6, 3), np.float32)
    pm = np.ones((4, 6), np.float32)
    img, mask = paste_anomaly(normal, patch, pm, np.random.default_rng(0))
    assert mask.sum() > 0 and np.all(img[mask == 1] == 1.0) and np.all(img[mask == 0] == 0.0)


# -- the embedded dataset and the image cache ------------------------------------------------------
def test_synthetic_dataset_deterministic_and_complete(tmp_path) -> None:
    from components.data.synthetic import generate_synthetic

    a = generate_synthetic(tmp_path / "a", seed=3, size=64, n_train=60, n_test_good=2, n_test_per_defect=1)
    b = generate_synthetic(tmp_path / "b", seed=3, size=64, n_train=60, n_test_good=2, n_test_per_defect=1)
    recs = mvtec_records(a)
    cats = Counter(r.category for r in recs if r.split == "train")
    assert len(cats) >= 3 and all(v >= 60 for v in cats.values())
    defects = {r.defect for r in recs if r.label == 1}
    assert {"scratch", "hole", "stain", "crack", "missing_hole"} <= defects
    for r in recs:
        rel = Path(r.path).relative_to(a)
        assert (a / rel).read_bytes() == (b / rel).read_bytes()
        if r.label == 1:
            m = np.asarray(Image.open(r.mask_path))
            assert set(np.unique(m)) == {0, 255}
    assert not (tmp_path / "a.partial").exists()


def test_image_cache_hits_and_equals_uncached(tmp_path) -> None:
    from components.data.cache import ImageCache

    p = _img(tmp_path / "x.png", size=(40, 30), value=77)
    tf = ImageTransform(32, 28)
    cache = ImageCache(tmp_path / "cache")
    plain = ImageDataset([Record(str(p), "c", "train", 0)], tf)[0]["image"]
    cached = ImageDataset([Record(str(p), "c", "train", 0)], tf, cache=cache)
    assert torch.equal(cached[0]["image"], plain) and torch.equal(cached[0]["image"], plain)
    assert cache.misses == 1 and cache.hits == 1
    _img(p, size=(40, 30), value=200)  # new content → new key
    assert not torch.equal(cached[0]["image"], plain)
    assert cache.misses == 2


def test_decode_rgb_applies_the_file_policy_in_memory(tmp_path) -> None:
    from components.data.io import ImageReadError, decode_rgb, read_rgb

    deep = np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16  # 16-bit grey, up to 65520
    Image.fromarray(deep).save(tmp_path / "deep.png")
    from_memory = np.asarray(decode_rgb((tmp_path / "deep.png").read_bytes(), "deep.png"))
    assert np.array_equal(from_memory, np.asarray(read_rgb(tmp_path / "deep.png")))
    assert from_memory[-1, -1, 0] == round(65520 / 65535 * 255)  # scaled, not clipped at 255
    with pytest.raises(ImageReadError, match="upload: not a readable image"):
        decode_rgb(b"junk", "upload")
    with pytest.raises(ImageReadError, match="empty"):
        decode_rgb(b"", "upload")
