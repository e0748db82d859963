"""How much of each defect the model can see: the share of ground-truth defect pixels inside its
field of view (:meth:`~components.data.transforms.ImageTransform.view`).

A defect outside the view cannot be detected, yet its image still counts in the image metrics; the
paper's centre crop (392 of 448 per side) fits centred objects, not parts photographed anywhere in
the frame.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from components.data.io import read_mask
from components.data.transforms import ImageTransform

__all__ = ["Coverage", "mask_coverage"]


@dataclass(frozen=True)
class Coverage:
    """Defect pixels inside the view / all defect pixels (None without any), over ``images`` masks;
    ``outside``: masks with defect pixels of which none is inside the view."""

    share: float | None
    images: int
    outside: int


def mask_coverage(masks: Sequence[str | os.PathLike], transform: ImageTransform) -> Coverage:
    """The :class:`Coverage` of the masks (original frames, as stored) under ``transform``'s geometry."""
    inside = total = outside = 0
    for path in masks:
        mask = np.asarray(read_mask(path)) > 0
        left, top, right, bottom = transform.view((mask.shape[1], mask.shape[0])).source
        n, k = int(mask.sum()), int(mask[top:bottom, left:right].sum())
        total, inside = total + n, inside + k
        outside += int(n > 0 and k == 0)
    return Coverage(inside / total if total else None, len(masks), outside)
