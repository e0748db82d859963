"""Metrics against independent references: scikit-learn, a slow AUPRO loop, a hand-computed binned case."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from components.evaluation.metrics import MetricWarning, binned_pixel_metrics, evaluate_arrays, pixel_metrics


def slow_aupro(maps: np.ndarray, masks: np.ndarray, limit: float = 0.3) -> float:
    """Obviously correct: loop over every distinct threshold and every 8-connected region."""
    regions = []
    for i in range(len(masks)):
        lab, n = ndimage.label(masks[i], structure=np.ones((3, 3)))
        regions += [(i, lab == k) for k in range(1, n + 1)]
    neg = masks == 0
    xs, ys = [0.0], [0.0]
    for t in sorted(np.unique(maps), reverse=True):
        pred = maps >= t
        pro = np.mean([(pred[i] & r).sum() / r.sum() for i, r in regions])
        xs.append((pred & neg).sum() / neg.sum())
        ys.append(pro)
    area = 0.0
    for k in range(1, len(xs)):
        x0, x1, y0, y1 = xs[k - 1], xs[k], ys[k - 1], ys[k]
        if x1 <= limit:
            area += (x1 - x0) * (y0 + y1) / 2
        else:
            if x0 < limit:
                y_lim = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
                area += (limit - x0) * (y0 + y_lim) / 2
            break
    return area / limit


def _f1max_sklearn(y, s) -> float:
    p, r, _ = precision_recall_curve(y, s)
    f = 2 * p * r / (p + r + 1e-7)
    return float(f[:-1].max())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_image_and_pixel_metrics_equal_sklearn_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    scores = np.round(rng.random(300), 1)  # heavy ties
    labels = (rng.random(300) < 0.4).astype(int)
    maps = np.round(rng.random((6, 16, 16)), 2).astype(np.float32)
    masks = np.zeros((6, 16, 16), np.uint8)
    masks[:3, 4:9, 4:9] = 1
    maps[masks == 1] += 0.2
    m = evaluate_arrays(scores, labels, maps, masks)
    assert m["image_auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-9)
    assert m["image_ap"] == pytest.approx(average_precision_score(labels, scores), abs=1e-9)
    assert m["image_f1_max"] == pytest.approx(_f1max_sklearn(labels, scores), abs=1e-9)
    y, s = masks.ravel(), maps.ravel()
    assert m["pixel_auroc"] == pytest.approx(roc_auc_score(y, s), abs=1e-9)
    assert m["pixel_ap"] == pytest.approx(average_precision_score(y, s), abs=1e-9)
    assert m["pixel_f1_max"] == pytest.approx(_f1max_sklearn(y, s.astype(np.float64)), abs=1e-9)
    assert m["mad"] == pytest.approx(
        np.mean([m[k] for k in list(m) if k not in ("mad", "image_threshold", "pixel_threshold")])
    )


def test_aupro_equals_slow_reference_edge_cases() -> None:
    rng = np.random.default_rng(3)
    maps = np.round(rng.random((5, 12, 12)), 1).astype(np.float32)  # ties
    masks = np.zeros((5, 12, 12), np.uint8)
    masks[0, 2:6, 2:6] = 1
    masks[0, 8, 8] = 1  # single-pixel region
    masks[1, 0, 0] = 1  # single pixel in a corner
    masks[1, 5:7, 9:12] = 1
    masks[2, 3, 3:9] = 1
    masks[2, 4, 2] = 1  # 8-connected to the row above
    # image 3 and 4: no anomalies at all
    maps[masks == 1] += 0.3
    got = pixel_metrics(maps, masks)["pixel_aupro"]
    assert got == pytest.approx(slow_aupro(maps, masks), abs=1e-6)
    # constant scores: one threshold, the curve jumps straight to (1, 1)
    const = np.full_like(maps, 0.5)
    assert pixel_metrics(const, masks)["pixel_aupro"] == pytest.approx(slow_aupro(const, masks), abs=1e-6)
    assert pixel_metrics(const, masks)["pixel_auroc"] == pytest.approx(0.5)


def test_perfect_separation() -> None:
    masks = np.zeros((2, 8, 8), np.uint8)
    masks[0, 2:4, 2:4] = 1
    maps = masks.astype(np.float32) + 0.01
    m = evaluate_arrays(np.array([0.9, 0.1]), np.array([1, 0]), maps, masks)
    for k in ("image_auroc", "image_ap", "pixel_auroc", "pixel_ap", "pixel_aupro"):
        assert m[k] == pytest.approx(1.0), k
    assert m["pixel_f1_max"] == pytest.approx(1.0, abs=1e-6)


def test_binned_mode_hand_computed() -> None:
    # 4 pixels: scores 0, 1, 2, 4 (range [0, 4], 2 bins of width 2) with labels 0, 0, 1, 1
    maps = np.array([[[0.0, 1.0], [2.0, 4.0]]], np.float32)
    masks = np.array([[[0, 0], [1, 1]]], np.uint8)
    # bins: [0,2) → {0, 1} both negative; [2,4] → {2, 4} both positive
    # thresholds at edges 0, 2, 4(=end): (FPR, TPR) = (1, 1), (0, 1), (0, 0) → AUROC 1
    # precision at edges: 2/4, 2/2, 1 (nothing predicted) with recall 1, 1, 0 → trapezoid AP = 1
    out = binned_pixel_metrics(maps, masks, nbins=2)
    assert out["pixel_auroc"] == pytest.approx(1.0)
    assert out["pixel_ap"] == pytest.approx(1.0)
    # now a positive falls in the low bin: scores 0(neg) 1(pos) 2(neg) 4(pos)
    masks2 = np.array([[[0, 1], [0, 1]]], np.uint8)
    out2 = binned_pixel_metrics(maps, masks2, nbins=2)
    # edges: (1, 1), (0.5, 0.5), (0, 0) → AUROC = 0.5; PR: (r=1, p=0.5), (r=0.5, p=0.5), (r=0, p=1)
    assert out2["pixel_auroc"] == pytest.approx(0.5)
    assert out2["pixel_ap"] == pytest.approx(0.5 * (0.5 + 0.5) * 0.5 + 0.5 * (1 + 0.5) * 0.5)
    # binned AUPRO: one region of area 2 (the two positives are diagonal → 8-connected), ÷ 0.3
    # curve (FPR, PRO): (0, 0) → (0.5, 0.5) crosses 0.3 at PRO 0.3 → area 0.5·0.3·0.3 / 0.3 = 0.15
    assert out2["pixel_aupro"] == pytest.approx(0.15)
    full = evaluate_arrays(np.array([1.0, 0.0]), np.array([1, 0]), np.concatenate([maps, maps * 0]),
                           np.concatenate([masks2, masks2 * 0]), mode="binned")  # fmt: skip
    assert math.isfinite(full["pixel_auroc"]) and math.isfinite(full["mad"])


def test_category_without_anomalies_warns_not_crashes() -> None:
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        m = evaluate_arrays(
            np.array([0.1, 0.2]), np.array([0, 0]), np.zeros((2, 4, 4), np.float32), np.zeros((2, 4, 4))
        )
    assert any(issubclass(w.category, MetricWarning) for w in rec)
    assert math.isnan(m["image_auroc"]) and math.isnan(m["pixel_aupro"]) and math.isnan(m["mad"])


def test_nan_in_map_is_a_clear_error() -> None:
    maps = np.zeros((2, 4, 4), np.float32)
    maps[1, 2, 3] = np.nan
    masks = np.zeros((2, 4, 4), np.uint8)
    masks[0, 0, 0] = 1
    with pytest.raises(ValueError, match=r"anomaly maps contains 1 NaN.*\[1, 2, 3\]"):
        evaluate_arrays(np.array([1.0, 0.0]), np.array([1, 0]), maps, masks)
    with pytest.raises(ValueError, match="image scores"):
        evaluate_arrays(np.array([np.nan, 0.0]), np.array([1, 0]))
    with pytest.raises(ValueError, match="shape"):
        evaluate_arrays(np.array([1.0, 0.0]), np.array([1, 0]), maps, masks[:, :2])
    with pytest.raises(ValueError, match="mode"):
        evaluate_arrays(np.array([1.0, 0.0]), np.array([1, 0]), mode="fast")
