"""Sample records, the manifest file and the torch Dataset used for training and evaluation.

A manifest (``data/prepared/<name>/manifest.csv``) has one row per image with the columns
``path, category, split, label, mask_path, defect`` (label 0 normal, 1 anomalous; split train/test;
paths absolute or relative to the manifest's folder). Every reader produces these rows, so the
training and evaluation code never depends on a dataset's layout.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from components.files import atomic_write_text
from components.data import batch as keys
from components.data.io import read_mask, read_rgb
from components.data.synthesis import PseudoAnomalySynthesizer
from components.data.transforms import ImageTransform

__all__ = ["MANIFEST_COLUMNS", "ImageDataset", "Record", "read_manifest", "write_manifest"]

MANIFEST_COLUMNS = ("path", "category", "split", "label", "mask_path", "defect")


@dataclass(frozen=True)
class Record:
    """One image: where it is, its category and split, its label and (optional) mask."""

    path: str
    category: str
    split: str  # "train" or "test"
    label: int  # 0 normal, 1 anomalous
    mask_path: str = ""
    defect: str = "good"


def write_manifest(path: str | os.PathLike, records: Sequence[Record]) -> None:
    """Write records as CSV atomically (temporary file, then rename)."""
    lines: list[str] = []

    class _Sink:
        def write(self, s: str) -> None:
            lines.append(s)

    writer = csv.DictWriter(_Sink(), fieldnames=list(MANIFEST_COLUMNS), lineterminator="\n")
    writer.writeheader()
    for r in records:
        writer.writerow(asdict(r))
    atomic_write_text(path, "".join(lines))


def read_manifest(path: str | os.PathLike) -> list[Record]:
    """Read a manifest; relative paths are resolved against the manifest's folder (and normalised,
    so a workspace-relative manifest gives workspace-relative paths: ``data/raw/...``)."""
    path = Path(path)
    if not path.is_file():
        msg = f"manifest {path} not found: run `inpformer prepare` first."
        raise FileNotFoundError(msg)
    base = path.parent
    out = []
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        missing = set(MANIFEST_COLUMNS[:5]) - set(reader.fieldnames or [])
        if missing:
            msg = f"{path}: missing columns {sorted(missing)} (expected {list(MANIFEST_COLUMNS)})."
            raise ValueError(msg)
        for row in reader:
            p = row["path"]
            m = row.get("mask_path") or ""
            out.append(
                Record(
                    path=p if os.path.isabs(p) else os.path.normpath(base / p),
                    category=row["category"],
                    split=row["split"],
                    label=int(row["label"]),
                    mask_path=m if (not m or os.path.isabs(m)) else os.path.normpath(base / m),
                    defect=row.get("defect") or ("good" if int(row["label"]) == 0 else "anomaly"),
                )
            )
    return out


class ImageDataset(Dataset):
    """Records → dicts of tensors for the engine.

    Each item: ``image`` (3×C×C normalised), ``mask`` (1×C×C), ``label``, ``path``, ``category``;
    with a synthesizer also ``anomaly_image`` and ``anomaly_mask`` (binary, 1×C×C). The synthesis
    RNG is seeded from (seed, epoch, index) so runs and resumed runs draw the same anomalies.

    Args:
        records: the samples.
        transform: resize/crop/normalise.
        synthesizer: pseudo-anomaly generator (training of the ++ head), or None.
        seed: base seed for synthesis.
        cache: optional :class:`~components.data.cache.ImageCache` of resized [0, 1] crops.
        bank: optional fixed pseudo-anomaly bank: a list per record index of (image path, mask path);
            epoch e uses entry e mod len (instead of on-the-fly synthesis).
    """

    def __init__(
        self,
        records: Sequence[Record],
        transform: ImageTransform,
        synthesizer: PseudoAnomalySynthesizer | None = None,
        seed: int = 0,
        cache: Any = None,
        bank: Sequence[Sequence[tuple[str, str]]] | None = None,
    ) -> None:
        if not records:
            raise ValueError("the dataset is empty: no images matched the requested split/categories.")
        self.records = list(records)
        self.transform = transform
        self.synthesizer = synthesizer
        self.seed = int(seed)
        self.epoch = 0
        self.cache = cache
        self.bank = bank

    def set_epoch(self, epoch: int) -> None:
        """Select the synthesis stream of an epoch."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.records)

    def unit(self, path: str) -> torch.Tensor:
        """The [0, 1] resized crop 3×C×C of ``path`` (cached when a cache is set)."""
        if self.cache is not None:
            return self.cache.get(path, self.transform, lambda: self.transform.to_unit(read_rgb(path)))
        return self.transform.to_unit(read_rgb(path))

    def __getitem__(self, index: int) -> dict[str, Any]:
        rec = self.records[index]
        unit = self.unit(rec.path)
        item: dict[str, Any] = {
            keys.IMAGE: self.transform.normalize(unit),
            keys.LABEL: rec.label,
            keys.PATH: rec.path,
            keys.CATEGORY: rec.category,
            keys.MASK: self.transform.mask(read_mask(rec.mask_path) if rec.mask_path else None),  # sizes checked at prepare
        }
        if self.bank is not None:
            entries = self.bank[index]
            img_path, mask_path = entries[self.epoch % len(entries)]
            aug = torch.from_numpy(np.asarray(read_rgb(img_path), dtype=np.float32) / 255.0).permute(2, 0, 1)
            mask = torch.from_numpy(np.asarray(read_mask(mask_path), dtype=np.float32) / 255.0)[None]
            item[keys.ANOMALY_IMAGE] = self.transform.normalize(aug)
            item[keys.ANOMALY_MASK] = mask
        elif self.synthesizer is not None:
            rng = np.random.default_rng([self.seed, self.epoch, index])
            arr = unit.permute(1, 2, 0).numpy()
            aug, mask, _ = self.synthesizer(arr, rng)
            item[keys.ANOMALY_IMAGE] = self.transform.normalize(torch.from_numpy(aug).permute(2, 0, 1))
            item[keys.ANOMALY_MASK] = torch.from_numpy(mask)[None]
        return item
