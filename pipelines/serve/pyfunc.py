"""MLflow pyfunc wrapper of a trained model: images in, per-category decisions out.

Input, one row per image (a pandas DataFrame, or JSON ``dataframe_records`` when served):

* ``image``: the encoded file (PNG, JPEG, …) as a base64 string, or
* ``pixels``: the image as nested lists H×W×3 of integers 0…255 (any integer dtype);
* ``category`` (optional): the image's category; default: the model's only category.

A numpy array B×H×W×3 of integers (any integer dtype) is accepted too when the Python model is
called past MLflow's signature check (``loaded.unwrap_python_model().predict(None, array,
params)``; ``category`` then comes from the ``category`` param).

Params: ``maps`` = ``none`` (default) or ``png`` — the map in the image's own pixel frame,
downsampled to ``map_size`` on the longer side, as a base64 16-bit PNG whose value v means
``v / 65535 * map_scale``; ``threshold``: override the image threshold (on the reported scale).

Output, one row per image: ``category``, ``score``, ``threshold``, ``decision`` (anomalous/normal/unknown),
``is_anomalous``, ``action`` (pass | review | reject: the review band) and, on request, ``map_png`` and ``map_scale``.
Decisions use the per-category thresholds registered with the model (:mod:`components.scoring.decision`).
"""

from __future__ import annotations

import base64
import binascii
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
from PIL import Image

from components.data.io import decode_rgb
from components.engine.checkpoint import WEIGHTS_FILE, load_model
from components.files import file_digest
from components.scoring.decision import ANOMALOUS
from components.scoring.scorer import LoadedModel, encode_map_png, score_pil, torch_scorer

__all__ = ["InpFormerPyfunc", "decode_rows", "model_signature"]

OVERRIDE_ACTIONS = {"anomalous": "reject", "normal": "pass", "unknown": "unknown"}  # a threshold override: no band

PREDICT_BATCH = 16  # images per forward pass inside predict()
UINT8_MAX = 255
MAP_CHOICES = ("none", "png")
DEFAULT_MAP_SIZE = 64


def model_signature(categories: list[str], map_size: int = DEFAULT_MAP_SIZE) -> Any:
    """The pyfunc's signature: optional ``image`` / ``pixels`` / ``category`` columns, params
    ``maps`` and ``threshold``; output columns as the module docstring says."""
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import Array, ColSpec, ParamSchema, ParamSpec, Schema

    inputs = Schema(
        [
            ColSpec("string", "image", required=False),
            ColSpec(Array(Array(Array("long"))), "pixels", required=False),
            ColSpec("string", "category", required=False),
        ]
    )
    outputs = Schema(
        [
            ColSpec("string", "category"),
            ColSpec("double", "score"),
            ColSpec("double", "threshold"),
            ColSpec("string", "decision"),
            ColSpec("boolean", "is_anomalous"),
            ColSpec("string", "action"),
            ColSpec("string", "map_png", required=False),
            ColSpec("double", "map_scale", required=False),
        ]
    )
    params = ParamSchema(
        [
            ParamSpec("maps", "string", "none"),
            ParamSpec("threshold", "double", None),
            ParamSpec("category", "string", categories[0] if len(categories) == 1 else ""),
            ParamSpec("map_size", "long", map_size),  # serve.map_size at registration
        ]
    )
    return ModelSignature(inputs=inputs, outputs=outputs, params=params)


def _from_pixels(arr: Any, where: str) -> Image.Image:
    a = np.asarray(arr)
    if not np.issubdtype(a.dtype, np.integer) or a.ndim not in (2, 3):
        msg = f"{where}: pixels must be H×W×3 (or H×W) integers 0…{UINT8_MAX}, got {a.dtype} of shape {a.shape}."
        raise ValueError(msg)
    if a.size and (a.min() < 0 or a.max() > UINT8_MAX):
        msg = f"{where}: integer images must hold values in 0…{UINT8_MAX}, got {a.min()}…{a.max()}."
        raise ValueError(msg)
    return Image.fromarray(a.astype(np.uint8)).convert("RGB")


def _from_base64(text: str, where: str) -> Image.Image:
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as err:
        msg = f"{where}: 'image' is not base64 ({err})."
        raise ValueError(msg) from err
    return decode_rgb(data, f"{where}: 'image' (base64)")


