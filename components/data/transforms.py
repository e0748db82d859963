"""Image and mask transforms of the official code (method spec §2), sizes from params.

Image: RGB → resize to (R, R) ignoring aspect ratio (bilinear, antialiased PIL) → [0, 1] tensor →
centre crop C → ImageNet normalisation. Mask: the same resize (bilinear, so edges soften) → crop.
Pseudo anomalies are blended on the un-normalised [0, 1] crop (spec §13.6), so the two halves are
separate methods.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "ImageTransform"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ImageTransform:
    """Resize → crop → normalise (spec §2.1) with explicit sizes.

    Args:
        resize: side of the square resize (448 officially).
        crop: side of the centre crop (392 officially); must not exceed ``resize``.
        mean, std: normalisation constants.
    """

    resize: int = 448
    crop: int = 392
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        if self.crop > self.resize or self.crop < 1:
            msg = f"crop ({self.crop}) must be between 1 and resize ({self.resize})."
            raise ValueError(msg)

    def to_unit(self, img: Image.Image) -> torch.Tensor:
        """RGB PIL image → 3×C×C float tensor in [0, 1] (resize + crop, no normalisation)."""
        img = TF.resize(img, [self.resize, self.resize], interpolation=InterpolationMode.BILINEAR)
        return TF.center_crop(TF.to_tensor(img), [self.crop, self.crop])

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
        mask = TF.resize(mask, [self.resize, self.resize], interpolation=InterpolationMode.BILINEAR)
        return TF.center_crop(TF.to_tensor(mask), [self.crop, self.crop])

    def denormalize(self, image: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`normalize` (for plots): 3×H×W → [0, 1]."""
        mean = torch.tensor(self.mean, device=image.device).view(-1, 1, 1)
        std = torch.tensor(self.std, device=image.device).view(-1, 1, 1)
        return (image * std + mean).clamp(0, 1)
