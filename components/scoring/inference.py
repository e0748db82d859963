"""Scoring: anomaly maps and image scores for batches and whole datasets (spec §11–§13.8).

One frozen :class:`ScoringConfig` carries every scoring setting (map kind and the official
post-processing: resize, Gaussian blur, top-ratio image score). The evaluate stage, ``predict``,
the sweep objective and the MLflow pyfunc all score through :func:`score_batch` with it; it is
stored next to a registered model as JSON and read back from there.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from components.constants import FUSED_L2_NORMS, MAP_KINDS, check_choice
from components.data import batch as keys
from components.data.io import read_mask, read_rgb
from components.data.transforms import ImageTransform
from components.scoring.anomaly_map import (
    fused_map,
    image_score,
    inp_distance_map,
    postprocess,
    reconstruction_map,
)
from components.scoring.tiling import resample, score_tiled

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    from components.model import InpFormer

__all__ = ["MAP_KINDS", "InferenceResult", "ScoringConfig", "pooled_features", "predict", "score_batch"]


@dataclass(frozen=True)
class ScoringConfig:
    """How a model's output becomes a map and a score.

    Args:
        map_kind: ``reconstruction`` (conference, §12), ``fused`` (++ with the seg head, §13.8) or
            ``inp_distance`` (zero-shot, §11).
        resize: side of the post-processed map (None: keep the crop size).
        blur_kernel: Gaussian kernel size (0: no blur).
        blur_sigma: Gaussian σ.
        top_ratio: fraction of the map's pixels averaged into the image score.
        fused_l2_norm: scaling of the L2 term of the fused map (``none`` = paper).
    """

    map_kind: str = "reconstruction"
    resize: int | None = 256
    blur_kernel: int = 5
    blur_sigma: float = 4.0
    top_ratio: float = 0.01
    fused_l2_norm: str = "none"

    def __post_init__(self) -> None:
        check_choice("map_kind", self.map_kind, MAP_KINDS)
        check_choice("fused_l2_norm", self.fused_l2_norm, FUSED_L2_NORMS)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ScoringConfig:
        """Inverse of ``asdict``; unknown keys are an error naming them."""
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:
            msg = f"unknown scoring keys {unknown} (known: {sorted(cls.__dataclass_fields__)})."
            raise ValueError(msg)
        return cls(**data)


@dataclass
class InferenceResult:
    """Outputs of :func:`predict` for a whole dataset (numpy, post-processed)."""

    maps: np.ndarray  # N×R×R float32 anomaly maps after resize + blur
    scores: np.ndarray  # N image scores
    labels: np.ndarray  # N labels (0 normal, 1 anomalous; -1 when unknown)
    masks: np.ndarray | None  # N×R×R uint8 ground truth, binarised at 0.5 (None when absent)
    paths: list[str] = field(default_factory=list)
    categories: list[str] = field(default_factory=list)


@torch.no_grad()
def score_batch(model: InpFormer, images: torch.Tensor, scoring: ScoringConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """images B×3×H×W → (post-processed maps B×1×R×R, image scores B) (spec §11–§13.8)."""
    size = tuple(images.shape[-2:])
    out = model(images)
    if scoring.map_kind == "reconstruction":
        amap = reconstruction_map(out.encoder_groups, out.decoder_groups, size)
    elif scoring.map_kind == "inp_distance":
        amap = inp_distance_map(out.fused_features, out.prototypes, out.grid, size)
    else:
        seg = torch.sigmoid(model.segment(out, size)) if model.seg_head is not None else None
        amap = fused_map(out.encoder_groups, out.decoder_groups, seg, size, scoring.fused_l2_norm)
    amap = postprocess(amap.float(), scoring.resize, scoring.blur_kernel, scoring.blur_sigma)
    return amap, image_score(amap, scoring.top_ratio)


def _ground_truth(mask: torch.Tensor, resize: int | None) -> torch.Tensor:
    """B×K×H×W soft masks → B×R×R uint8 binarised at 0.5 (channel max, nearest resize)."""
    gt = mask.float()
    if resize:
        gt = torch.nn.functional.interpolate(gt, size=(resize, resize), mode="nearest")
    if gt.shape[1] > 1:
        gt = gt.max(dim=1, keepdim=True).values
    return (gt[:, 0] > 0.5).to(torch.uint8)


@torch.no_grad()
class Heartbeat:
    """Without a progress bar, a log line every ``every_s`` seconds (and at the end) of long scoring:
    images done, rate and ETA; ``every_s <= 0``: silent."""

    def __init__(self, total: int, every_s: float, what: str = "scored") -> None:
        self.total, self.every_s, self.what = total, every_s, what
        self.done, self.started = 0, time.monotonic()
        self.last = self.started

    def tick(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if self.every_s <= 0 or (now - self.last < self.every_s and self.done < self.total):
            return
        self.last, rate = now, self.done / max(now - self.started, 1e-9)
        left = (self.total - self.done) / rate if rate > 0 else float("nan")
        pct = 100 * self.done / max(self.total, 1)
        logger.info(
            "%s %d/%d images (%.0f %%), %.1f images/s, ETA %.0f s", self.what, self.done, self.total, pct, rate, left
        )


def predict(
    model: InpFormer,
    dataset: Dataset,
    scoring: ScoringConfig,
    batch_size: int = 16,
    device: str = "cpu",
    num_workers: int = 0,
    progress: bool = True,
    report_every_s: float = 0.0,
) -> InferenceResult:
    """Anomaly maps and image scores for every sample of ``dataset`` (spec §11–§13.8).

    A dataset of records under the ``tile`` geometry is scored per image as its stitched tiles
    (:func:`_predict_tiled`). Without ``progress``, a :class:`Heartbeat` line every
    ``report_every_s`` seconds (0: none).
    """
    model.to(device).eval()
    transform = getattr(dataset, "transform", None)
    beat = Heartbeat(len(dataset), 0.0 if progress else report_every_s)  # type: ignore[arg-type]
    if transform is not None and transform.tiled and hasattr(dataset, "records"):
        return _predict_tiled(model, dataset.records, transform, scoring, batch_size, device, progress, beat)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    maps, scores, labels, masks, paths, cats = [], [], [], [], [], []
    for batch in tqdm(loader, desc="predict", disable=not progress, leave=False):
        images = batch[keys.IMAGE].to(device)
        beat.tick(len(images))
        amap, score = score_batch(model, images, scoring)
        scores.append(score.cpu())
        maps.append(amap[:, 0].cpu())
        labels.append(torch.as_tensor(batch.get(keys.LABEL, torch.full((len(images),), -1))).cpu())
        if keys.MASK in batch:
            masks.append(_ground_truth(batch[keys.MASK], scoring.resize))
        paths.extend(batch.get(keys.PATH, []))
        cats.extend(batch.get(keys.CATEGORY, []))
    return InferenceResult(
        maps=torch.cat(maps).numpy().astype(np.float32),
        scores=torch.cat(scores).numpy().astype(np.float64),
        labels=torch.cat(labels).numpy().astype(np.int64),
        masks=torch.cat(masks).numpy() if masks else None,
        paths=list(paths),
        categories=list(cats),
    )


def _predict_tiled(
    model: InpFormer,
    records: list,
    transform: ImageTransform,
    scoring: ScoringConfig,
    batch_size: int,
    device: str,
    progress: bool,
    beat: Heartbeat,
) -> InferenceResult:
    """:func:`predict` under the ``tile`` geometry: each image's tiles scored, their maps stitched in
    the original frame (:mod:`components.scoring.tiling`) and the image score taken from the stitched
    map; maps and masks are then resampled to the R×R evaluation grid of the whole image."""
    side = scoring.resize or transform.crop

    def scorer(images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        amap, score = score_batch(model, images.to(device), scoring)
        return amap[:, 0].cpu().numpy(), score.cpu().numpy()

    maps, scores, masks = [], [], []
    for rec in tqdm(records, desc="predict (tiles)", disable=not progress, leave=False):
        img = read_rgb(rec.path)
        [(full, score)] = score_tiled(scorer, [img], transform, scoring.top_ratio, batch_size)
        beat.tick(1)
        maps.append(resample(full, side))
        scores.append(score)
        truth = np.zeros((side, side), dtype=np.uint8)
        if rec.mask_path:
            mask = np.asarray(read_mask(rec.mask_path, img.size), dtype=np.float32) / 255.0
            truth = (resample(mask, side) > 0.5).astype(np.uint8)
        masks.append(truth)
    return InferenceResult(
        maps=np.stack(maps).astype(np.float32),
        scores=np.asarray(scores, dtype=np.float64),
        labels=np.asarray([r.label for r in records], dtype=np.int64),
        masks=np.stack(masks),
        paths=[r.path for r in records],
        categories=[r.category for r in records],
    )


def pooled_features(
    model: InpFormer, dataset: Dataset, batch_size: int = 16, device: str = "cpu", limit: int | None = None
) -> np.ndarray:
    """The frozen encoder's output F_Q averaged over patch tokens, one C-vector per image: N×C
    (the embedding drift is measured on, :mod:`components.scoring.drift`); at most ``limit``
    images, spread evenly over the dataset."""
    n = len(dataset)
    picks = np.unique(np.linspace(0, n - 1, min(n, limit or n)).round().astype(int)) if n else np.zeros(0, int)
    subset = torch.utils.data.Subset(dataset, picks.tolist())
    out = []
    model.to(device).eval()
    with torch.no_grad():
        for batch in DataLoader(subset, batch_size=batch_size, shuffle=False):
            fused, _, _ = model.encode(batch[keys.IMAGE].to(device))
            out.append(fused.mean(1).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)
