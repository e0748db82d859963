"""Drift of a scoring run against the evaluation's reference (per category).

Three signals, each against a :class:`DriftReference` the evaluate stage stores in the model package:

* **score distribution**: the image scores of the run against the reference normal scores (the
  held-out normal test images of the evaluation): the population stability index over quantile bins
  of the reference, PSI = sum (q - r) ln(q / r) (q, r: shares of the run and of the reference per bin,
  empty bins counted as half an image; it decides only with at least ``MIN_PER_BIN`` images per bin
  on both sides, as its sampling noise is about bins / n), and the two-sample Kolmogorov-Smirnov statistic
  D = max |F_run - F_ref| with its asymptotic p-value (Kolmogorov's series, with Stephens' small-sample
  correction);
* **flagged rate** against the rate the operating point implies on normal images (the share of
  reference normal scores at or above the image threshold);
* **embedding shift**: the mean pooled encoder feature of the run (mean over patch tokens of the
  frozen DINOv2 output, one C-vector per image) against the training images' mean and per-channel
  std: z = sqrt(mean_c (mu_run,c - mu_ref,c)^2 / (sd_ref,c^2 (1/n_run + 1/n_ref))), about 1 when the
  run's images come from the reference distribution, large when lighting, camera or product change.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["DriftReference", "DriftSettings", "drift_report", "embedding_shift", "ks_2samp", "psi"]

MAX_REFERENCE = 100_000  # bound on what a model file may ask this process to hold
MIN_STD = 1e-12
MIN_PER_BIN = 10  # PSI decides only with this many images per bin on both sides (its noise is ~bins / n)
KS_TERMS = 100


@dataclass(frozen=True)
class DriftReference:
    """A category's reference: normal scores and the pooled-feature mean, std and count."""

    normal_scores: tuple[float, ...] = ()
    embed_mean: tuple[float, ...] = ()
    embed_std: tuple[float, ...] = ()
    embed_count: int = 0

    @classmethod
    def from_dict(cls, data: Any) -> DriftReference:
        """Strict: lists of finite numbers, bounded, mean and std of one length (ValueError otherwise)."""
        if not isinstance(data, dict) or set(data) - set(cls.__dataclass_fields__):
            raise ValueError(f"a drift reference is an object with keys {sorted(cls.__dataclass_fields__)}.")
        values = {}
        for key in ("normal_scores", "embed_mean", "embed_std"):
            seq = data.get(key, [])
            ok = isinstance(seq, list) and len(seq) <= MAX_REFERENCE
            ok = ok and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in seq)
            if not ok:
                raise ValueError(f"'{key}' of a drift reference must be at most {MAX_REFERENCE} finite numbers.")
            values[key] = tuple(float(v) for v in seq)
        count = data.get("embed_count", 0)
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(f"'embed_count' of a drift reference must be a count, got {count!r}.")
        if len(values["embed_mean"]) != len(values["embed_std"]):
            raise ValueError("'embed_mean' and 'embed_std' of a drift reference differ in length.")
        return cls(**values, embed_count=count)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {
            "normal_scores": list(self.normal_scores),
            "embed_mean": list(self.embed_mean),
            "embed_std": list(self.embed_std),
            "embed_count": self.embed_count,
        }

    @classmethod
    def of(cls, normal_scores: np.ndarray, features: np.ndarray | None) -> DriftReference:
        """From reference normal scores (N) and pooled features (M×C, None: no embedding reference)."""
        scores = tuple(float(s) for s in np.asarray(normal_scores, np.float64) if math.isfinite(s))
        if features is None or not len(features):
            return cls(scores)
        f = np.asarray(features, np.float64)
        return cls(scores, tuple(f.mean(0).tolist()), tuple(f.std(0).tolist()), int(f.shape[0]))


@dataclass(frozen=True)
class DriftSettings:
    """When a run counts as drifting (``drift`` params)."""

    bins: int = 10
    psi_max: float = 0.25
    ks_alpha: float = 0.01
    embedding_max: float = 4.0
    min_images: int = 5


