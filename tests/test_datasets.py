"""Each setting's dataset item: keys, shapes and values against closed-form expectations."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from components.data import batch as keys
from components.data.datasets import ImageDataset, Record
from components.data.fewshot import NUM_AUGMENTATIONS, FewShotDataset
from components.data.semi import SemiSupervisedDataset
from components.data.synthesis import PseudoAnomalySynthesizer, TextureBank
from components.data.transforms import ImageTransform

TF = ImageTransform(32, 28)


def _write(path: Path, arr: np.ndarray, mode: str | None = None) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, mode).save(path)
    return str(path)


@pytest.fixture
def records(tmp_path) -> list[Record]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(3):
        img = (rng.random((32, 32, 3)) * 255).astype(np.uint8)
        out.append(Record(_write(tmp_path / f"n{i}.png", img), "c", "train", 0))
    mask = np.zeros((32, 32), np.uint8)
    mask[8:20, 10:22] = 255
    anomalous = np.full((32, 32, 3), 250, np.uint8)
    out.append(
        Record(_write(tmp_path / "a.png", anomalous), "c", "test", 1, _write(tmp_path / "a_m.png", mask, "L"), "x")
    )
    return out


def test_image_item_is_normalised_crop_with_mask(records) -> None:
    ds = ImageDataset(records, TF)
    item = ds[3]
    assert set(item) == {keys.IMAGE, keys.MASK, keys.LABEL, keys.PATH, keys.CATEGORY}
    assert item[keys.IMAGE].shape == (3, 28, 28) and item[keys.MASK].shape == (1, 28, 28)
    want = (250 / 255 - torch.tensor(TF.mean)) / torch.tensor(TF.std)  # a flat image: closed form
    assert torch.allclose(item[keys.IMAGE].mean(dim=(1, 2)), want, atol=1e-5)
    assert float(item[keys.MASK].max()) == 1.0 and float(item[keys.MASK].min()) == 0.0
    assert item[keys.LABEL] == 1 and item[keys.PATH] == records[3].path
    assert float(ds[0][keys.MASK].sum()) == 0.0  # normal images: an empty mask


def test_synthesis_item_changes_inside_its_mask_only(records) -> None:
    synth = PseudoAnomalySynthesizer(TextureBank(None, 64), empty_prob=0.0, rotate_prob=0.0)
    ds = ImageDataset(records[:3], TF, synth, seed=5)
    item = ds[1]
    mask = item[keys.ANOMALY_MASK]
    assert mask.shape == (1, 28, 28) and set(torch.unique(mask).tolist()) <= {0.0, 1.0} and mask.sum() > 0
    outside = mask[0] == 0
    assert torch.allclose(item[keys.ANOMALY_IMAGE][:, outside], item[keys.IMAGE][:, outside], atol=1e-5)
    assert torch.equal(ds[1][keys.ANOMALY_IMAGE], item[keys.ANOMALY_IMAGE])  # same (seed, epoch, index)
    ds.set_epoch(1)
    assert not torch.equal(ds[1][keys.ANOMALY_IMAGE], item[keys.ANOMALY_IMAGE])  # a new draw per epoch


def test_bank_item_cycles_copies_by_epoch(records, tmp_path) -> None:
    bank = []
    for i in range(3):
        entries = []
        for c in range(2):
            img = np.full((28, 28, 3), 40 * (c + 1), np.uint8)
            mask = np.zeros((28, 28), np.uint8)
            mask[c : c + 4, :] = 255
            entries.append((_write(tmp_path / f"b{i}{c}.png", img), _write(tmp_path / f"b{i}{c}_m.png", mask, "L")))
        bank.append(entries)
    ds = ImageDataset(records[:3], TF, bank=bank)
    for epoch, c in ((0, 0), (1, 1), (2, 0)):
        ds.set_epoch(epoch)
        item = ds[2]
        want = (40 * (c + 1) / 255 - torch.tensor(TF.mean)) / torch.tensor(TF.std)
        assert torch.allclose(item[keys.ANOMALY_IMAGE][:, 0, 0], want, atol=1e-5)
        assert float(item[keys.ANOMALY_MASK].sum()) == 4 * 28 and float(item[keys.ANOMALY_MASK][0, c, 0]) == 1.0


def test_few_shot_dataset_has_22_augmentations_per_shot(records) -> None:
    synth = PseudoAnomalySynthesizer(TextureBank(None, 64), empty_prob=0.0)
    base = ImageDataset(records[:2], TF, synth)
    ds = FewShotDataset(base, seed=1)
    assert len(ds) == 2 * NUM_AUGMENTATIONS
    originals = {r.path: TF.normalize(base.unit(r.path)) for r in records[:2]}
    identity = [i for i in range(len(ds)) if torch.equal(ds.images[i], originals[ds[i][keys.PATH]])]
    assert len(identity) == 2  # the identity augmentation, once per shot, somewhere after the shuffle
    item = ds[5]
    assert item[keys.LABEL] == 0 and float(item[keys.MASK].sum()) == 0.0
    assert item[keys.ANOMALY_IMAGE].shape == (3, 28, 28) and item[keys.ANOMALY_MASK].sum() > 0
    again = FewShotDataset(ImageDataset(records[:2], TF, synth), seed=1)
    assert torch.equal(again.images, ds.images)  # seeded


def test_semi_supervised_pastes_the_real_anomaly(records) -> None:
    base = ImageDataset(records[:3], TF)
    ds = SemiSupervisedDataset(base, [records[3]], TF, seed=1, paste_prob=1.0)
    assert len(ds.cutouts) == 1
    patch, patch_mask = ds.cutouts[0]
    assert patch_mask.shape == patch.shape[:2] and patch_mask.all()  # the mask's bounding box, fully inside
    assert np.allclose(patch, 250 / 255, atol=1e-6)
    item = ds[0]
    pasted = item[keys.ANOMALY_MASK][0] == 1
    assert 0.5 * patch_mask.size <= int(pasted.sum()) <= 1.6 * patch_mask.size  # scale 0.75–1.25
    pixels = TF.denormalize(item[keys.ANOMALY_IMAGE])[:, pasted]
    assert torch.allclose(pixels, torch.full_like(pixels, 250 / 255), atol=1e-5)  # the real anomaly's colour
    none = SemiSupervisedDataset(base, [records[3]], TF, seed=1, paste_prob=0.0)
    assert keys.ANOMALY_IMAGE not in none[0]
