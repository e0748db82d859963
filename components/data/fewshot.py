"""Few-shot setting (method spec §10): the official shots and the 22 fixed augmentations.

Shots: ``random.sample(sorted train paths of the category, k)`` category by category in dataset
order, from one Python ``random`` stream seeded once (the official ``setup_seed(1)``), so the same
seed and lists give the official shots. Each shot's normalised tensor becomes 22 images: the
original, 8 rotations (±π/16, ±π/8, ±3π/16, ±π/4), 8 translations (±0.2, ±0.1 in grid units),
a horizontal flip, a greyscale copy computed on the *normalised* channels (an official quirk) and
the 3 right-angle rotations; they are shuffled once with ``torch.randperm``.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from components.data import batch as keys
from components.data.datasets import Record

__all__ = ["NUM_AUGMENTATIONS", "FewShotDataset", "augment_22", "select_shots"]

NUM_AUGMENTATIONS = 22
ROTATIONS = (-math.pi / 4, -3 * math.pi / 16, -math.pi / 8, -math.pi / 16,
             math.pi / 16, math.pi / 8, 3 * math.pi / 16, math.pi / 4)  # fmt: skip
TRANSLATIONS = ((0.2, 0.2), (-0.2, 0.2), (-0.2, -0.2), (0.2, -0.2), (0.1, 0.1), (-0.1, 0.1), (-0.1, -0.1), (0.1, -0.1))


def select_shots(records: Sequence[Record], k: int, seed: int = 1) -> list[Record]:
    """k training images per category, drawn as the official code draws them."""
    rng = random.Random(seed)
    by_cat: dict[str, list[Record]] = {}
    for r in records:
        if r.split == "train" and r.label == 0:
            by_cat.setdefault(r.category, []).append(r)
    shots: list[Record] = []
    for cat, recs in by_cat.items():
        ordered = sorted(recs, key=lambda r: r.path)
        if len(ordered) < k:
            msg = f"category {cat!r} has {len(ordered)} training images, fewer than k={k} shots."
            raise ValueError(msg)
        chosen = rng.sample([r.path for r in ordered], k)
        shots += [next(r for r in ordered if r.path == p) for p in chosen]
    return shots


def _affine(img: torch.Tensor, theta: list[list[float]]) -> torch.Tensor:
    mat = torch.tensor([theta], dtype=img.dtype, device=img.device)
    grid = F.affine_grid(mat, list(img.shape), align_corners=False)
    return F.grid_sample(img, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def augment_22(image: torch.Tensor, generator: torch.Generator | None = None, shuffle: bool = True) -> torch.Tensor:
    """3×H×W normalised image → 22×3×H×W (first = the identity when ``shuffle`` is False)."""
    x = image.unsqueeze(0)
    out = [x]
    for a in ROTATIONS:
        out.append(_affine(x, [[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0]]))
    for tx, ty in TRANSLATIONS:
        out.append(_affine(x, [[1.0, 0.0, tx], [0.0, 1.0, ty]]))
    out.append(torch.flip(x, dims=[3]))
    grey = 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]  # on normalised values (quirk)
    out.append(grey.repeat(1, 3, 1, 1))
    for k in (1, 2, 3):
        out.append(torch.rot90(x, k, dims=(2, 3)))
    stack = torch.cat(out, dim=0)
    if shuffle:
        stack = stack[torch.randperm(stack.shape[0], generator=generator)]
    return stack


class FewShotDataset(Dataset):
    """The fixed augmented few-shot set built from an :class:`ImageDataset` of the shots.

    With a synthesizer on the base dataset, each item also gets a pseudo anomaly, synthesised on
    the de-normalised augmented image (clamped to [0, 1]).
    """

    def __init__(self, base: Any, seed: int = 1) -> None:
        gen = torch.Generator().manual_seed(seed)
        images, meta = [], []
        for i in range(len(base.records)):
            rec = base.records[i]
            unit = base.unit(rec.path)
            aug = augment_22(base.transform.normalize(unit), gen)
            images.append(aug)
            meta += [(rec.path, rec.category)] * aug.shape[0]
        self.images = torch.cat(images)
        self.meta = meta
        self.base = base
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the synthesis stream of an epoch."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> dict[str, Any]:
        img = self.images[index]
        item: dict[str, Any] = {
            keys.IMAGE: img,
            keys.LABEL: 0,
            keys.PATH: self.meta[index][0],
            keys.CATEGORY: self.meta[index][1],
            keys.MASK: torch.zeros(1, *img.shape[-2:]),
        }
        synth = getattr(self.base, "synthesizer", None)
        if synth is not None:
            unit = self.base.transform.denormalize(img).permute(1, 2, 0).numpy()
            rng = np.random.default_rng([self.base.seed, self.epoch, index])
            aug, mask, _ = synth(unit, rng)
            item[keys.ANOMALY_IMAGE] = self.base.transform.normalize(torch.from_numpy(aug).permute(2, 0, 1))
            item[keys.ANOMALY_MASK] = torch.from_numpy(mask)[None]
        return item
