"""PNG plots of an evaluation: curves, score histograms, anomaly-map grids, INP attention maps."""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F

from components.data import batch as keys
from components.data.io import read_mask, read_rgb
from components.evaluation.metrics import curve_points, region_weights
from components.scoring.overlay import map_to_original

if TYPE_CHECKING:
    from components.model import InpFormer

__all__ = [
    "curve_tables",
    "plot_attention",
    "plot_curves",
    "plot_examples",
    "plot_histogram",
    "plot_map_grid",
    "select_examples",
]

ATTENTION_ROWS = 4  # images in the INP attention figure


def _roc_pr(scores: np.ndarray, labels: np.ndarray, weights: np.ndarray | None = None, max_points: int = 2000):
    c = curve_points(scores, labels, weights)
    p, n = max(c.tps[-1], 1), max(c.fps[-1], 1)
    fpr, tpr = np.r_[0, c.fps / n], np.r_[0, c.tps / p]
    prec = c.tps / np.maximum(c.tps + c.fps, 1)
    pro = np.r_[0, c.pro] if c.pro is not None else None
    step = max(1, len(fpr) // max_points)
    sel = np.r_[np.arange(0, len(fpr), step), len(fpr) - 1]
    return fpr[sel], tpr[sel], np.r_[1.0, prec][sel], (pro[sel] if pro is not None else None)


def plot_curves(
    out_dir: str | os.PathLike,
    category: str,
    scores: np.ndarray,
    labels: np.ndarray,
    maps: np.ndarray | None,
    masks: np.ndarray | None,
    fpr_limit: float = 0.3,
    max_pixels: int = 2_000_000,
) -> list[Path]:
    """Image and pixel ROC / PR curves and the PRO curve to ``fpr_limit``; returns the PNG paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    fig, axes = plt.subplots(1, 2, figsize=(9, 4))
    if labels.min() != labels.max():
        fpr, tpr, prec, _ = _roc_pr(scores, labels)
        axes[0].plot(fpr, tpr)
        axes[1].plot(tpr, prec)
    axes[0].set(title=f"{category}: image ROC", xlabel="FPR", ylabel="TPR")
    axes[1].set(title=f"{category}: image PR", xlabel="recall", ylabel="precision", ylim=(0, 1.02))
    fig.tight_layout()
    written.append(out_dir / f"{category}_image_curves.png")
    fig.savefig(written[-1], dpi=80)
    plt.close(fig)
    if maps is not None and masks is not None and masks.any():
        weights, _ = region_weights(masks)
        s, y, w = maps.ravel(), masks.ravel(), weights.ravel()
        if s.size > max_pixels:  # plots only: a fixed-seed subsample keeps them fast
            idx = np.random.default_rng(0).choice(s.size, max_pixels, replace=False)
            s, y, w = s[idx], y[idx], w[idx]
        fpr, tpr, prec, pro = _roc_pr(s, y, w)
        fig, axes = plt.subplots(1, 3, figsize=(13, 4))
        axes[0].plot(fpr, tpr)
        axes[0].set(title=f"{category}: pixel ROC", xlabel="FPR", ylabel="TPR")
        axes[1].plot(tpr, prec)
        axes[1].set(title=f"{category}: pixel PR", xlabel="recall", ylabel="precision", ylim=(0, 1.02))
        keep = fpr <= fpr_limit
        axes[2].plot(fpr[keep], pro[keep] / max(pro[-1], 1e-12))
        axes[2].set(title=f"{category}: PRO (FPR ≤ {fpr_limit})", xlabel="FPR", ylabel="PRO", xlim=(0, fpr_limit))
        fig.tight_layout()
        written.append(out_dir / f"{category}_pixel_curves.png")
        fig.savefig(written[-1], dpi=80)
        plt.close(fig)
    return written


def curve_tables(
    scores: np.ndarray,
    labels: np.ndarray,
    maps: np.ndarray | None,
    masks: np.ndarray | None,
    fpr_limit: float,
    max_points: int,
    max_pixels: int = 2_000_000,
) -> dict[str, dict[str, np.ndarray]]:
    """The curves as columns (for CSV / DVC plots), at most ``max_points`` points each.

    ``roc`` (fpr, tpr) and ``pr`` (recall, precision) of the image scores; ``pro`` (fpr, pro) of
    the pixels to ``fpr_limit``, PRO normalised to its end value. Deterministic (fixed-seed pixel
    subsample above ``max_pixels``).
    """
    out: dict[str, dict[str, np.ndarray]] = {}
    if labels.min() != labels.max():
        fpr, tpr, prec, _ = _roc_pr(scores, labels, max_points=max_points)
        out["roc"] = {"fpr": fpr, "tpr": tpr}
        out["pr"] = {"recall": tpr, "precision": prec}
    if maps is not None and masks is not None and masks.any():
        weights, _ = region_weights(masks)
        s, y, w = maps.ravel(), masks.ravel(), weights.ravel()
        if s.size > max_pixels:
            idx = np.random.default_rng(0).choice(s.size, max_pixels, replace=False)
            s, y, w = s[idx], y[idx], w[idx]
        fpr, _tpr, _prec, pro = _roc_pr(s, y, w, max_points=max_points)
        keep = fpr <= fpr_limit
        out["pro"] = {"fpr": fpr[keep], "pro": pro[keep] / max(pro[-1], 1e-12)}
    return out


def plot_histogram(
    out_path: str | os.PathLike, category: str, scores: np.ndarray, labels: np.ndarray, threshold: float
) -> Path:
    """Score histograms of normal versus anomalous images with the F1-optimal threshold."""
    fig, ax = plt.subplots(figsize=(6, 4))
    bins = np.linspace(float(scores.min()), float(scores.max()) + 1e-12, 30)
    ax.hist(scores[labels == 0], bins=bins, alpha=0.6, label="normal")
    ax.hist(scores[labels == 1], bins=bins, alpha=0.6, label="anomalous")
    if np.isfinite(threshold):
        ax.axvline(threshold, color="k", ls="--", label=f"threshold {threshold:.4g}")
    ax.set(title=f"{category}: image scores", xlabel="score", ylabel="images")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_path, dpi=80)
    plt.close(fig)
    return Path(out_path)


def plot_map_grid(
    out_path: str | os.PathLike,
    category: str,
    images: Sequence[np.ndarray],
    masks: Sequence[np.ndarray | None],
    maps: Sequence[np.ndarray],
    vmin: float,
    vmax: float,
    titles: Sequence[str] = (),
) -> Path:
    """Rows of image | ground truth | map | overlay, one colour scale for the whole category."""
    n = len(images)
    fig, axes = plt.subplots(max(n, 1), 4, figsize=(10, 2.5 * max(n, 1)), squeeze=False)
    for i in range(n):
        img, gt, amap = images[i], masks[i], maps[i]
        axes[i, 0].imshow(img)
        axes[i, 1].imshow(gt if gt is not None else np.zeros(amap.shape), cmap="gray", vmin=0, vmax=1)
        axes[i, 2].imshow(amap, cmap="jet", vmin=vmin, vmax=vmax)
        axes[i, 3].imshow(img)
        axes[i, 3].imshow(amap, cmap="jet", vmin=vmin, vmax=vmax, alpha=0.45)
        if titles:
            axes[i, 0].set_title(titles[i], fontsize=7)
        for a in axes[i]:
            a.axis("off")
    for a, t in zip(axes[0], ("image", "ground truth", "anomaly map", "overlay")):
        a.set_title(a.get_title() + ("\n" if a.get_title() else "") + t, fontsize=8)
    fig.suptitle(f"{category} (colour scale {vmin:.3g} … {vmax:.3g})", fontsize=9)
    fig.tight_layout()
    fig.savefig(out_path, dpi=70)
    plt.close(fig)
    return Path(out_path)


def plot_attention(
    out_path: str | os.PathLike, category: str, images: Sequence[np.ndarray], attention: Sequence[np.ndarray]
) -> Path:
    """INP attention maps (paper Fig. 9): for each image, one panel per INP (mean over heads)."""
    n = len(images)
    m = attention[0].shape[0] if n else 1
    fig, axes = plt.subplots(max(n, 1), m + 1, figsize=(1.8 * (m + 1), 1.9 * max(n, 1)), squeeze=False)
    for i in range(n):
        axes[i, 0].imshow(images[i])
        for j in range(m):
            axes[i, j + 1].imshow(attention[i][j], cmap="viridis")
            if i == 0:
                axes[i, j + 1].set_title(f"INP {j + 1}", fontsize=8)
        for a in axes[i]:
            a.axis("off")
    fig.suptitle(f"{category}: decoder attention to each INP", fontsize=9)
    fig.tight_layout()
    fig.savefig(out_path, dpi=70)
    plt.close(fig)
    return Path(out_path)


def select_examples(labels: np.ndarray, paths: Sequence[str], n: int) -> list[int]:
    """Indices for a grid of ``n``: anomalies round-robin over defect kinds (folder names), then normals.

    At least one anomalous image (when any) and up to a quarter of the grid for normal images.
    """
    by_defect: dict[str, list[int]] = defaultdict(list)
    for i, label in enumerate(labels):
        if label == 1:
            by_defect[Path(paths[i]).parent.name].append(i)
    queues = list(by_defect.values())
    anomalous = [q[k] for k in range(max(map(len, queues), default=0)) for q in queues if k < len(q)]
    anomalous = anomalous[: max(1, n - n // 4)]
    normal = [i for i in range(len(labels)) if labels[i] == 0][: n - len(anomalous)]
    return anomalous + normal


def plot_examples(
    model: InpFormer, dataset: Any, result: Any, out_dir: str | os.PathLike, category: str, n: int, device: str
) -> None:
    """``<category>_maps.png`` (image | truth | map | overlay) and ``<category>_inp_attention.png``.

    ``result`` is the :class:`~components.scoring.inference.InferenceResult` of ``dataset``; ``model`` is
    run again with attention maps for the first :data:`ATTENTION_ROWS` examples.
    """
    if n <= 0:
        return
    idx = select_examples(result.labels, result.paths, n)
    vmin, vmax = float(np.percentile(result.maps, 1)), float(result.maps.max())
    size = result.maps.shape[-1]
    images, masks, maps, atts, inputs = [], [], [], [], []
    for i in idx:
        item = dataset[i]
        img = dataset.transform.denormalize(item[keys.IMAGE])
        small = F.interpolate(img[None], size=(size, size), mode="bilinear", align_corners=False)[0]
        inputs.append(small.permute(1, 2, 0).numpy())
        image, mask, amap = _original_frame(dataset.records[i], result.maps[i], dataset.transform, size)
        images.append(image)
        masks.append(mask)
        maps.append(amap)
        if len(atts) < ATTENTION_ROWS:
            with torch.no_grad():
                out = model(item[keys.IMAGE][None].to(device), return_attention=True)
            a = out.attention[-1][0].mean(0)  # N×M, last decoder block, heads averaged
            h, w = out.grid
            atts.append(a.T.reshape(-1, h, w).cpu().numpy())
    titles = [Path(result.paths[i]).parent.name + "/" + Path(result.paths[i]).name for i in idx]
    out_dir = Path(out_dir)
    plot_map_grid(out_dir / f"{category}_maps.png", category, images, masks, maps, vmin, vmax, titles)
    plot_attention(out_dir / f"{category}_inp_attention.png", category, inputs[: len(atts)], atts)


def _original_frame(record: Any, amap: np.ndarray, transform: Any, side: int) -> tuple[np.ndarray, ...]:
    """(image, ground truth, map) of one example in its own frame and aspect ratio, the longer side
    ``side`` (the map NaN outside the model's field of view), for the grid."""
    image = read_rgb(record.path)
    scale = side / max(image.size)
    size = (max(1, round(image.size[0] * scale)), max(1, round(image.size[1] * scale)))
    full = map_to_original(amap, size, transform)
    truth = np.zeros((size[1], size[0]), np.float32)
    if record.mask_path:
        truth = np.asarray(read_mask(record.mask_path).resize(size), np.float32) / 255.0
    return np.asarray(image.resize(size), np.float32) / 255.0, truth, full
