"""A scorer with its decisions: what predict, the MLflow pyfunc, the exported runtimes and the app share.

:class:`LoadedModel` pairs a scorer (PyTorch or an exported artifact: normalised images B×3×C×C →
maps B×R×R and scores B, numpy) with its :class:`~components.scoring.package.ModelPackage`: the
image transform and the per-category :class:`~components.scoring.decision.DecisionRule` come from
the package. :func:`score_pil` scores PIL images in memory and puts each map back into the image's
own pixel frame (:mod:`components.scoring.overlay`).
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image, PngImagePlugin

from components.data.transforms import ImageTransform
from components.model import InpFormer
from components.scoring.decision import DecisionRule
from components.scoring.inference import ScoringConfig, score_batch
from components.scoring.overlay import map_to_original, render_overlay
from components.scoring.package import ModelPackage
from components.scoring.tiling import score_tiled

__all__ = [
    "LoadedModel",
    "encode_map_png",
    "overlay_for",
    "score_pil",
    "torch_scorer",
]

UINT16_MAX = 65535


@dataclass
class LoadedModel:
    """A scorer with its package, a label and a version.

    ``scorer(images B×3×C×C)`` → (maps B×R×R, scores B), numpy: PyTorch or an exported artifact.
    ``rule`` is the package's decision rule (``rule.normalized`` may be switched per use).
    """

    scorer: Callable[[torch.Tensor], tuple[np.ndarray, np.ndarray]]
    package: ModelPackage
    label: str
    version: str
    model: InpFormer | None = None  # the PyTorch model (None for exported artifacts)
    rule: DecisionRule = field(init=False)
    transform: ImageTransform = field(init=False)

    def __post_init__(self) -> None:
        self.rule = self.package.rule()
        self.transform = self.package.transform()

    @property
    def categories(self) -> list[str]:
        """The model's categories (else those with thresholds)."""
        return list(self.package.categories or self.package.thresholds)

    @property
    def scoring(self) -> ScoringConfig | None:
        """The package's scoring settings."""
        return self.package.scoring


def torch_scorer(model: InpFormer, scoring: ScoringConfig, device: str = "cpu") -> Callable:
    """A scorer of a PyTorch model: normalised images → (maps B×R×R, scores B) as numpy."""

    def scorer(images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        with torch.no_grad():
            maps, scores = score_batch(model, images.to(device), scoring)
        return maps[:, 0].float().cpu().numpy(), scores.float().cpu().numpy()  # float: bf16 under autocast

    return scorer


def score_pil(
    package: LoadedModel, images: list, categories: list[str], batch_size: int | None = None
) -> list[dict[str, Any]]:
    """Score PIL images in memory: per image its raw map (original frame), raw score and decision.

    Under the ``tile`` geometry each image is scored as its stitched tiles (:mod:`components.scoring.tiling`),
    ``batch_size`` tiles at a time (default: as many as images).
    """
    transform = package.transform
    if transform.tiled:
        top_ratio = (package.scoring or ScoringConfig()).top_ratio
        scored = score_tiled(package.scorer, images, transform, top_ratio, batch_size or len(images))
    else:
        maps, scores = package.scorer(torch.stack([transform(img) for img in images]))
        scored = [(map_to_original(a, img.size, transform), s) for img, a, s in zip(images, maps, scores.tolist())]
    out = []
    for category, (full, score) in zip(categories, scored):
        shown, threshold, decision = package.rule.image(category, float(score))
        out.append(
            {
                "map": full,
                "raw_score": float(score),
                "score": shown,
                "threshold": threshold,
                "decision": decision,
                "action": package.rule.action(category, float(score)),
            }
        )
    return out


def overlay_for(package: LoadedModel, image, category: str, full: np.ndarray, heat_scale: float):
    """The overlay of one image: heat on the category's scale, outline of its pixel threshold."""
    shown, pixel = package.rule.pixel(category, full)
    if math.isfinite(pixel):
        vmax = heat_scale * pixel
    else:
        vmax = float(np.nanmax(shown)) if np.isfinite(shown).any() else 1.0
    return render_overlay(image, shown, vmax, pixel)


def encode_map_png(full: np.ndarray, side: int | None = None) -> tuple[str, float]:
    """A map (H×W, NaN where undefined) as base64 16-bit grayscale PNG and its scale.

    Downsampled so the longer side is at most ``side``; pixel value v means ``v / 65535 * scale``
    (NaN and negative values become 0).
    """
    h, w = full.shape
    if side and max(h, w) > side:
        ratio = side / max(h, w)
        t = torch.from_numpy(np.nan_to_num(full, nan=0.0).astype(np.float32))[None, None]
        size = (max(1, round(h * ratio)), max(1, round(w * ratio)))
        full = torch.nn.functional.interpolate(t, size=size, mode="area")[0, 0].numpy()
    top = float(np.nanmax(full)) if np.isfinite(full).any() else 0.0
    scale = top if top > 0 else 1.0
    levels = np.round(np.nan_to_num(full, nan=0.0).clip(0) / scale * UINT16_MAX).astype(np.uint16)
    info = PngImagePlugin.PngInfo()
    info.add_text("scale", repr(scale))
    buffer = io.BytesIO()
    Image.fromarray(levels).save(buffer, format="PNG", pnginfo=info)
    return base64.b64encode(buffer.getvalue()).decode("ascii"), scale
