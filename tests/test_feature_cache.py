"""Encoder-feature cache: same losses as the encoder path, keyed by content, clean fallback."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_model
from PIL import Image

from components.data.datasets import ImageDataset
from components.data.readers import mvtec_records
from components.data.synthesis import PseudoAnomalySynthesizer, TextureBank
from components.data.synthetic import generate_synthetic
from components.data.transforms import ImageTransform
from components.engine.feature_cache import CachedFeatureDataset, CacheSettings, FeatureCache, cached_dataset
from components.engine.losses import DiceLoss, NormalPatternLoss
from components.engine.training import TrainConfig, seed_everything, train


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("d") / "s"
    root = generate_synthetic(out, size=64, n_train=8, n_test_good=1, n_test_per_defect=1, categories=["brick"])
    recs = [r for r in mvtec_records(root) if r.split == "train"]
    tf = ImageTransform(64, 56)
    bank_dir = tmp_path_factory.mktemp("bank")
    synth = PseudoAnomalySynthesizer(TextureBank(None, 64), empty_prob=0.0, rotate_prob=0.0)
    bank = []
    for i, r in enumerate(recs):
        entries = []
        for c in range(2):
            unit = tf.to_unit(Image.open(r.path).convert("RGB")).permute(1, 2, 0).numpy()
            aug, mask, _ = synth(unit, np.random.default_rng([i, c]))
            ip, mp = bank_dir / f"{i}_{c}.png", bank_dir / f"{i}_{c}_mask.png"
            Image.fromarray((aug * 255 + 0.5).astype(np.uint8)).save(ip)
            Image.fromarray((mask * 255).astype(np.uint8), "L").save(mp)
            entries.append((str(ip), str(mp)))
        bank.append(entries)
    return recs, tf, bank


def _load(tf):
    return lambda p: tf(Image.open(p).convert("RGB"))


def _load_bank(tf):
    return lambda p: tf.normalize(torch.from_numpy(np.asarray(Image.open(p), dtype=np.float32) / 255).permute(2, 0, 1))


def _train(ds, epochs=2):
    seed_everything(1)
    model = tiny_model(image_size=56)
    cfg = TrainConfig(epochs=epochs, batch_size=4, warmup_iters=1, progress=False)
    return model, train(model, ds, cfg, NormalPatternLoss(coherence="soft"), DiceLoss()).history


def test_cached_training_gives_the_same_losses(small_data, tmp_path) -> None:
    recs, tf, bank = small_data
    _, plain = _train(ImageDataset(recs, tf, bank=bank))
    seed_everything(1)
    model = tiny_model(image_size=56)
    base = ImageDataset(recs, tf, bank=bank)
    normal = FeatureCache(tmp_path, model, [r.path for r in recs], _load(tf), (64, 56))
    flat = [img for entries in bank for img, _ in entries]
    bank_cache = FeatureCache(tmp_path, model, flat, _load_bank(tf), ("bank", 64, 56))
    assert normal.array.dtype == np.float16 and normal.array.shape[:2] == (8, 3)  # F_Q + 2 groups
    assert isinstance(normal.array, np.memmap)
    _, cached = _train(CachedFeatureDataset(base, normal, bank_cache, copies=2))
    assert len(plain) == len(cached) == 2
    for a, b in zip(plain, cached):
        for k in ("total", "cos", "coherence", "seg"):
            assert abs(a[k] - b[k]) <= 1e-3 * abs(a[k]), (k, a[k], b[k])


def _step_losses(ds, steps: int = 8) -> list[float]:
    seed_everything(1)
    model = tiny_model(image_size=56)
    cfg = TrainConfig(epochs=steps // 2, batch_size=4, warmup_iters=1, progress=False, log_every=1)
    seen: list[float] = []
    train(
        model, ds, cfg, NormalPatternLoss(coherence="soft"), DiceLoss(), on_iteration=lambda x: seen.append(x["total"])
    )
    return seen


def test_an_fp32_cache_trains_the_step_without_the_encoder_to_rounding(small_data, tmp_path) -> None:
    """train.feature_cache_dtype: fp32: the step skips the encoder (bench/train_step.py: 0.7x at
    ViT-S@224) and its losses equal the uncached step's to 1e-6 over 8 steps (issue 23)."""
    recs, tf, bank = small_data
    plain = _step_losses(ImageDataset(recs, tf, bank=bank))
    seed_everything(1)
    model = tiny_model(image_size=56)
    fp32 = CacheSettings(dtype="fp32")
    normal = FeatureCache(tmp_path, model, [r.path for r in recs], _load(tf), (64, 56), fp32)
    flat = [img for entries in bank for img, _ in entries]
    bank_cache = FeatureCache(tmp_path, model, flat, _load_bank(tf), ("bank", 64, 56), fp32)
    assert normal.array.dtype == np.float32
    fp16 = FeatureCache(tmp_path, model, [r.path for r in recs], _load(tf), (64, 56))
    assert fp16.key != normal.key and fp16.array.dtype == np.float16  # the dtype is part of the key
    cached = _step_losses(CachedFeatureDataset(ImageDataset(recs, tf, bank=bank), normal, bank_cache, copies=2))
    assert len(plain) == len(cached) == 8
    assert max(abs(a - b) for a, b in zip(plain, cached)) <= 1e-6, (plain, cached)


