"""INT8 export: calibration images and the accuracy gate on decisions (``inpformer export --format openvino --int8``).

* **Calibration**: the first ``export.int8_calibration_images`` training normals of the model's
  categories (spread over them), transformed as the model sees them.
* **Gate**, on every evaluation image of the model's categories: the INT8 scorer's decisions (its
  scores against each category's image threshold) agree with PyTorch's on at least
  ``export.int8_min_agreement`` of the images, and its mAD (the per-category mean of the seven
  metrics, mean over categories) is at most ``export.int8_max_mad_drop`` below PyTorch's (0.005 =
  0.5 points). Elementwise map tolerances do not apply to a quantised model.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from components.data import batch as keys
from components.data.datasets import ImageDataset
from components.scoring.inference import predict
from components.scoring.scorer import LoadedModel
from pipelines.config import Params
from pipelines.stages.eval_checks import result_mad
from pipelines.stages.records import evaluation_records, load_records

__all__ = ["calibration_images", "gate_verdict", "int8_gate"]


def calibration_images(p: Params, package: LoadedModel) -> list[np.ndarray]:
    """Training normals of the model's categories as 1×3×C×C float32 arrays (round-robin over categories)."""
    if package.transform.tiled:
        raise ValueError("INT8 export of a tile-geometry model is not supported yet: export f32 (--format openvino).")
    train = [r for r in load_records(p) if r.split == "train" and r.label == 0]
    cats = [c for c in package.categories if any(r.category == c for r in train)] or sorted({r.category for r in train})
    per = {c: [r for r in train if r.category == c] for c in cats}
    chosen = [per[c][i] for i in range(max(map(len, per.values()), default=0)) for c in cats if i < len(per[c])]
    chosen = chosen[: p.export.int8_calibration_images]
    if not chosen:
        raise ValueError(f"no training images of {cats} in data.name={p.data.name} to calibrate the INT8 model on.")
    ds = ImageDataset(chosen, package.transform)
    return [ds[i][keys.IMAGE][None].numpy() for i in range(len(ds))]


def gate_verdict(agreement: float, mad_drop: float, min_agreement: float, max_drop: float) -> tuple[bool, str]:
    """Whether an INT8 model passes, and why (NaN mAD drop: not checked, undefined metrics)."""
    reasons = []
    if agreement < min_agreement:
        reasons.append(f"decisions agree on {agreement:.2%} < {min_agreement:.2%}")
    if math.isfinite(mad_drop) and mad_drop > max_drop:
        reasons.append(f"mAD drops by {mad_drop:.4f} > {max_drop:g}")
    ok = not reasons
    agree = f"decisions agree on {agreement:.2%} (>= {min_agreement:.2%}), mAD drop {mad_drop:+.4f} (<= {max_drop:g})"
    return ok, agree if ok else "; ".join(reasons)


def _scores(scorer: Any, ds: ImageDataset, batch: int) -> tuple[np.ndarray, np.ndarray]:
    maps, scores = [], []
    for start in range(0, len(ds), batch):
        images = torch.stack([ds[i][keys.IMAGE] for i in range(start, min(start + batch, len(ds)))])
        m, s = scorer(images)
        maps.append(m)
        scores.append(s)
    return np.concatenate(maps), np.concatenate(scores)


def int8_gate(p: Params, torch_model: LoadedModel, int8: Any) -> dict[str, Any]:
    """Compare ``int8`` (an exported scorer) with ``torch_model`` on the evaluation images."""
    e = p.eval
    records = [r for r in evaluation_records(p, load_records(p)) if r.category in torch_model.categories]
    agree, total, mads, mads8 = 0, 0, [], []
    for category in dict.fromkeys(r.category for r in records):
        recs = [r for r in records if r.category == category]
        ds = ImageDataset(recs, torch_model.transform)
        res = predict(torch_model.model, ds, torch_model.scoring, e.batch_size, "cpu", 0, progress=False)
        maps8, scores8 = _scores(int8, ds, e.batch_size)
        rule = torch_model.rule
        ref = [rule.image(category, float(s))[2] for s in res.scores]
        got = [rule.image(category, float(s))[2] for s in scores8]
        agree += sum(a == b for a, b in zip(ref, got))
        total += len(ref)
        if len(set(res.labels.tolist())) == 2:
            mads.append(result_mad(p, res, recs))
            mads8.append(result_mad(p, replace(res, maps=maps8, scores=scores8), recs))
    agreement = agree / total if total else math.nan
    mad, mad8 = (float(np.nanmean(m)) if m else math.nan for m in (mads, mads8))
    ok, reason = gate_verdict(agreement, mad - mad8, p.export.int8_min_agreement, p.export.int8_max_mad_drop)
    return {"images": total, "agreement": agreement, "mad": mad, "mad_int8": mad8, "passed": ok, "reason": reason}
