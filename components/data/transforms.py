"""Image and mask transforms of the official code (method spec §2), sizes from params, and the
field of view (``geometry``) they give the model.

``center_crop`` (the paper's): RGB → resize to (R, R) ignoring aspect ratio (bilinear, antialiased
PIL) → [0, 1] tensor → centre crop C → ImageNet normalisation; the model sees the central C/R of
each side. ``full``: resize the whole image to (C, C) (every pixel in view, the aspect ratio
squashed). ``letterbox``: scale the longer side to C keeping the aspect ratio and pad the rest with
the normalisation mean (neutral after normalising). ``tile``: for images much larger than the model
input, the image is cut into overlapping square tiles of ``tile`` original pixels (:meth:`ImageTransform.tiles`),
each resized to (C, C) like ``full``; their maps are stitched back (:mod:`components.scoring.tiling`).
Masks get the same geometry (bilinear, so edges soften; padding 0). Pseudo anomalies are blended on the un-normalised [0, 1] input (spec §13.6), so
the two halves are separate methods. :meth:`ImageTransform.view` says which original pixels the
model's input covers, so maps go back into each image's own frame.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode

from components.constants import MAX_TILE_OVERLAP

__all__ = ["GEOMETRIES", "IMAGENET_MEAN", "IMAGENET_STD", "ImageTransform", "View"]

GEOMETRIES = ("center_crop", "full", "letterbox", "tile")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class View:
    """What the model's C×C input shows of an image: the original pixels ``source`` (left, top,
    right, bottom) appear in the input's ``target`` box (left, top, right, bottom, input pixels)."""

    source: tuple[int, int, int, int]
    target: tuple[int, int, int, int]


