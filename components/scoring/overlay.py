"""Anomaly maps back in the original image's pixels, and overlays for people to look at.

A map covers the model's input, which shows the part of the image its transform's geometry gives
it (:meth:`~components.data.transforms.ImageTransform.view`: the centre crop's footprint, the
whole image, or the whole image letterboxed). It is put back into the original frame by taking the
map's part that shows the image and scaling it onto the original pixels it shows; pixels outside
the model's view have no score (NaN).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib import colormaps
from PIL import Image

from components.data.transforms import ImageTransform

__all__ = ["crop_box", "map_to_original", "mask_outline", "render_overlay"]

HEAT_ALPHA = 0.45  # weight of the heat colour over the image
OUTLINE_RGB = (255, 255, 255)
HEAT_COLORMAP = "jet"


def crop_box(size: tuple[int, int], transform: ImageTransform) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) in original pixels of what the model sees of an image of ``size`` (W, H)."""
    return transform.view(size).source


def map_to_original(amap: np.ndarray, size: tuple[int, int], transform: ImageTransform) -> np.ndarray:
    """R×R map of the model's input → H×W float32 map in the original frame (NaN outside its view)."""
    w, h = size
    view = transform.view(size)
    left, top, right, bottom = view.source
    out = np.full((h, w), np.nan, dtype=np.float32)
    if right > left and bottom > top:
        r = amap.shape[-1] / transform.crop  # map pixels per input pixel
        tl, tt, tr, tb = (int(round(v * r)) for v in view.target)
        part = np.ascontiguousarray(amap[tt : max(tb, tt + 1), tl : max(tr, tl + 1)], dtype=np.float32)
        t = torch.from_numpy(part)[None, None]
        scaled = F.interpolate(t, size=(bottom - top, right - left), mode="bilinear", align_corners=False)
        out[top:bottom, left:right] = scaled[0, 0].numpy()
    return out


def mask_outline(mask: np.ndarray) -> np.ndarray:
    """The boundary pixels of a boolean H×W mask (the mask minus its 4-neighbour erosion)."""
    padded = np.pad(mask, 1, constant_values=False)
    inner = padded[1:-1, 1:-1] & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~inner


def render_overlay(image: Image.Image, amap: np.ndarray, vmax: float, threshold: float) -> Image.Image:
    """``image`` with the heat of ``amap`` (H×W, original frame; colour scale 0…``vmax``) blended in
    where it is defined, and the outline of ``amap >= threshold`` drawn in white."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    valid = np.isfinite(amap)
    scaled = np.clip(np.nan_to_num(amap, nan=0.0) / max(vmax, 1e-12), 0.0, 1.0)
    heat = colormaps[HEAT_COLORMAP](scaled)[..., :3].astype(np.float32) * 255.0
    blend = np.where(valid[..., None], (1 - HEAT_ALPHA) * rgb + HEAT_ALPHA * heat, rgb)
    if np.isfinite(threshold):
        edge = mask_outline(valid & (np.nan_to_num(amap, nan=-np.inf) >= threshold))
        blend[edge] = OUTLINE_RGB
    return Image.fromarray(np.clip(blend + 0.5, 0, 255).astype(np.uint8), "RGB")