def test_cache_is_reused_and_invalidated(small_data, tmp_path) -> None:
    recs, tf, _ = small_data
    torch.manual_seed(0)
    model = tiny_model(image_size=56)
    paths = [r.path for r in recs]
    first = FeatureCache(tmp_path, model, paths, _load(tf), (64, 56))
    again = FeatureCache(tmp_path, model, paths, _load(tf), (64, 56))
    assert first.built and not again.built and first.key == again.key
    other_size = FeatureCache(tmp_path, model, paths, _load(tf), (70, 56))
    assert other_size.key != first.key
    with torch.no_grad():
        model.encoder.vit.blocks[0].mlp.fc1.weight.add_(1e-3)
    assert FeatureCache(tmp_path, model, paths, _load(tf), (64, 56)).key != first.key
    assert not list(tmp_path.glob("*.partial"))


def test_on_the_fly_synthesis_falls_back_for_anomalies(small_data, tmp_path) -> None:
    recs, tf, _ = small_data
    model = tiny_model(image_size=56)
    synth = PseudoAnomalySynthesizer(TextureBank(None, 64), empty_prob=0.0)
    base = ImageDataset(recs, tf, synthesizer=synth)
    ds = CachedFeatureDataset(base, FeatureCache(tmp_path, model, [r.path for r in recs], _load(tf), (64, 56)))
    item = ds[0]
    assert "features" in item and "anomaly_image" in item and "anomaly_features" not in item
    ds.set_epoch(1)
    assert not torch.equal(ds[0]["anomaly_image"], item["anomaly_image"])  # changes every epoch


def test_cached_dataset_wraps_images_and_bank(small_data, tmp_path) -> None:
    recs, tf, bank = small_data
    torch.manual_seed(0)
    model = tiny_model(image_size=56)
    ds = cached_dataset(model, ImageDataset(recs, tf, bank=bank), tmp_path, CacheSettings("cpu"))
    assert isinstance(ds, CachedFeatureDataset) and len(ds) == len(recs) and ds.copies == 2
    ds.set_epoch(1)
    item = ds[3]
    with torch.no_grad():
        fused, groups, _ = model.encode(tf(Image.open(recs[3].path).convert("RGB"))[None])
        want = torch.stack([fused, *groups], dim=1)[0]
        aug = _load_bank(tf)(bank[3][1][0])[None]  # epoch 1 → copy 1 of the bank
        fused_a, groups_a, _ = model.encode(aug)
        want_a = torch.stack([fused_a, *groups_a], dim=1)[0]
    assert torch.allclose(item["features"], want, atol=2e-3 * float(want.abs().max()))  # fp16 storage
    assert torch.allclose(item["anomaly_features"], want_a, atol=2e-3 * float(want_a.abs().max()))
    mask = np.asarray(Image.open(bank[3][1][1]), dtype=np.float32) / 255
    assert torch.equal(item["anomaly_mask"][0], torch.from_numpy(mask))
