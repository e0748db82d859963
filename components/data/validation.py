"""Validation split for hyper-parameter search: never the test set by default.

Per category a seeded fraction of the *training* normals is held out; anomalies are the real
ones when given (semi-supervised setting), otherwise drawn defects (scratches, holes, stains,
cracks, particles) painted onto held-out normals — a different generator from the Perlin/texture
pseudo anomalies the model is trained with, so the search does not reward fitting the generator.
"""

from __future__ import annotations

import os
import random
import shutil
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from components.data.datasets import Record
from components.data.io import read_rgb
from components.data.synthetic import DEFECT_PAINTERS

__all__ = ["make_validation_split"]


def make_validation_split(
    records: Sequence[Record],
    fraction: float,
    out_dir: str | os.PathLike,
    seed: int = 0,
    real_anomalies: Sequence[Record] = (),
) -> tuple[list[Record], list[Record]]:
    """Return (training records without the held-out images, validation records).

    Drawn anomalies are written under ``out_dir`` (rebuilt from scratch, deterministic).
    """
    out_dir = Path(out_dir)
    shutil.rmtree(out_dir, ignore_errors=True)
    rng_py = random.Random(seed)
    train_keep: list[Record] = []
    val: list[Record] = []
    by_cat: dict[str, list[Record]] = {}
    for r in records:
        if r.split == "train" and r.label == 0:
            by_cat.setdefault(r.category, []).append(r)
    painters = list(DEFECT_PAINTERS.items())
    for ci, (cat, recs) in enumerate(by_cat.items()):
        recs = sorted(recs, key=lambda r: r.path)
        order = list(range(len(recs)))
        rng_py.shuffle(order)
        n_val = max(1, round(len(recs) * fraction))
        if len(recs) - n_val < 1:
            msg = f"category {cat!r}: {len(recs)} training images cannot spare a validation split."
            raise ValueError(msg)
        held = [recs[i] for i in order[:n_val]]
        train_keep += [recs[i] for i in sorted(order[n_val:])]
        val += [Record(r.path, cat, "val", 0) for r in held]
        reals = [r for r in real_anomalies if r.category == cat]
        if reals:
            val += [Record(r.path, cat, "val", 1, r.mask_path, r.defect) for r in reals]
            continue
        rng = np.random.default_rng([seed, ci])
        for k, r in enumerate(held):
            name, paint = painters[k % len(painters)]
            img = np.asarray(read_rgb(r.path))
            side = min(img.shape[:2])
            square = cv2.resize(img, (side, side), interpolation=cv2.INTER_AREA)
            drawn, mask = paint(square, rng, {})
            drawn = cv2.resize(drawn, (img.shape[1], img.shape[0]), interpolation=cv2.INTER_LINEAR)
            mask = cv2.resize(mask.astype(np.uint8) * 255, (img.shape[1], img.shape[0]), interpolation=cv2.INTER_NEAREST)
            d = out_dir / cat.replace("/", "_")
            d.mkdir(parents=True, exist_ok=True)
            ip, mp = d / f"{k:04d}_{name}.png", d / f"{k:04d}_{name}_mask.png"
            cv2.imwrite(str(ip), cv2.cvtColor(drawn, cv2.COLOR_RGB2BGR))
            cv2.imwrite(str(mp), mask)
            val.append(Record(str(ip), cat, "val", 1, str(mp), name))
    return train_keep, val
