"""Per-category decisions: how thresholds are calibrated, and the one function that applies them.

Calibration (per category, on the calibration images the evaluate stage chooses):

* image threshold: F1-optimal (the threshold of I-F1max, :mod:`components.evaluation.metrics`) when the
  images hold normal and anomalous ones, placed midway between the lowest score it flags and the
  next lower score (below the lowest by half the gap to the next one when it flags every image):
  the decisions on the calibration images are exactly the F1-optimal ones, and
  no image sits on the threshold, where a runtime's rounding (ONNX: ~1e-6) would flip it;
  otherwise the ``1 - fpr`` quantile of the normal scores, so that a fraction ``fpr`` of normal
  images is flagged. The rule is recorded (``f1`` / ``fpr=…``).
* pixel threshold: F1-optimal on the masks when there are masks, else the same quantile of the
  normal images' pixels.
* the score range (min, max of image scores and of map pixels), for normalisation.

Normalisation (optional, as anomalib's min-max normalisation): ``clip((x - t) / (max - min) + 0.5,
0, 1)`` so that 0.5 is the threshold of every category. The decision is always taken on the raw
score (``score >= threshold``), so normalising never changes a decision.

The predict command, the MLflow pyfunc, the exported-model runtimes and the web app all decide
through :class:`DecisionRule`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from components.evaluation.metrics import image_metrics, pixel_metrics
from components.scoring.operating import OperatingPoint, action, rule_threshold

__all__ = ["CategoryThresholds", "DecisionRule", "calibrate", "normalize"]

NORMALIZED_THRESHOLD = 0.5
ANOMALOUS, NORMAL, UNKNOWN = "anomalous", "normal", "unknown"


@dataclass(frozen=True)
class CategoryThresholds:
    """One category's thresholds, the rule that set them, and its score ranges."""

    image_threshold: float = math.nan
    pixel_threshold: float = math.nan
    rule: str = ""
    image_min: float = math.nan
    image_max: float = math.nan
    pixel_min: float = math.nan
    pixel_max: float = math.nan
    review_threshold: float = math.nan  # the review band's lower end (NaN: no band)
    review_rule: str = ""

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CategoryThresholds:
        """From a thresholds table entry; unknown keys are ignored (tables written before the rule)."""
        text = ("rule", "review_rule")
        return cls(**{k: (v if k in text else _number(v)) for k, v in data.items() if k in cls.__dataclass_fields__})

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (NaN stays NaN)."""
        return asdict(self)


def _number(value: Any) -> float:
    """``float(value)``; NaN as the one ``math.nan`` object, so that equal tables compare equal."""
    x = float(value)
    return math.nan if math.isnan(x) else x


def _midway(values: np.ndarray, threshold: float) -> float:
    """Midway between ``threshold`` (a value of ``values``) and the largest value below it; when it
    is the smallest value (every image flagged), as far below it as half the gap to the next value
    above, so that no value sits on the threshold either way."""
    if not math.isfinite(threshold):
        return threshold
    below, above = values[values < threshold], values[values > threshold]
    if below.size:
        return float((threshold + below.max()) / 2)
    return float(threshold - (above.min() - threshold) / 2) if above.size else threshold


def _quantile(values: np.ndarray, fpr: float) -> float:
    return float(np.quantile(values, 1.0 - fpr)) if values.size else math.nan


def calibrate(
    scores: np.ndarray,
    labels: np.ndarray,
    maps: np.ndarray | None = None,
    masks: np.ndarray | None = None,
    fpr: float = 0.01,
    f1: tuple[float, float] | None = None,
    point: OperatingPoint | None = None,
) -> CategoryThresholds:
    """Thresholds of one category from its calibration images.

    Args:
        scores: N image scores. labels: N labels (0 normal, 1 anomalous).
        maps: N×R×R anomaly maps (None: no pixel threshold). masks: N×R×R ground truth or None.
        fpr: target false-positive rate of the quantile rule (used without anomalous images).
        f1: the F1-optimal (image, pixel) thresholds of these very images when already computed
            (the evaluation's metrics): not computed a second time.
        point: the operating point (:mod:`components.scoring.operating`; default ``f1``, no review
            band). A rule the images cannot give (``f1`` or ``min_recall`` without anomalous
            images) falls back to the ``fpr`` quantile, recorded in ``rule``.
    """
    scores, labels = np.asarray(scores, np.float64), np.asarray(labels).astype(int)
    point = point or OperatingPoint()
    normal = scores[labels == 0]
    image, rule = math.nan, ""
    if point.rule == "f1" and {0, 1} <= set(labels.tolist()):
        best = f1[0] if f1 is not None else image_metrics(scores, labels)["image_threshold"]
        image, rule = _midway(scores, best), "f1"
    elif point.rule != "f1":
        image, rule = rule_threshold(scores, labels, point.rule, point.target), f"{point.rule}={point.target:g}"
    if not math.isfinite(image):
        image, rule = _quantile(normal, fpr), f"fpr={fpr:g}"
    review, review_rule = math.nan, ""
    if point.review_rule != "none" and scores.size:
        review = rule_threshold(scores, labels, point.review_rule, point.review_target)
        review_rule = f"{point.review_rule}={point.review_target:g}"
    pixel, pmin, pmax = math.nan, math.nan, math.nan
    if maps is not None and maps.size:
        pmin, pmax = float(np.min(maps)), float(np.max(maps))
        if masks is not None and masks.any():
            best = f1[1] if f1 is not None else pixel_metrics(maps, masks)["pixel_threshold"]
            pixel = _midway(np.asarray(maps).ravel(), best)
        else:
            pixel = _quantile(np.asarray(maps)[labels == 0].ravel(), fpr)
    lo, hi = (float(scores.min()), float(scores.max())) if scores.size else (math.nan, math.nan)
    return CategoryThresholds(image, pixel, rule, lo, hi, pmin, pmax, review, review_rule)


def normalize(x: np.ndarray | float, threshold: float, lo: float, hi: float) -> np.ndarray:
    """``clip((x - threshold) / (hi - lo) + 0.5, 0, 1)``; NaN where the range or threshold is unknown."""
    x = np.asarray(x, np.float64)
    span = hi - lo
    if not (math.isfinite(threshold) and math.isfinite(span)) or span <= 0:
        return np.full_like(x, math.nan)
    return np.clip((x - threshold) / span + NORMALIZED_THRESHOLD, 0.0, 1.0)


class DecisionRule:
    """Applies per-category thresholds (and optional normalisation) to scores and maps.

    Args:
        thresholds: category → :class:`CategoryThresholds` or its dict.
        normalized: report normalised scores and maps (0.5 = threshold) instead of raw ones.
    """

    def __init__(self, thresholds: dict[str, Any], normalized: bool = False) -> None:
        self.thresholds = {
            c: t if isinstance(t, CategoryThresholds) else CategoryThresholds.from_dict(t)
            for c, t in thresholds.items()
        }
        self.normalized = normalized

    @property
    def categories(self) -> list[str]:
        """The categories with thresholds."""
        return list(self.thresholds)

    def of(self, category: str) -> CategoryThresholds:
        """The category's thresholds (all NaN for a category without any)."""
        return self.thresholds.get(category, CategoryThresholds())

    def image(self, category: str, score: float, threshold: float | None = None) -> tuple[float, float, str]:
        """(reported score, reported threshold, decision) of one raw image score.

        ``threshold`` overrides the category's (given on the reported scale: 0…1 when normalised).
        The decision is ``unknown`` when the category has no finite threshold.
        """
        t = self.of(category)
        thr = t.image_threshold
        if threshold is not None and self.normalized:  # back to the raw scale
            thr = thr + (threshold - NORMALIZED_THRESHOLD) * (t.image_max - t.image_min)
        elif threshold is not None:
            thr = threshold
        if not math.isfinite(thr):
            decision = UNKNOWN
        else:
            decision = ANOMALOUS if score >= thr else NORMAL
        if self.normalized:
            shown = float(normalize(score, t.image_threshold, t.image_min, t.image_max))
            shown_thr = NORMALIZED_THRESHOLD if threshold is None else float(threshold)
            return shown, shown_thr, decision
        return float(score), float(thr), decision

    def action(self, category: str, score: float) -> str:
        """``reject`` / ``review`` / ``pass`` of one raw score (the review band below the image
        threshold, :mod:`components.scoring.operating`); ``unknown`` without a finite threshold."""
        t = self.of(category)
        if not math.isfinite(t.image_threshold):
            return UNKNOWN
        return action(score, t.image_threshold, t.review_threshold)

    def pixel(self, category: str, amap: np.ndarray) -> tuple[np.ndarray, float]:
        """(reported map, its mask threshold) of one raw map (any shape; NaN stays NaN)."""
        t = self.of(category)
        if self.normalized:
            return normalize(amap, t.pixel_threshold, t.pixel_min, t.pixel_max).astype(np.float32), NORMALIZED_THRESHOLD
        return np.asarray(amap, np.float32), t.pixel_threshold
