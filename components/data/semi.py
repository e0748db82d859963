"""Semi-supervised setting (method spec §13.7): a few real anomalies pasted into normal images.

``select_anomalies`` picks N anomalous *test* images with masks per category (seeded); they are
removed from the test split by the evaluation. Their masked regions are cut out, augmented (flip,
right-angle rotation, scale 0.75–1.25) and pasted at random positions into normal training images,
masks transferred. These samples replace the Perlin/texture pseudo anomaly with probability
``paste_prob`` in the segmentation-head batches [INFER: seed, ops and probability are unstated].
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from components.data import batch as keys
from components.data.datasets import Record
from components.data.io import read_mask, read_rgb

__all__ = ["SemiSupervisedDataset", "paste_anomaly", "select_anomalies"]


def select_anomalies(records: Sequence[Record], n: int, seed: int = 1) -> list[Record]:
    """N anomalous test images (with masks) per category, drawn with a seeded ``random.Random``."""
    rng = random.Random(seed)
    by_cat: dict[str, list[Record]] = {}
    for r in records:
        if r.split == "test" and r.label == 1 and r.mask_path:
            by_cat.setdefault(r.category, []).append(r)
    chosen: list[Record] = []
    for _cat, recs in by_cat.items():
        ordered = sorted(recs, key=lambda r: r.path)
        chosen += rng.sample(ordered, min(n, len(ordered)))
    return chosen


def paste_anomaly(
    normal: np.ndarray, patch: np.ndarray, patch_mask: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Paste an augmented anomaly cut-out into ``normal`` (float H×W×3 in [0, 1]) → (image, mask H×W)."""
    if rng.random() < 0.5:
        patch, patch_mask = patch[:, ::-1], patch_mask[:, ::-1]
    k = int(rng.integers(0, 4))
    patch, patch_mask = np.rot90(patch, k), np.rot90(patch_mask, k)
    s = float(rng.uniform(0.75, 1.25))
    h, w = normal.shape[:2]
    ph = max(1, min(h, round(patch.shape[0] * s)))
    pw = max(1, min(w, round(patch.shape[1] * s)))
    patch = cv2.resize(np.ascontiguousarray(patch), (pw, ph), interpolation=cv2.INTER_LINEAR)
    patch_mask = cv2.resize(np.ascontiguousarray(patch_mask), (pw, ph), interpolation=cv2.INTER_NEAREST) > 0.5
    y, x = int(rng.integers(0, h - ph + 1)), int(rng.integers(0, w - pw + 1))
    out = normal.copy()
    mask = np.zeros((h, w), np.float32)
    region = out[y : y + ph, x : x + pw]
    region[patch_mask] = patch[patch_mask]
    mask[y : y + ph, x : x + pw][patch_mask] = 1.0
    return out, mask


class SemiSupervisedDataset(Dataset):
    """Wraps an :class:`ImageDataset`; some pseudo anomalies become pasted real anomalies."""

    def __init__(self, base: Any, anomalies: Sequence[Record], transform: Any, seed: int = 1, paste_prob: float = 0.5) -> None:
        self.base = base
        self.paste_prob = paste_prob
        self.seed = seed
        self.epoch = 0
        self.cutouts: list[tuple[np.ndarray, np.ndarray]] = []
        for r in anomalies:
            unit = transform.to_unit(read_rgb(r.path)).permute(1, 2, 0).numpy()
            m = transform.mask(read_mask(r.mask_path))[0].numpy() > 0.5
            if not m.any():
                continue
            ys, xs = np.nonzero(m)
            y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
            self.cutouts.append((unit[y0:y1, x0:x1].copy(), m[y0:y1, x0:x1].astype(np.float32)))
        if not self.cutouts:
            raise ValueError("semi-supervised: none of the selected anomalies has a non-empty mask.")

    def set_epoch(self, epoch: int) -> None:
        """Forward the epoch to the base dataset."""
        self.epoch = int(epoch)
        self.base.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.base[index]
        rng = np.random.default_rng([self.seed, 7, self.epoch, index])
        if rng.random() < self.paste_prob:
            unit = self.base.transform.denormalize(item[keys.IMAGE]).permute(1, 2, 0).numpy()
            patch, pm = self.cutouts[int(rng.integers(0, len(self.cutouts)))]
            img, mask = paste_anomaly(unit, patch, pm, rng)
            item[keys.ANOMALY_IMAGE] = self.base.transform.normalize(torch.from_numpy(img).permute(2, 0, 1).float())
            item[keys.ANOMALY_MASK] = torch.from_numpy(mask)[None]
        return item
