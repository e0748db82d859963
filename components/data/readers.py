"""Dataset readers: every layout becomes a list of :class:`~components.data.datasets.Record`.

* :func:`mvtec_records` — MVTec-AD layout (also MPDD, BTAD, converted VisA, BSData and any custom
  tree): ``<cat>/train/good``, ``<cat>/test/<defect>``, ``<cat>/ground_truth/<defect>/<stem>_mask.png``
  (or ``<stem>.png``). Categories come from disk; ``order`` keeps an official order first.
* :func:`flat_records` — a folder of good images and one of bad images (optional masks and a
  separate normal test folder), the anomalib ``Folder`` idea.
* :func:`realiad_records` — Real-IAD per-category JSON splits (spec §2.3).
* :func:`convert_visa` — VisA raw download → MVTec layout with the official 1-class split CSV.
* :func:`validate_records` — decode every image, check masks (existence, size, binarity).
"""

from __future__ import annotations

import csv
import json
import os
import random
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from components.constants import DATASET_KINDS
from components.data.datasets import Record
from components.data.scan import DatasetError, ScanReport, link_ok, list_images, validate_records

__all__ = [
    "DATASET_KINDS",
    "MVTEC_CATEGORIES",
    "REALIAD_CATEGORIES",
    "VISA_CATEGORIES",
    "DatasetError",
    "ScanReport",
    "convert_visa",
    "flat_records",
    "mvtec_records",
    "realiad_records",
    "validate_records",
]


MVTEC_CATEGORIES = (
    "carpet", "grid", "leather", "tile", "wood", "bottle", "cable", "capsule", "hazelnut",
    "metal_nut", "pill", "screw", "toothbrush", "transistor", "zipper",
)  # fmt: skip
VISA_CATEGORIES = (
    "candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1", "macaroni2", "pcb1", "pcb2",
    "pcb3", "pcb4", "pipe_fryum",
)  # fmt: skip
REALIAD_CATEGORIES = (
    "audiojack", "bottle_cap", "button_battery", "end_cap", "eraser", "fire_hood", "mint", "mounts",
    "pcb", "phone_battery", "plastic_nut", "plastic_plug", "porcelain_doll", "regulator",
    "rolled_strip_base", "sim_card_set", "switch", "tape", "terminalblock", "toothbrush", "toy",
    "toy_brick", "transistor1", "usb", "usb_adaptor", "u_block", "vcpill", "wooden_beads",
    "woodstick", "zipper",
)  # fmt: skip


def _category_dirs(root: Path, report: ScanReport) -> list[Path]:
    if (root / "train").is_dir() or (root / "test").is_dir():
        return [root]
    dirs = [p for p in sorted(root.iterdir()) if link_ok(p, report)]
    return [p for p in dirs if p.is_dir() and ((p / "train").is_dir() or (p / "test").is_dir())]


def _find_mask(gt_dir: Path, stem: str) -> Path | None:
    for name in (f"{stem}_mask", stem):
        for ext in (".png", ".PNG", ".bmp", ".jpg", ".tif", ".tiff"):
            cand = gt_dir / f"{name}{ext}"
            if cand.is_file():
                return cand
    return None


