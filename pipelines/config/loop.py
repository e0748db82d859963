"""Params of the inspection loop: the review queue and its verdicts, drift reports, retraining."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from pipelines.config.base import Slug, StrictParams

__all__ = ["DriftParams", "ReviewParams"]


class ReviewParams(StrictParams):
    """``inpformer review`` (pipelines/loop/review.py). ``dir`` is read by prepare (a stage param)."""

    dir: str = "sources/reviewed"  # verdicts land here in MVTec layout (+ verdicts.jsonl): a dependency of prepare
    queue_dir: str = "artifacts/review"  # queue.jsonl and a copy of each queued image and its overlay
    normals_to: Literal["test", "train"] = "test"  # where images marked normal go (test: the gate sees them)
    defect_type: Slug = "reviewed"  # the defect folder of images marked defect without --defect
    retrain_after: int = Field(
        0, ge=0
    )  # a scoring run starts `inpformer retrain` after this many new verdicts (0: never)


class DriftParams(StrictParams):
    """Drift of each scoring run against the evaluation's reference (components/scoring/drift.py)."""

    enabled: bool = True
    bins: int = Field(10, ge=2)  # PSI: quantile bins of the reference normal scores
    psi_max: float = Field(0.25, gt=0)  # drift when the score PSI exceeds this (0.1-0.25: moderate, > 0.25: shift)
    ks_alpha: float = Field(0.01, gt=0, lt=1)  # drift when the two-sample KS p-value is below this
    embedding_max: float = Field(4.0, gt=0)  # drift when the encoder-feature shift (z, ~1 without drift) exceeds this
    min_images: int = Field(5, ge=1)  # fewer images of a category in a run: no verdict (null)
    reference_images: int = Field(200, ge=2)  # training images per category pooled for the embedding reference
    retrain: bool = False  # a drifting scoring run starts `inpformer retrain`
