"""MLflow pyfunc wrapper of a trained model: images in, anomaly maps + scores + threshold out."""

from __future__ import annotations

import json
import math
from pathlib import Path

import mlflow.pyfunc

__all__ = ["InpFormerPyfunc"]


class InpFormerPyfunc(mlflow.pyfunc.PythonModel):
    """pyfunc: a batch of images (any size) → anomaly maps, image scores and the stored threshold.

    Input: a numpy array B×H×W×3 uint8 (RGB) or B×3×C×C float32 already normalised.
    Output: dict with ``anomaly_maps`` (B×R×R float32), ``image_scores`` (B), ``threshold``
    (float, F1-optimal on the evaluation data) and ``is_anomalous`` (B bool).
    """

    def load_context(self, context):
        """Load the model folder and the inference settings."""
        from components.checkpoint import load_model

        self.model, _ = load_model(context.artifacts["model"])
        self.settings = json.loads(Path(context.artifacts["inference"]).read_text())

    def predict(self, context, model_input, params=None):
        """Score a batch."""
        import numpy as np
        import torch
        from PIL import Image

        from components.data.transforms import ImageTransform
        from components.engine import score_batch

        s = self.settings
        arr = np.asarray(model_input)
        tf = ImageTransform(resize=s["image_size"], crop=s["crop_size"])
        if arr.dtype == np.uint8:
            if arr.ndim == 3:
                arr = arr[None]
            batch = torch.stack([tf(Image.fromarray(a).convert("RGB")) for a in arr])
        else:
            batch = torch.as_tensor(arr, dtype=torch.float32)
        out_maps, out_scores = [], []
        with torch.no_grad():
            for chunk in torch.split(batch, 16):
                amap, score = score_batch(self.model, chunk, s["map"], s["resize"], s["blur_kernel"], s["blur_sigma"],
                                          s["top_ratio"], s["fused_l2_norm"])  # fmt: skip
                out_scores.append(score)
                out_maps.append(amap[:, 0])
        scores = torch.cat(out_scores).numpy()
        thr = float(s.get("image_threshold", math.nan))
        return {
            "anomaly_maps": torch.cat(out_maps).numpy(),
            "image_scores": scores,
            "threshold": thr,
            "is_anomalous": scores >= thr if math.isfinite(thr) else np.zeros(len(scores), bool),
        }
