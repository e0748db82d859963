"""The drift reference the evaluate stage stores per category in the model package
(:mod:`components.scoring.drift`): the held-out normal test scores, and the pooled encoder features
of up to ``drift.reference_images`` training images (none under the ``tile`` geometry)."""

from __future__ import annotations

import numpy as np

from components.data.datasets import ImageDataset, Record
from components.data.transforms import ImageTransform
from components.model import InpFormer
from components.scoring.drift import DriftReference
from components.scoring.inference import InferenceResult, pooled_features
from pipelines.config import Params

__all__ = ["drift_reference"]


def drift_reference(
    p: Params, model: InpFormer, train: list[Record], res: InferenceResult, tf: ImageTransform, device: str
) -> DriftReference:
    """One category's reference from its training records ``train`` and its scored test images ``res``."""
    normal = np.asarray(res.scores)[np.asarray(res.labels) == 0]
    if tf.tiled or not train:
        return DriftReference.of(normal, None)
    ds = ImageDataset(sorted(train, key=lambda r: r.path), tf)
    return DriftReference.of(normal, pooled_features(model, ds, p.eval.batch_size, device, p.drift.reference_images))
