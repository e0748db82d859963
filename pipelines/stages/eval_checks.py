"""What the evaluate stage checks in the data it scores and says when the numbers would mislead:
images labelled without masks, thresholds that flag
most normal parts, and undefined metrics written as ``null`` rather than NaN."""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np

from components.data.datasets import Record
from components.scoring.inference import InferenceResult
from pipelines.config import Params

logger = logging.getLogger(__name__)

__all__ = ["json_safe", "pixel_known", "pixel_truth", "result_mad", "threshold_sanity"]


def pixel_truth(res: InferenceResult, known: set[str]) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(maps, masks) of the images whose pixels have a ground truth (``known`` paths: normal images,
    where nothing is anomalous, and anomalous images with a mask); (None, None) when no anomalous
    image has one (image-level labels: pixel metrics undefined)."""
    if res.masks is None or res.maps is None:
        return None, None
    idx = [i for i, path in enumerate(res.paths) if path in known]
    if not any(res.labels[i] == 1 for i in idx):
        return None, None
    return res.maps[idx], res.masks[idx]


def pixel_known(records: list[Record]) -> set[str]:
    """The paths of the images whose pixels have a ground truth (see :func:`pixel_truth`)."""
    return {r.path for r in records if r.label == 0 or r.mask_path}


def threshold_sanity(p: Params, category: str, scores: np.ndarray, labels: np.ndarray, threshold: float) -> None:
    """Warn when a calibrated image threshold flags more than ``eval.threshold.max_normal_flag`` of
    the normal calibration images, or when the calibration images are mostly anomalous (an F1-optimal
    threshold then tends to flag everything: I-F1 high at chance I-AUROC)."""
    normal = scores[labels == 0]
    flagged = float(np.mean(normal >= threshold)) if normal.size else math.nan
    anomalous = float(np.mean(labels == 1)) if labels.size else math.nan
    limit = p.eval.threshold.max_normal_flag
    if (math.isfinite(flagged) and flagged > limit) or anomalous > limit:
        logger.warning(
            "%s: the image threshold %.4g flags %.0f %% of the normal calibration images (limit %.0f %%: "
            "eval.threshold.max_normal_flag), and %.0f %% of the calibration images are anomalous. Calibrate on "
            "held-out images (eval.threshold.split=validation) or on normals only by a false-reject rate.",
            category,
            threshold,
            100 * flagged,
            100 * limit,
            100 * anomalous,
        )


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float as None (``null``: undefined, not NaN, in metrics.json)."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def result_mad(p: Params, res: InferenceResult, records: list[Record]) -> float:
    """The mAD of one category's scored images (``eval.metrics_mode``, ``eval.fpr_limit``), pixel
    metrics from the images with a ground truth only (:func:`pixel_truth`)."""
    from components.evaluation.metrics import evaluate_arrays

    maps, masks = pixel_truth(res, pixel_known(records))
    return evaluate_arrays(res.scores, res.labels, maps, masks, p.eval.metrics_mode, p.eval.fpr_limit)["mad"]