def mvtec_records(
    root: str | os.PathLike,
    categories: Sequence[str] | None = None,
    order: Sequence[str] = (),
    require_masks: bool = True,
    report: ScanReport | None = None,
) -> list[Record]:
    """Index an MVTec-layout tree.

    Args:
        root: the tree (a folder of categories, or one category folder).
        categories: restrict to these (error if one is absent).
        order: official category order to keep first (parity); others follow alphabetically.
        require_masks: an anomalous image without a mask is an error (else: image-level only).
        report: collects skipped stray files and problems.
    """
    root = Path(root)
    report = report if report is not None else ScanReport()
    if not root.is_dir():
        msg = f"{root} is not a folder. Point --from at an MVTec-layout tree (<category>/train/good ...)."
        raise DatasetError(msg)
    report.root = report.root or root
    dirs = {d.name: d for d in _category_dirs(root, report)}
    if not dirs:
        msg = (
            f"{root}: no category found. Expected <category>/train/good/*.png and "
            "<category>/test/<defect>/*.png (MVTec-AD layout)."
        )
        raise DatasetError(msg)
    if categories:
        absent = [c for c in categories if c not in dirs]
        if absent:
            msg = f"{root}: categories {absent} not found (present: {sorted(dirs)})."
            raise DatasetError(msg)
        names = list(categories)
    else:
        names = [c for c in order if c in dirs] + sorted(c for c in dirs if c not in order)
    records: list[Record] = []
    for cat in names:
        cdir = dirs[cat]
        train_dir = cdir / "train" / "good"
        train = list_images(train_dir, report) if train_dir.is_dir() else []
        if not train:
            report.problems.append(f"{train_dir}: no training images (category {cat!r} is empty).")
        records += [Record(str(p), cat, "train", 0, "", "good") for p in train]
        test_root = cdir / "test"
        if not test_root.is_dir():
            continue
        for defect_dir in sorted(p for p in test_root.iterdir() if p.is_dir()):
            defect = defect_dir.name
            for img in list_images(defect_dir, report):
                if defect == "good":
                    records.append(Record(str(img), cat, "test", 0, "", "good"))
                    continue
                mask = _find_mask(cdir / "ground_truth" / defect, img.stem)
                if mask is None and require_masks:
                    report.problems.append(
                        f"{img}: no mask at {cdir / 'ground_truth' / defect / (img.stem + '_mask.png')}"
                    )
                records.append(Record(str(img), cat, "test", 1, str(mask or ""), defect))
    return records


def flat_records(
    normal_dir: str | os.PathLike,
    abnormal_dir: str | os.PathLike | None = None,
    mask_dir: str | os.PathLike | None = None,
    normal_test_dir: str | os.PathLike | None = None,
    category: str = "default",
    test_ratio: float = 0.2,
    seed: int = 0,
    report: ScanReport | None = None,
) -> list[Record]:
    """A folder of normal images (+ optional abnormal, mask and normal-test folders).

    Without ``normal_test_dir`` a seeded ``test_ratio`` of the normal images becomes the normal
    test split. Masks are matched by stem (``<stem>.png`` or ``<stem>_mask.png``); without a mask
    folder the anomalies are image-level only; with one, an anomalous image without its mask is
    listed in ``report.missing_masks`` (the caller decides whether that is a problem).
    """
    report = report if report is not None else ScanReport()
    normal_dir = Path(normal_dir)
    if not normal_dir.is_dir():
        msg = f"normal image folder {normal_dir} does not exist."
        raise DatasetError(msg)
    normals = list_images(normal_dir, report)
    if not normals:
        msg = f"{normal_dir}: no images (.png/.jpg/.bmp/.tif)."
        raise DatasetError(msg)
    if normal_test_dir:
        train, test_good = normals, list_images(Path(normal_test_dir), report)
    else:
        shuffled = list(normals)
        random.Random(seed).shuffle(shuffled)
        n_test = int(round(len(shuffled) * test_ratio)) if abnormal_dir else 0
        test_good, train = sorted(shuffled[:n_test]), sorted(shuffled[n_test:])
    records = [Record(str(p), category, "train", 0) for p in train]
    records += [Record(str(p), category, "test", 0) for p in test_good]
    if abnormal_dir:
        for img in list_images(Path(abnormal_dir), report):
            mask = _find_mask(Path(mask_dir), img.stem) if mask_dir else None
            if mask_dir and mask is None:
                report.missing_masks.append(f"{img}: no mask named {img.stem}.png or {img.stem}_mask.png in {mask_dir}")
            records.append(Record(str(img), category, "test", 1, str(mask or ""), "bad"))
    return records


