"""INP-Former++ segmentation head (method spec §13.4).

The paper says only "two transposed-conv layers plus one conv layer". The default ``onenip``
layout is the inference of spec §13.4 (its 2.885 M parameters at C=768, 256 channels match the
142.7 M − 139.8 M budget): [3×3 conv (no bias) → BN → ReLU → 2×2/2 ConvT] × 2 → 1×1 conv.
``plain`` is the literal reading: ConvT → ReLU → ConvT → ReLU → 1×1 conv.
"""

from __future__ import annotations

import torch
from torch import nn

from components.constants import SEG_HEAD_LAYOUTS

__all__ = ["SEG_HEAD_LAYOUTS", "SegmentationHead"]


class SegmentationHead(nn.Module):
    """Residual features B×C×h×w → anomaly logits B×1×(4h)×(4w).

    Args:
        in_channels: C, the encoder width.
        channels: hidden width (256 in the OneNIP-style default).
        layout: ``onenip`` or ``plain`` (see module docstring).
    """

    def __init__(self, in_channels: int, channels: int = 256, layout: str = "onenip") -> None:
        super().__init__()
        if layout not in SEG_HEAD_LAYOUTS:
            msg = f"seg head layout must be one of {SEG_HEAD_LAYOUTS}, got {layout!r}."
            raise ValueError(msg)
        if channels < 1:
            msg = f"seg head channels must be >= 1, got {channels}."
            raise ValueError(msg)
        self.layout = layout
        if layout == "onenip":
            self.block1 = nn.Sequential(
                nn.Conv2d(in_channels, channels, 3, padding=1, bias=False),
                nn.BatchNorm2d(channels),
                nn.ReLU(inplace=True),
                nn.ConvTranspose2d(channels, channels, 2, stride=2),
            )
            self.block2 = nn.Sequential(
                nn.Conv2d(channels, channels, 3, padding=1, bias=False),
                nn.BatchNorm2d(channels),
                nn.ReLU(inplace=True),
                nn.ConvTranspose2d(channels, channels, 2, stride=2),
            )
        else:
            self.block1 = nn.Sequential(nn.ConvTranspose2d(in_channels, channels, 2, stride=2), nn.ReLU())
            self.block2 = nn.Sequential(nn.ConvTranspose2d(channels, channels, 2, stride=2), nn.ReLU())
        self.predictor = nn.Conv2d(channels, 1, 1)

    def forward(self, residual: torch.Tensor) -> torch.Tensor:
        """residual: B×C×h×w → logits B×1×4h×4w."""
        return self.predictor(self.block2(self.block1(residual)))
