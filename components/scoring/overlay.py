"""Anomaly maps back in the original image's pixels, and overlays for people to look at.

The model sees a centre crop (side ``crop``) of the image resized to ``resize``×``resize``
(:class:`~components.data.transforms.ImageTransform`), so a map covers only that crop. It is put
back into the original frame by scaling it onto the crop's footprint in the original image; pixels
outside the footprint have no score (NaN).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib import colormaps
from PIL import Image

__all__ = ["crop_box", "map_to_original", "mask_outline", "render_overlay"]

HEAT_ALPHA = 0.45  # weight of the heat colour over the image
OUTLINE_RGB = (255, 255, 255)
HEAT_COLORMAP = "jet"


def crop_box(size: tuple[int, int], resize: int, crop: int) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) in original pixels of what the model saw of an image of ``size`` (W, H)."""
    w, h = size
    offset = int(round((resize - crop) / 2.0))  # torchvision's centre crop
    left, right = offset * w / resize, (offset + crop) * w / resize
    top, bottom = offset * h / resize, (offset + crop) * h / resize
    return round(left), round(top), round(right), round(bottom)


def map_to_original(amap: np.ndarray, size: tuple[int, int], resize: int, crop: int) -> np.ndarray:
    """R×R map of the crop → H×W float32 map in the original frame (NaN outside the crop's footprint)."""
    w, h = size
    left, top, right, bottom = crop_box(size, resize, crop)
    out = np.full((h, w), np.nan, dtype=np.float32)
    if right > left and bottom > top:
        t = torch.from_numpy(np.ascontiguousarray(amap, dtype=np.float32))[None, None]
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
