"""Operating points: the image threshold as a process setting, and the review band below it.

A line sets its reject threshold by one of three rules, on a category's calibration images
(scores N, labels N with 0 normal / 1 anomalous):

* ``f1``: the F1-optimal threshold (the paper's I-F1max; :mod:`components.scoring.decision`);
* ``max_fpr`` x: the lowest threshold that flags at most a share x of the normal images (the
  false-reject rate); with k = floor(x * n_normal) allowed false rejects it lies just above the
  (k+1)-th largest normal score, so every score it does not flag stays below it;
* ``min_recall`` y: the highest threshold that flags at least a share y of the anomalous images
  (escape rate at most 1 - y); with j = ceil(y * n_anomalous) it lies just below the j-th largest
  anomalous score.

"Just above/below" is midway to the next calibration score on that side, so no calibration image
sits on a threshold (an exported runtime's rounding, ~1e-6, would flip it). An optional second
threshold (``review``, by ``max_fpr`` or ``min_recall``) opens a review band: a score at or above
the reject threshold is ``reject``, at or above the review threshold ``review``, else ``pass``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["OPERATING_RULES", "REVIEW_RULES", "OperatingPoint", "rule_threshold"]

OPERATING_RULES = ("f1", "max_fpr", "min_recall")
REVIEW_RULES = ("none", "max_fpr", "min_recall")
PASS, REVIEW, REJECT = "pass", "review", "reject"


@dataclass(frozen=True)
class OperatingPoint:
    """The reject rule and its target, and the review band's (``review_rule`` ``none``: no band).

    ``target`` is x of ``max_fpr`` or y of ``min_recall`` (ignored by ``f1``)."""

    rule: str = "f1"
    target: float = 0.0
    review_rule: str = "none"
    review_target: float = 0.0

    def __post_init__(self) -> None:
        if self.rule not in OPERATING_RULES or self.review_rule not in REVIEW_RULES:
            msg = f"rules {OPERATING_RULES}, review rules {REVIEW_RULES}; got {self.rule!r}, {self.review_rule!r}."
            raise ValueError(msg)
        for name, rule, value in (
            ("target", self.rule, self.target),
            ("review_target", self.review_rule, self.review_target),
        ):
            if rule in ("max_fpr", "min_recall") and not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} of {rule} must be a share in [0, 1], got {value!r}.")


def _just_above(values: np.ndarray, v: float) -> float:
    """Midway between ``v`` and the next larger value (nothing larger: above ``v`` by half the spread, or 1)."""
    above = values[values > v]
    if above.size:
        return float((v + above.min()) / 2)
    spread = float(values.max() - values.min())
    return float(v + (spread / 2 if spread > 0 else 1.0))


def _just_below(values: np.ndarray, v: float) -> float:
    """Midway between ``v`` and the next smaller value (nothing smaller: below ``v`` by half the spread, or 1)."""
    below = values[values < v]
    if below.size:
        return float((v + below.max()) / 2)
    spread = float(values.max() - values.min())
    return float(v - (spread / 2 if spread > 0 else 1.0))


def max_fpr_threshold(scores: np.ndarray, labels: np.ndarray, x: float) -> float:
    """The lowest threshold flagging at most ``x`` of the normal scores (NaN without normal images)."""
    values, normal = np.asarray(scores, np.float64), np.asarray(scores, np.float64)[np.asarray(labels) == 0]
    if not normal.size:
        return math.nan
    k = math.floor(x * normal.size + 1e-9)  # false rejects allowed
    if k >= normal.size:
        return _just_below(values, float(values.min()))  # every image flagged
    return _just_above(values, float(np.sort(normal)[::-1][k]))


def min_recall_threshold(scores: np.ndarray, labels: np.ndarray, y: float) -> float:
    """The highest threshold flagging at least ``y`` of the anomalous scores (NaN without anomalous images)."""
    values, anomalous = np.asarray(scores, np.float64), np.asarray(scores, np.float64)[np.asarray(labels) == 1]
    if not anomalous.size:
        return math.nan
    j = math.ceil(y * anomalous.size - 1e-9)  # anomalous images that must be caught
    if j <= 0:
        return _just_above(values, float(values.max()))  # nothing flagged
    return _just_below(values, float(np.sort(anomalous)[::-1][j - 1]))


def rule_threshold(scores: np.ndarray, labels: np.ndarray, rule: str, target: float) -> float:
    """The threshold of ``max_fpr`` / ``min_recall`` (NaN when the images cannot give it)."""
    if rule == "max_fpr":
        return max_fpr_threshold(scores, labels, target)
    if rule == "min_recall":
        return min_recall_threshold(scores, labels, target)
    raise ValueError(f"no closed-form threshold for rule {rule!r}.")


def action(score: float, reject: float, review: float) -> str:
    """``reject`` at or above ``reject``, ``review`` at or above ``review`` (NaN: no band), else ``pass``."""
    if score >= reject:
        return REJECT
    if math.isfinite(review) and score >= review:
        return REVIEW
    return PASS
