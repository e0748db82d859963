"""Per-category calibration and decisions against closed forms and scikit-learn."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import precision_recall_curve

from components.data.datasets import Record
from components.scoring.decision import CategoryThresholds, DecisionRule, calibrate, normalize


def test_f1_rule_matches_scikit_learn() -> None:
    rng = np.random.default_rng(0)
    labels = np.r_[np.zeros(40, int), np.ones(15, int)]
    scores = np.r_[rng.normal(0, 1, 40), rng.normal(1.5, 1, 15)]
    t = calibrate(scores, labels)
    precision, recall, thresholds = precision_recall_curve(labels, scores)
    f1 = 2 * precision[:-1] * recall[:-1] / (precision[:-1] + recall[:-1] + 1e-7)
    best = thresholds[int(np.argmax(f1))]
    assert t.rule == "f1"
    assert np.array_equal(scores >= t.image_threshold, scores >= best)  # the same decisions ...
    below = scores[scores < best].max()
    assert t.image_threshold == pytest.approx((best + below) / 2)  # ... with no score on the threshold
    assert (t.image_min, t.image_max) == (scores.min(), scores.max())


def test_quantile_rule_flags_the_target_share_of_normals() -> None:
    scores = np.arange(100, dtype=float)  # normal images only
    maps = np.arange(100 * 4, dtype=np.float32).reshape(100, 2, 2)
    t = calibrate(scores, np.zeros(100, int), maps, None, fpr=0.05)
    assert t.rule == "fpr=0.05"
    assert t.image_threshold == pytest.approx(94.05)  # linear interpolation at the 0.95 quantile
    assert int((scores >= t.image_threshold).sum()) == 5
    assert t.pixel_threshold == pytest.approx(np.quantile(np.arange(400), 0.95))
    assert (t.pixel_min, t.pixel_max) == (0.0, 399.0)


def test_pixel_rule_uses_masks_when_there_are_any() -> None:
    maps = np.zeros((2, 4, 4), np.float32)
    masks = np.zeros((2, 4, 4), np.uint8)
    maps[1, :2, :2], masks[1, :2, :2] = 0.9, 1  # a perfectly separable defect
    maps[1, 2:, 2:] = 0.3
    t = calibrate(np.array([0.1, 0.9]), np.array([0, 1]), maps, masks)
    assert t.pixel_threshold == pytest.approx((0.9 + 0.3) / 2)  # F1-optimal 0.9, midway to the next value


def test_threshold_that_flags_every_image_sits_below_the_lowest_score() -> None:
    """F1 is best when everything is flagged (the lowest score is an anomaly's): the threshold goes
    below the lowest score by half the gap to the next one, so a runtime 1 ulp lower still flags it."""
    scores, labels = np.array([0.5, 0.7, 0.9, 1.0]), np.array([1, 0, 1, 1])
    t = calibrate(scores, labels)
    assert t.image_threshold == pytest.approx(0.5 - (0.7 - 0.5) / 2)
    assert np.all(scores >= t.image_threshold)  # the F1-optimal decisions: every image flagged
    assert np.nextafter(0.5, 0.0) >= t.image_threshold


def test_normalize_closed_form() -> None:
    got = normalize(np.array([0.0, 2.0, 3.0, 4.0, 10.0, -5.0]), threshold=2.0, lo=0.0, hi=4.0)
    np.testing.assert_allclose(got, [0.0, 0.5, 0.75, 1.0, 1.0, 0.0])
    assert np.isnan(normalize(1.0, math.nan, 0.0, 1.0)) and np.isnan(normalize(1.0, 0.5, 1.0, 1.0))


def test_decision_rule_normalising_never_changes_a_decision() -> None:
    t = {"a": CategoryThresholds(2.0, 0.4, "f1", 0.0, 4.0, 0.0, 0.8)}
    raw, norm = DecisionRule(t), DecisionRule(t, normalized=True)
    for s in np.linspace(-1, 6, 57):
        r, n = raw.image("a", float(s)), norm.image("a", float(s))
        assert r[2] == n[2] == ("anomalous" if s >= 2.0 else "normal")
        assert n[1] == 0.5 and r[1] == 2.0
    assert norm.image("a", 3.0)[0] == pytest.approx(0.75)
    # a threshold given on the normalised scale: 0.75 is raw 2 + 0.25 * (4 - 0) = 3
    assert (
        norm.image("a", 2.9, threshold=0.75)[2] == "normal" and norm.image("a", 3.0, threshold=0.75)[2] == "anomalous"
    )
    amap, thr = norm.pixel("a", np.array([[0.4, 0.8], [np.nan, 0.0]]))
    assert thr == 0.5 and amap[0, 0] == pytest.approx(0.5) and np.isnan(amap[1, 0])
    assert raw.image("zzz", 1.0)[2] == "unknown"  # no thresholds for that category


def test_old_threshold_tables_still_load() -> None:
    rule = DecisionRule({"a": {"image_threshold": 1.0, "pixel_threshold": 0.2}})
    assert rule.image("a", 1.0)[2] == "anomalous" and rule.of("a").rule == ""


def test_validation_calibration_split_is_stratified_and_disjoint() -> None:
    from pipelines.config import load_params
    from pipelines.stages.evaluation import calibration_split

    records = [Record(f"g{i}.png", "a", "test", 0) for i in range(10)]
    records += [Record(f"d{i}.png", "a", "test", 1) for i in range(4)]
    p = load_params("params.yaml", ["eval.threshold.split=validation", "eval.threshold.validation_fraction=0.3"])
    calib, scored = calibration_split(p, records)
    assert sorted(r.label for r in calib) == [0, 0, 0, 1]  # round(0.3·10) normals, round(0.3·4) anomalies
    assert not {r.path for r in calib} & {r.path for r in scored} and len(calib) + len(scored) == 14
    assert calibration_split(p, records) == (calib, scored)  # seeded
    single = [Record("g.png", "a", "test", 0), Record("d.png", "a", "test", 1)]
    assert calibration_split(p, single)[0] == []  # never the last image of a label
    assert calibration_split(load_params("params.yaml"), records) == (None, records)  # split: test
