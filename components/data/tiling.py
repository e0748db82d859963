"""Tiles of the ``tile`` geometry for training: each training image becomes the overlapping tiles
:meth:`~components.data.transforms.ImageTransform.tiles` cuts it into, written once as PNG files
keyed by the image's bytes, the box and the EXIF-upright pixel policy (a changed image or tile
setting never reuses an old tile). Training, the pseudo-anomaly bank and the feature cache then
treat a tile as any image; scoring stitches the tiles' maps back (:mod:`components.scoring.tiling`).
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from components.data.cache import CACHE_FORMAT
from components.data.datasets import Record
from components.data.io import read_mask, read_rgb
from components.data.transforms import ImageTransform
from components.files import atomic_write_bytes, file_digest

__all__ = ["tile_records"]

logger = logging.getLogger(__name__)

TILE_HASH = "blake2b"
TILE_PNG_COMPRESSION = 1  # fast writes; tiles are a cache, regenerated from the images


def tile_records(records: Sequence[Record], transform: ImageTransform, folder: str | os.PathLike) -> list[Record]:
    """``records`` with every image larger than one tile replaced by its tiles (same category, split,
    label and defect; a mask is tiled with its image). Without the ``tile`` geometry: unchanged."""
    if not transform.tiled:
        return list(records)
    folder = Path(folder)
    out: list[Record] = []
    for rec in records:
        img = read_rgb(rec.path)
        boxes = transform.tiles(img.size)
        if len(boxes) == 1:
            out.append(rec)
            continue
        mask = read_mask(rec.mask_path, img.size) if rec.mask_path else None
        key = f"{file_digest(rec.path, TILE_HASH)[:32]}-{CACHE_FORMAT}"
        for left, top, right, bottom in boxes:
            stem = folder / key[:2] / f"{key}-{left}-{top}-{right}-{bottom}"
            path = _written(stem.with_suffix(".png"), img.crop((left, top, right, bottom)))
            mask_path = ""
            if mask is not None:
                mask_path = str(_written(Path(f"{stem}_mask.png"), mask.crop((left, top, right, bottom))))
            out.append(Record(str(path), rec.category, rec.split, rec.label, mask_path, rec.defect))
    if len(out) != len(records):
        logger.info("tile geometry: %d images → %d tiles of side %d.", len(records), len(out), transform.tile or transform.crop)
    return out


def _written(path: Path, image: Image.Image) -> Path:
    """``image`` at ``path`` (written atomically unless a complete file is there already)."""
    if not path.is_file():
        buffer = io.BytesIO()
        Image.fromarray(np.asarray(image)).save(buffer, format="PNG", compress_level=TILE_PNG_COMPRESSION)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, buffer.getvalue())
    return path