def decode_rows(model_input: Any, default_category: str) -> tuple[list[Image.Image], list[str]]:
    """(images, categories) from a DataFrame (``image`` / ``pixels`` / ``category``) or an integer array."""
    if isinstance(model_input, np.ndarray):
        arr = model_input[None] if model_input.ndim == 3 else model_input
        return [_from_pixels(a, f"image {i}") for i, a in enumerate(arr)], [default_category] * len(arr)
    frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
    images, categories = [], []
    for i, row in enumerate(frame.to_dict("records")):
        encoded, pixels = row.get("image"), row.get("pixels")
        if isinstance(encoded, str) and encoded:
            images.append(_from_base64(encoded, f"row {i}"))
        elif pixels is not None and not (isinstance(pixels, float) and np.isnan(pixels)):
            images.append(_from_pixels(_nested(pixels), f"row {i}"))
        else:
            msg = f"row {i}: give 'image' (base64 PNG/JPEG) or 'pixels' (H×W×3 integers)."
            raise ValueError(msg)
        category = row.get("category")
        categories.append(category if isinstance(category, str) and category else default_category)
    return images, categories


def _nested(pixels: Any) -> np.ndarray:
    """Nested lists / object arrays of rows → an integer array."""
    if isinstance(pixels, np.ndarray) and pixels.dtype != object:
        return pixels
    return np.array([[list(px) for px in row] for row in pixels] if len(pixels) else [], dtype=np.int64)


class InpFormerPyfunc(mlflow.pyfunc.PythonModel):
    """pyfunc: images (base64 files, pixel arrays) → per-category scores and decisions (see module)."""

    def load_context(self, context):
        """Load the model folder and its calibrated package (``package.json`` inside it); refuse a
        package whose thresholds were calibrated for other weights than the folder holds."""
        folder = Path(context.artifacts["model"])
        model, package = load_model(folder)
        if package.scoring is None:
            msg = f"{folder}: the registered package is not calibrated (no scoring settings)."
            raise ValueError(msg)
        held, described = file_digest(folder / WEIGHTS_FILE), package.provenance.weights_sha256
        if described and held != described:
            msg = (
                f"{folder}: its package was calibrated for weights {described[:12]}…, the folder holds "
                f"{held[:12]}…: this version's thresholds do not describe its weights. Register it again (evaluate)."
            )
            raise ValueError(msg)
        self.package = LoadedModel(torch_scorer(model, package.scoring), package, "pyfunc", "", model)

    def predict(self, context, model_input, params=None):
        """Score the rows; see the module docstring for the columns and params."""
        params = params or {}
        cats = self.package.categories
        default = params.get("category") or (cats[0] if len(cats) == 1 else "")
        images, categories = decode_rows(model_input, default)
        unknown = sorted({c for c in categories if c not in cats})
        if unknown:
            msg = f"categories {unknown} are not the model's {cats}: pass 'category' per row (or the 'category' param)."
            raise ValueError(msg)
        maps = params.get("maps") or "none"
        if maps not in MAP_CHOICES:
            msg = f"param maps={maps!r}: choose one of {MAP_CHOICES}."
            raise ValueError(msg)
        threshold = params.get("threshold")
        rows = []
        for start in range(0, len(images), PREDICT_BATCH):
            chunk = slice(start, start + PREDICT_BATCH)
            scored = score_pil(self.package, images[chunk], categories[chunk], PREDICT_BATCH)
            for res, category in zip(scored, categories[chunk]):
                score, thr, decision = self.package.rule.image(
                    category, res["raw_score"], None if threshold is None else float(threshold)
                )
                row = {
                    "category": category,
                    "score": score,
                    "threshold": thr,
                    "decision": decision,
                    "is_anomalous": decision == ANOMALOUS,
                    "action": res["action"] if threshold is None else OVERRIDE_ACTIONS[decision],
                }
                if maps == "png":
                    shown, _ = self.package.rule.pixel(category, res["map"])
                    row["map_png"], row["map_scale"] = encode_map_png(
                        shown, int(params.get("map_size") or DEFAULT_MAP_SIZE)
                    )
                rows.append(row)
        return pd.DataFrame(rows)
