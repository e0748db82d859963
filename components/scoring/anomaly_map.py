"""Anomaly maps, post-processing and image scores (method spec §11, §12.1–§12.3, §13.8).

* :func:`reconstruction_map` — conference map: mean over groups of 1 − cos(E_g, D_g), each
  upsampled bilinearly with ``align_corners=True`` (§12.1).
* :func:`fused_map` — INP-Former++ map: (up(A_rec) + M_pred) / 2 with
  A_rec = mean_g ½[(1 − cos) + ‖E − D‖₂] (§13.8), with a documented normalisation option.
* :func:`inp_distance_map` — zero-shot map: the nearest-INP distance on the token grid (§11).
* :func:`postprocess` — resize to 256 (bilinear, ``align_corners=False``) and a 5×5 Gaussian
  blur (σ = 4, zero padding) (§12.2).
* :func:`image_score` — mean of the top 1 % of the map's pixels (§12.3).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from components.constants import FUSED_L2_NORMS
from components.engine.losses import inp_distance

__all__ = [
    "FUSED_L2_NORMS",
    "fused_map",
    "gaussian_blur",
    "gaussian_kernel",
    "image_score",
    "inp_distance_map",
    "postprocess",
    "reconstruction_map",
]


def _up(grid_map: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(grid_map, size=size, mode="bilinear", align_corners=True)


def reconstruction_map(
    encoder_groups: list[torch.Tensor], decoder_groups: list[torch.Tensor], size: tuple[int, int]
) -> torch.Tensor:
    """Conference anomaly map B×1×H×W (spec §12.1)."""
    maps = [
        _up((1.0 - F.cosine_similarity(e, d, dim=1)).unsqueeze(1), size) for e, d in zip(encoder_groups, decoder_groups)
    ]
    return torch.cat(maps, dim=1).mean(dim=1, keepdim=True)


def fused_map(
    encoder_groups: list[torch.Tensor],
    decoder_groups: list[torch.Tensor],
    seg_probs: torch.Tensor | None,
    size: tuple[int, int],
    l2_norm: str = "none",
) -> torch.Tensor:
    """INP-Former++ map B×1×H×W (spec §13.8).

    Args:
        seg_probs: sigmoid of the segmentation head, B×1×H×W (None: reconstruction part only).
        l2_norm: scaling of the ‖E − D‖₂ term: ``none`` (paper), ``channel_rms`` (÷ sqrt(C)) or
            ``relative`` (÷ ‖E‖₂). The raw L2 of DINOv2 features is not bounded by 1 and can
            dominate the sum with M_pred ∈ [0, 1]; the paper describes no normalisation [INFER].
    """
    if l2_norm not in FUSED_L2_NORMS:
        msg = f"l2_norm must be one of {FUSED_L2_NORMS}, got {l2_norm!r}."
        raise ValueError(msg)
    parts = []
    for e, d in zip(encoder_groups, decoder_groups):
        cos_d = 1.0 - F.cosine_similarity(e, d, dim=1)
        l2 = (e - d).norm(dim=1)
        if l2_norm == "channel_rms":
            l2 = l2 / e.shape[1] ** 0.5
        elif l2_norm == "relative":
            l2 = l2 / e.norm(dim=1).clamp_min(1e-8)
        parts.append(0.5 * (cos_d + l2))
    rec = _up(torch.stack(parts, dim=1).mean(dim=1, keepdim=True), size)
    if seg_probs is None:
        return rec
    if seg_probs.shape[-2:] != tuple(size):
        seg_probs = F.interpolate(seg_probs, size=size, mode="bilinear", align_corners=False)
    return 0.5 * (rec + seg_probs)


def inp_distance_map(
    fused_features: torch.Tensor, prototypes: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]
) -> torch.Tensor:
    """Zero-shot map B×1×H×W: nearest-INP cosine distance on the grid, upsampled (spec §11)."""
    d = inp_distance(fused_features, prototypes)
    return _up(d.reshape(d.shape[0], 1, grid[0], grid[1]), size)


def gaussian_kernel(kernel_size: int = 5, sigma: float = 4.0) -> torch.Tensor:
    """Normalised 2-D Gaussian kernel (kernel_size × kernel_size), sum 1 (spec §12.2)."""
    if kernel_size < 1 or kernel_size % 2 == 0 or sigma <= 0:
        msg = f"blur kernel must be odd and >= 1 with sigma > 0, got {kernel_size}, {sigma}."
        raise ValueError(msg)
    x = torch.arange(kernel_size, dtype=torch.float64) - (kernel_size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    k2 = torch.outer(g, g)
    return (k2 / k2.sum()).float()


def gaussian_blur(maps: torch.Tensor, kernel_size: int = 5, sigma: float = 4.0) -> torch.Tensor:
    """Depthwise Gaussian blur with zero padding (borders lose mass, as the official code)."""
    k = gaussian_kernel(kernel_size, sigma).to(maps.device, maps.dtype)
    c = int(maps.shape[1])  # a constant when traced (export)
    weight = k.expand(c, 1, kernel_size, kernel_size)
    return F.conv2d(maps, weight, padding=kernel_size // 2, groups=c)


def postprocess(
    maps: torch.Tensor, resize: int | None = 256, blur_kernel: int = 5, blur_sigma: float = 4.0
) -> torch.Tensor:
    """Resize (bilinear, align_corners=False) then blur: B×1×H×W → B×1×R×R (spec §12.2).

    ``resize=None`` keeps the size; ``blur_kernel=0`` disables the blur.
    """
    if resize:
        maps = F.interpolate(maps, size=(resize, resize), mode="bilinear", align_corners=False)
    if blur_kernel:
        maps = gaussian_blur(maps, blur_kernel, blur_sigma)
    return maps


def image_score(maps: torch.Tensor, top_ratio: float = 0.01) -> torch.Tensor:
    """Image score B: mean of the top ⌊ratio · H·W⌋ pixels (max when the ratio gives < 1 pixel)."""
    flat = maps.flatten(1)
    k = int(flat.shape[1] * top_ratio)
    if k < 1:
        return flat.max(dim=1).values
    return flat.topk(k, dim=1).values.mean(dim=1)
