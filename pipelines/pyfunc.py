"""MLflow pyfunc wrapper of a trained model: images in, anomaly maps + scores + threshold out."""

from __future__ import annotations

import json
import math
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import torch
from PIL import Image

from components.checkpoint import load_model
from components.data.transforms import ImageTransform
from components.inference import ScoringConfig, score_batch
from pipelines.registry import MODEL_PACKAGE_FILE

__all__ = ["InpFormerPyfunc"]

PREDICT_BATCH = 16  # images per forward pass inside predict()
UINT8_MAX = 255


class InpFormerPyfunc(mlflow.pyfunc.PythonModel):
    """pyfunc: a batch of images (any size) → anomaly maps, image scores and the stored threshold.

    Input: a numpy array B×H×W×3 of integers in 0…255 (RGB; any integer dtype, as JSON delivers
    int64) or B×3×C×C float32 already normalised.
    Output: dict with ``anomaly_maps`` (B×R×R float32), ``image_scores`` (B), ``threshold``
    (float, F1-optimal on the evaluation data) and ``is_anomalous`` (B bool).
    """

    def load_context(self, context):
        """Load the model folder and its scoring settings (``scoring.json`` inside it)."""
        folder = Path(context.artifacts["model"])
        self.model, _ = load_model(folder)
        self.settings = json.loads((folder / MODEL_PACKAGE_FILE).read_text())
        self.scoring = ScoringConfig.from_dict(self.settings["scoring"])
        self.transform = ImageTransform(resize=self.settings["image_size"], crop=self.settings["crop_size"])

    def to_batch(self, arr: np.ndarray) -> torch.Tensor:
        """Images of any integer dtype (JSON sends int64) in 0…255, B×H×W×3 or H×W×3 → the model's
        normalised B×3×C×C batch; float arrays are taken as already normalised."""
        if np.issubdtype(arr.dtype, np.integer):
            if arr.size and (arr.min() < 0 or arr.max() > UINT8_MAX):
                msg = f"integer images must hold values in 0…{UINT8_MAX}, got {arr.min()}…{arr.max()}."
                raise ValueError(msg)
            arr = arr.astype(np.uint8)
            if arr.ndim == 3:
                arr = arr[None]
            return torch.stack([self.transform(Image.fromarray(a).convert("RGB")) for a in arr])
        return torch.as_tensor(arr, dtype=torch.float32)

    def predict(self, context, model_input, params=None):
        """Score a batch."""
        batch = self.to_batch(np.asarray(model_input))
        out_maps, out_scores = [], []
        for chunk in torch.split(batch, PREDICT_BATCH):
            amap, score = score_batch(self.model, chunk, self.scoring)
            out_scores.append(score)
            out_maps.append(amap[:, 0])
        scores = torch.cat(out_scores).numpy()
        thr = float(self.settings.get("image_threshold", math.nan))
        return {
            "anomaly_maps": torch.cat(out_maps).numpy(),
            "image_scores": scores,
            "threshold": thr,
            "is_anomalous": scores >= thr if math.isfinite(thr) else np.zeros(len(scores), bool),
        }