def psi(reference: np.ndarray, new: np.ndarray, bins: int) -> float:
    """Population stability index of ``new`` against ``reference`` over quantile bins of the reference."""
    ref, run = np.asarray(reference, np.float64), np.asarray(new, np.float64)
    inner = np.unique(np.quantile(ref, np.linspace(0, 1, bins + 1)[1:-1]))
    r = np.bincount(np.searchsorted(inner, ref, side="right"), minlength=inner.size + 1).astype(np.float64)
    q = np.bincount(np.searchsorted(inner, run, side="right"), minlength=inner.size + 1).astype(np.float64)
    r, q = np.maximum(r, 0.5) / ref.size, np.maximum(q, 0.5) / run.size
    return float(np.sum((q - r) * np.log(q / r)))


def _kolmogorov_q(lam: float) -> float:
    """P(K > lam) of the Kolmogorov distribution: 2 sum_k (-1)^(k-1) exp(-2 k^2 lam^2)."""
    if lam < 1e-3:
        return 1.0
    k = np.arange(1, KS_TERMS + 1)
    return float(np.clip(2.0 * np.sum((-1.0) ** (k - 1) * np.exp(-2.0 * k**2 * lam**2)), 0.0, 1.0))


def ks_2samp(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(D, asymptotic p-value) of the two-sample Kolmogorov-Smirnov test."""
    a, b = np.sort(np.asarray(a, np.float64)), np.sort(np.asarray(b, np.float64))
    grid = np.concatenate([a, b])
    d = float(np.max(np.abs(np.searchsorted(a, grid, "right") / a.size - np.searchsorted(b, grid, "right") / b.size)))
    en = math.sqrt(a.size * b.size / (a.size + b.size))
    return d, _kolmogorov_q((en + 0.12 + 0.11 / en) * d)


def embedding_shift(reference: DriftReference, features: np.ndarray) -> float:
    """The z statistic of the module docstring (NaN without an embedding reference or features)."""
    f = np.asarray(features, np.float64)
    if not reference.embed_count or f.ndim != 2 or not f.shape[0] or f.shape[1] != len(reference.embed_mean):
        return math.nan
    mean, std = np.asarray(reference.embed_mean), np.asarray(reference.embed_std)
    keep = std > MIN_STD
    var = std[keep] ** 2 * (1.0 / f.shape[0] + 1.0 / reference.embed_count)
    return float(np.sqrt(np.mean((f.mean(0)[keep] - mean[keep]) ** 2 / var)))


def drift_report(
    reference: DriftReference | None,
    scores: np.ndarray,
    threshold: float,
    features: np.ndarray | None,
    settings: DriftSettings,
) -> dict[str, Any]:
    """One category's drift entry: psi, ks, ks_p, flagged_rate, expected_rate, embedding_z, the
    reasons and ``drift`` (None when the run has fewer than ``min_images`` or there is no reference)."""
    scores = np.asarray(scores, np.float64)
    out: dict[str, Any] = {"images": int(scores.size), "drift": None, "reasons": []}
    if reference is None or len(reference.normal_scores) < 2:
        out["reasons"] = ["no drift reference in the model package (evaluated before references were recorded)"]
        return out
    ref = np.asarray(reference.normal_scores)
    if scores.size < settings.min_images:
        out["reasons"] = [f"fewer than {settings.min_images} images (min_images)"]
        return out
    d, p = ks_2samp(ref, scores)
    out.update(psi=psi(ref, scores, settings.bins), ks=d, ks_p=p)
    if math.isfinite(threshold):
        out.update(flagged_rate=float(np.mean(scores >= threshold)), expected_rate=float(np.mean(ref >= threshold)))
    out["embedding_z"] = embedding_shift(reference, features) if features is not None else math.nan
    reasons = []
    psi_counts = min(ref.size, scores.size) >= MIN_PER_BIN * settings.bins
    if psi_counts and out["psi"] > settings.psi_max:
        reasons.append(f"score PSI {out['psi']:.3f} > {settings.psi_max:g}")
    if p < settings.ks_alpha:
        reasons.append(f"score KS p {p:.2g} < {settings.ks_alpha:g}")
    if math.isfinite(out["embedding_z"]) and out["embedding_z"] > settings.embedding_max:
        reasons.append(f"embedding shift z {out['embedding_z']:.2f} > {settings.embedding_max:g}")
    out["reasons"], out["drift"] = reasons, bool(reasons)
    return out