def realiad_records(
    root: str | os.PathLike,
    json_dir: str | os.PathLike,
    categories: Sequence[str] | None = None,
    report: ScanReport | None = None,
) -> list[Record]:
    """Real-IAD: ``<root>/<cat>/...`` images with per-category ``<json_dir>/<cat>.json`` splits.

    Each JSON has ``train`` and ``test`` lists of entries with ``image_path``, ``anomaly_class``
    (``OK`` = normal) and ``mask_path`` for anomalies, relative to ``<root>/<cat>/`` (spec §2.3).
    """
    root, json_dir = Path(root), Path(json_dir)
    report = report if report is not None else ScanReport()
    if categories:
        cats = list(categories)
    else:
        present = {p.stem for p in json_dir.glob("*.json")}
        cats = [c for c in REALIAD_CATEGORIES if c in present] + sorted(present - set(REALIAD_CATEGORIES))
    if not cats:
        msg = f"{json_dir}: no <category>.json split files."
        raise DatasetError(msg)
    records: list[Record] = []
    for cat in cats:
        jpath = json_dir / f"{cat}.json"
        try:
            meta = json.loads(jpath.read_text())
        except (OSError, json.JSONDecodeError) as err:
            msg = f"{jpath}: cannot read the Real-IAD split ({err})."
            raise DatasetError(msg) from err
        for split in ("train", "test"):
            for entry in meta.get(split, []):
                normal = str(entry.get("anomaly_class", "OK")).upper() == "OK"
                img = root / cat / entry["image_path"]
                mask = str(root / cat / entry["mask_path"]) if not normal and entry.get("mask_path") else ""
                if not normal and not mask:
                    report.problems.append(f"{img}: anomalous entry without mask_path in {jpath}")
                defect = "good" if normal else str(entry.get("anomaly_class"))
                records.append(Record(str(img), cat, split, 0 if normal else 1, mask, defect))
    return records


def convert_visa(raw_root: str | os.PathLike, split_csv: str | os.PathLike, out_root: str | os.PathLike) -> Path:
    """Convert raw VisA to the MVTec layout with the official 1-class split CSV (spec §2.3).

    The CSV has columns ``object, split, label, image, mask`` (label ``normal``/``anomaly``; paths
    relative to ``raw_root``). Output: ``<cat>/train/good``, ``<cat>/test/{good,bad}``,
    ``<cat>/ground_truth/bad/<stem>.png`` with every non-zero mask value set to 255. Written to a
    temporary folder and renamed at the end, so an interrupted conversion leaves nothing trusted.
    """
    raw_root, out_root = Path(raw_root), Path(out_root)
    tmp = out_root.with_name(out_root.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    with Path(split_csv).open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    need = {"object", "split", "label", "image"}
    if not rows or need - set(rows[0]):
        msg = f"{split_csv}: expected columns {sorted(need | {'mask'})}."
        raise DatasetError(msg)
    for row in rows:
        cat, split, label = row["object"], row["split"], row["label"]
        src = raw_root / row["image"]
        if split == "train":
            dst = tmp / cat / "train" / "good" / src.name
        else:
            dst = tmp / cat / "test" / ("good" if label == "normal" else "bad") / src.name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if not src.is_file():
            msg = f"{src}: listed in {split_csv} but missing. Re-extract the VisA archive."
            raise DatasetError(msg)
        shutil.copyfile(src, dst)
        if split != "train" and label != "normal" and row.get("mask"):
            msrc = raw_root / row["mask"]
            mdst = tmp / cat / "ground_truth" / "bad" / (Path(row["image"]).stem + ".png")
            mdst.parent.mkdir(parents=True, exist_ok=True)
            arr = np.asarray(Image.open(msrc))
            if arr.ndim == 3:
                arr = arr.max(axis=-1)
            Image.fromarray(((arr > 0) * 255).astype(np.uint8), "L").save(mdst)
    if out_root.exists():
        shutil.rmtree(out_root)
    os.replace(tmp, out_root)
    return out_root
