"""Stitching the ``tile`` geometry's maps (:meth:`~components.data.transforms.ImageTransform.tiles`).

Each tile is scored as a whole image (resized to the model input); its post-processed R×R map is
scaled onto the tile's box in the original frame and overlapping tiles are averaged. The image
score is the official top-ratio mean (:func:`~components.scoring.anomaly_map.image_score`) of the
stitched map, so a defect is scored once however many tiles show it. With one box (every other
geometry, or an image no larger than a tile) :func:`stitch` is exactly the map scaled to the image.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from components.data.transforms import ImageTransform
from components.scoring.anomaly_map import image_score

__all__ = ["Box", "resample", "score_tiled", "stitch", "stitched_score"]

Box = tuple[int, int, int, int]


def stitch(maps: Sequence[np.ndarray], boxes: Sequence[Box], size: tuple[int, int]) -> np.ndarray:
    """R×R tile maps → H×W float32 map of an image of ``size`` (W, H): each map scaled (bilinear)
    onto its box, overlaps averaged; pixels no box covers are NaN."""
    w, h = size
    total = np.zeros((h, w), dtype=np.float64)
    count = np.zeros((h, w), dtype=np.float64)
    for amap, (left, top, right, bottom) in zip(maps, boxes, strict=True):
        part = torch.from_numpy(np.ascontiguousarray(amap, dtype=np.float32))[None, None]
        scaled = F.interpolate(part, size=(bottom - top, right - left), mode="bilinear", align_corners=False)
        total[top:bottom, left:right] += scaled[0, 0].numpy()
        count[top:bottom, left:right] += 1.0
    with np.errstate(invalid="ignore"):
        return (total / count).astype(np.float32)


def stitched_score(full: np.ndarray, top_ratio: float) -> float:
    """The image score of a stitched H×W map (its defined pixels)."""
    values = full[np.isfinite(full)]
    return float(image_score(torch.from_numpy(values)[None], top_ratio)[0])


def resample(full: np.ndarray, side: int) -> np.ndarray:
    """An H×W map → side×side (antialiased bilinear): the evaluation grid of a stitched map."""
    t = torch.from_numpy(np.nan_to_num(full, nan=0.0).astype(np.float32))[None, None]
    return F.interpolate(t, size=(side, side), mode="bilinear", align_corners=False, antialias=True)[0, 0].numpy()


def score_tiled(
    scorer: Callable[[torch.Tensor], tuple[np.ndarray, np.ndarray]],
    images: Sequence[Image.Image],
    transform: ImageTransform,
    top_ratio: float,
    batch_size: int,
) -> list[tuple[np.ndarray, float]]:
    """Per RGB image (any size) its stitched map (original frame) and image score.

    ``scorer``: normalised tiles B×3×C×C → (maps B×R×R, scores B), numpy, called on at most
    ``batch_size`` tiles at a time.
    """
    tiles, owners, boxes = [], [], []
    for i, img in enumerate(images):
        for box in transform.tiles(img.size):
            owners.append(i)
            boxes.append(box)
            tiles.append(img if box == (0, 0, *img.size) else img.crop(box))
    maps: list[np.ndarray] = []
    for start in range(0, len(tiles), max(1, batch_size)):
        batch = torch.stack([transform(t) for t in tiles[start : start + batch_size]])
        maps.extend(scorer(batch)[0])
    out = []
    for i, img in enumerate(images):
        mine = [k for k, o in enumerate(owners) if o == i]
        full = stitch([maps[k] for k in mine], [boxes[k] for k in mine], img.size)
        out.append((full, stitched_score(full, top_ratio)))
    return out
