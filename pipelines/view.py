"""The model's field of view from params: the image transform (``data.geometry`` resolved) and
how much of the ground-truth defects it holds, light enough for the prepare stage to import."""

from __future__ import annotations

import logging

from components.data.datasets import Record
from components.data.transforms import ImageTransform
from components.evaluation.coverage import Coverage, mask_coverage
from pipelines.config import Params

logger = logging.getLogger(__name__)

__all__ = ["USER_DATASETS", "build_transform", "geometry", "report_coverage"]

USER_DATASETS = ("folder", "flat")  # your own photos: every pixel in view by default (data.geometry: auto)
WIDER_VIEW = {
    "center_crop": "full (the whole image, squashed), letterbox (the whole image, padded) or tile (large images)"
}


def build_transform(p: Params) -> ImageTransform:
    """Resize → crop → normalise with the params' sizes."""
    d = p.data
    return ImageTransform(
        resize=d.image_size, crop=d.crop_size, geometry=geometry(p), tile=d.tile_size, tile_overlap=d.tile_overlap
    )


def geometry(p: Params) -> str:
    """``data.geometry``, ``auto`` resolved: the paper's centre crop for the benchmark datasets (centred
    objects), the whole image for your own (defects anywhere on the part)."""
    if p.data.geometry != "auto":
        return p.data.geometry
    return "full" if p.data.dataset in USER_DATASETS else "center_crop"


def report_coverage(p: Params, category: str, records: list[Record], transform: ImageTransform) -> Coverage:
    """The share of ``category``'s ground-truth defect pixels the model can see; a warning with the
    word "coverage" below ``eval.min_mask_coverage``, naming the geometry that sees more."""
    cov = mask_coverage([r.mask_path for r in records if r.label == 1 and r.mask_path], transform)
    if cov.share is not None and cov.share < p.eval.min_mask_coverage:
        logger.warning(
            "%s: mask coverage %.1f %%: only that share of the defect pixels is inside the model's field of view "
            "(data.geometry=%s), and %d of %d anomalous images have no defect pixel inside it (they cannot be "
            "detected, yet count in the image metrics). Set data.geometry to %s and train again.",
            category,
            100 * cov.share,
            transform.geometry,
            cov.outside,
            cov.images,
            WIDER_VIEW.get(transform.geometry, "letterbox"),
        )
    return cov
