"""The keys of a training/evaluation sample, defined once for every dataset and the loops.

Every dataset yields a dict with these keys (tensors batched by the DataLoader):

================  ======================  ==============================================
key               shape                   meaning
================  ======================  ==============================================
``image``         3×C×C float             ImageNet-normalised crop
``mask``          1×C×C float in [0, 1]   ground truth (zeros for normal images)
``label``         int                     0 normal, 1 anomalous
``path``          str                     image file
``category``      str                     category name
``anomaly_image`` 3×C×C float             pseudo/pasted anomaly (residual learning)
``anomaly_mask``  1×C×C float in {0, 1}   its mask
``features``      (1+G)×N×C float         cached encoder outputs instead of ``image``
``anomaly_features`` (1+G)×N×C float      cached encoder outputs instead of ``anomaly_image``
================  ======================  ==============================================
"""

from __future__ import annotations

from typing import TypedDict

import torch

__all__ = [
    "ANOMALY_FEATURES",
    "ANOMALY_IMAGE",
    "ANOMALY_MASK",
    "CATEGORY",
    "FEATURES",
    "IMAGE",
    "LABEL",
    "MASK",
    "PATH",
    "Sample",
]

IMAGE = "image"
MASK = "mask"
LABEL = "label"
PATH = "path"
CATEGORY = "category"
ANOMALY_IMAGE = "anomaly_image"
ANOMALY_MASK = "anomaly_mask"
FEATURES = "features"
ANOMALY_FEATURES = "anomaly_features"


class Sample(TypedDict, total=False):
    """One dataset item (see the table in the module docstring)."""

    image: torch.Tensor
    mask: torch.Tensor
    label: int
    path: str
    category: str
    anomaly_image: torch.Tensor
    anomaly_mask: torch.Tensor
    features: torch.Tensor
    anomaly_features: torch.Tensor
