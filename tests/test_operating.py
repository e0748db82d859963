"""Operating points (issue 22 §1): each rule against closed-form cases, the review band's three decisions."""

from __future__ import annotations

import math

import numpy as np
import pytest

from components.scoring.decision import CategoryThresholds, DecisionRule, calibrate
from components.scoring.operating import OperatingPoint, max_fpr_threshold, min_recall_threshold

# normals 0.1 … 1.0 (ten), anomalous 0.55, 0.75, 0.95, 1.2, 1.5
NORMAL = np.round(np.arange(1, 11) / 10, 2)
ANOMALOUS = np.array([0.55, 0.75, 0.95, 1.2, 1.5])
SCORES = np.concatenate([NORMAL, ANOMALOUS])
LABELS = np.array([0] * 10 + [1] * 5)


def _rates(t: float) -> tuple[float, float]:
    return float(np.mean(NORMAL >= t)), float(np.mean(ANOMALOUS >= t))


def test_max_fpr_closed_form() -> None:
    # x = 0.2: two false rejects allowed (0.9, 1.0 flagged); the third largest normal 0.8 must not be:
    # just above it is midway to the next score above 0.8 among all images (0.9) → 0.85.
    assert max_fpr_threshold(SCORES, LABELS, 0.2) == pytest.approx(0.85)
    assert _rates(0.85) == (0.2, 0.6)
    # x = 0: no normal flagged: above 1.0, midway to 1.2
    assert max_fpr_threshold(SCORES, LABELS, 0.0) == pytest.approx(1.1)
    # x = 0.25 → floor(2.5) = 2 allowed: the same as 0.2 (never more than x)
    assert max_fpr_threshold(SCORES, LABELS, 0.25) == pytest.approx(0.85)
    # x = 1: everything flagged, below the lowest score by half the spread
    t = max_fpr_threshold(SCORES, LABELS, 1.0)
    assert t < SCORES.min() and _rates(t) == (1.0, 1.0)


def test_min_recall_closed_form() -> None:
    # y = 0.8: ceil(4) = 4 of 5 caught: just below the 4th largest anomalous (0.75), midway to 0.7
    assert min_recall_threshold(SCORES, LABELS, 0.8) == pytest.approx(0.725)
    assert _rates(0.725) == (0.3, 0.8)
    # y = 0.61: ceil(3.05) = 4 → the same threshold (at least y)
    assert min_recall_threshold(SCORES, LABELS, 0.61) == pytest.approx(0.725)
    # y = 1: every anomalous image: below 0.55, midway to 0.5
    assert min_recall_threshold(SCORES, LABELS, 1.0) == pytest.approx(0.525)
    # no anomalous image: undefined
    assert math.isnan(min_recall_threshold(NORMAL, np.zeros(10), 0.9))


@pytest.mark.parametrize("x", [0.0, 0.05, 0.1, 0.3, 0.5, 0.77, 1.0])
def test_rules_hold_their_promise_on_random_scores(x: float) -> None:
    rng = np.random.default_rng(3)
    scores = np.concatenate([rng.normal(0, 1, 200), rng.normal(2, 1, 50)])
    labels = np.array([0] * 200 + [1] * 50)
    t = max_fpr_threshold(scores, labels, x)
    fpr = np.mean(scores[labels == 0] >= t)
    assert fpr <= x + 1e-12
    # the lowest such threshold: the next normal below it would push the rate past x
    below = scores[labels == 0][scores[labels == 0] < t]
    if below.size:
        assert np.mean(scores[labels == 0] >= below.max()) > x
    t = min_recall_threshold(scores, labels, x)
    recall = np.mean(scores[labels == 1] >= t)
    assert recall >= x - 1e-12
    above = scores[labels == 1][scores[labels == 1] > t]
    if above.size:
        assert np.mean(scores[labels == 1] > above.min()) < x  # raised past the next one: too few caught
    assert not np.any(np.isclose(scores, t, rtol=0, atol=1e-12))  # no image sits on it


def test_calibrate_records_rule_and_review_band_and_decides_three_ways() -> None:
    point = OperatingPoint("max_fpr", 0.0, "min_recall", 1.0)
    t = calibrate(SCORES, LABELS, point=point)
    assert (t.rule, t.review_rule) == ("max_fpr=0", "min_recall=1")
    assert (t.image_threshold, t.review_threshold) == pytest.approx((1.1, 0.525))
    rule = DecisionRule({"c": t})
    assert [rule.action("c", s) for s in (1.5, 1.1, 0.8, 0.525, 0.5)] == [
        "reject",
        "reject",
        "review",
        "review",
        "pass",
    ]
    assert rule.image("c", 0.8)[2] == "normal"  # the binary decision is at the reject threshold
    assert DecisionRule({}).action("c", 1.0) == "unknown"


def test_rules_without_their_images_fall_back_to_the_quantile() -> None:
    t = calibrate(NORMAL, np.zeros(10, int), fpr=0.1, point=OperatingPoint("min_recall", 0.9))
    assert t.rule == "fpr=0.1" and t.image_threshold == pytest.approx(np.quantile(NORMAL, 0.9))
    assert math.isnan(t.review_threshold) and t.review_rule == ""
    old = CategoryThresholds.from_dict({"image_threshold": 1.0, "rule": "f1"})  # a table from before the band
    assert math.isnan(old.review_threshold) and DecisionRule({"c": old}).action("c", 0.99) == "pass"


def test_bad_operating_points_are_refused() -> None:
    with pytest.raises(ValueError, match="rules"):
        OperatingPoint("max_recall", 0.1)
    with pytest.raises(ValueError, match="share"):
        OperatingPoint("max_fpr", 1.5)