@dataclass(frozen=True)
class ImageTransform:
    """Resize → crop → normalise (spec §2.1) with explicit sizes and field of view.

    Args:
        resize: side of the square resize before the centre crop (448 officially; ``center_crop`` only).
        crop: side of the model's input (392 officially); must not exceed ``resize``.
        mean, std: normalisation constants.
        geometry: ``center_crop`` | ``full`` | ``letterbox`` | ``tile`` (see the module docstring).
        tile: side of a tile in original pixels (``tile`` geometry; 0: the input side ``crop``).
        tile_overlap: least share of a tile's side that neighbouring tiles overlap, in [0, 0.9].
    """

    resize: int = 448
    crop: int = 392
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    geometry: str = "center_crop"
    tile: int = 0
    tile_overlap: float = 0.25

    def __post_init__(self) -> None:
        if self.crop > self.resize or self.crop < 1:
            msg = f"crop ({self.crop}) must be between 1 and resize ({self.resize})."
            raise ValueError(msg)
        if self.geometry not in GEOMETRIES:
            msg = f"geometry must be one of {GEOMETRIES}, got {self.geometry!r}."
            raise ValueError(msg)
        if self.tile < 0 or not 0.0 <= self.tile_overlap <= MAX_TILE_OVERLAP:
            msg = f"tile ({self.tile}) must be >= 0 and tile_overlap ({self.tile_overlap}) in [0, {MAX_TILE_OVERLAP}]."
            raise ValueError(msg)

    @property
    def tiled(self) -> bool:
        """Whether images are scored as stitched tiles."""
        return self.geometry == "tile"

    def tiles(self, size: tuple[int, int]) -> list[tuple[int, int, int, int]]:
        """The (left, top, right, bottom) boxes an image of ``size`` (W, H) is scored in: the whole
        image, or under ``tile`` a row-major grid of tiles of side :attr:`tile` (the image's side where
        it is shorter) that overlap by at least ``tile_overlap`` and end flush with the border."""
        w, h = size
        if not self.tiled:
            return [(0, 0, w, h)]
        side = self.tile or self.crop
        xs, ys = _starts(w, side, self.tile_overlap), _starts(h, side, self.tile_overlap)
        return [(x, y, min(x + side, w), min(y + side, h)) for y in ys for x in xs]

    def view(self, size: tuple[int, int]) -> View:
        """Which original pixels of an image of ``size`` (W, H) the model's input holds, and where."""
        w, h = size
        c = self.crop
        if self.geometry in ("full", "tile"):  # a tile is scored whole
            return View((0, 0, w, h), (0, 0, c, c))
        if self.geometry == "letterbox":
            nw, nh = self._fitted(size)
            left, top = (c - nw) // 2, (c - nh) // 2
            return View((0, 0, w, h), (left, top, left + nw, top + nh))
        offset = int(round((self.resize - c) / 2.0))  # torchvision's centre crop
        box = (offset * w / self.resize, offset * h / self.resize, (offset + c) * w / self.resize, (offset + c) * h / self.resize)
        return View(tuple(int(round(v)) for v in box), (0, 0, c, c))  # type: ignore[arg-type]

    def _fitted(self, size: tuple[int, int]) -> tuple[int, int]:
        """(width, height) of an image of ``size`` scaled so that its longer side is the input side."""
        w, h = size
        scale = self.crop / max(w, h)
        return max(1, int(round(w * scale))), max(1, int(round(h * scale)))

    def _geometric(self, img: Image.Image, fill: tuple[float, ...]) -> torch.Tensor:
        """PIL image → tensor in [0, 1] of the model's input side, by this geometry (``fill``: padding)."""
        c = self.crop
        if self.geometry in ("full", "tile"):
            return TF.to_tensor(TF.resize(img, [c, c], interpolation=InterpolationMode.BILINEAR))
        if self.geometry == "letterbox":
            nw, nh = self._fitted(img.size)
            inner = TF.to_tensor(TF.resize(img, [nh, nw], interpolation=InterpolationMode.BILINEAR))
            out = torch.tensor(fill, dtype=inner.dtype).view(-1, 1, 1).expand(inner.shape[0], c, c).clone()
            left, top = (c - nw) // 2, (c - nh) // 2
            out[:, top : top + nh, left : left + nw] = inner
            return out
        img = TF.resize(img, [self.resize, self.resize], interpolation=InterpolationMode.BILINEAR)
        return TF.center_crop(TF.to_tensor(img), [c, c])

    def to_unit(self, img: Image.Image) -> torch.Tensor:
        """RGB PIL image → 3×C×C float tensor in [0, 1] (the geometry, no normalisation)."""
        return self._geometric(img, self.mean)

    def normalize(self, unit: torch.Tensor) -> torch.Tensor:
        """[0, 1] image tensor → ImageNet-normalised tensor."""
        return TF.normalize(unit, list(self.mean), list(self.std))

    def __call__(self, img: Image.Image) -> torch.Tensor:
        """RGB PIL image → normalised 3×C×C tensor."""
        return self.normalize(self.to_unit(img))

    def mask(self, mask: Image.Image | None) -> torch.Tensor:
        """'L' mask (or None for normal images) → 1×C×C tensor in [0, 1] (soft edges, spec §2.2)."""
        if mask is None:
            return torch.zeros(1, self.crop, self.crop)
        return self._geometric(mask, (0.0,))

    def denormalize(self, image: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`normalize` (for plots): 3×H×W → [0, 1]."""
        mean = torch.tensor(self.mean, device=image.device).view(-1, 1, 1)
        std = torch.tensor(self.std, device=image.device).view(-1, 1, 1)
        return (image * std + mean).clamp(0, 1)


def _starts(length: int, side: int, overlap: float) -> list[int]:
    """Start offsets of tiles of ``side`` along ``length``: evenly spread from 0 to ``length - side``,
    as few as keep neighbours overlapping by at least ``overlap · side``."""
    if length <= side:
        return [0]
    stride = max(1.0, side * (1.0 - overlap))
    n = math.ceil((length - side) / stride) + 1
    return [round(i * (length - side) / (n - 1)) for i in range(n)]
