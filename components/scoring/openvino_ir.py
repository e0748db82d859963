"""OpenVINO IR of an exported scorer: f32, or INT8 by NNCF post-training quantisation.

The IR is converted from the ONNX export (:mod:`components.scoring.export`: the model plus its
post-processing), so it has the same inputs, outputs and metadata contract; the ``inpformer`` JSON
is kept in the IR's runtime info. INT8 has two modes: ``weights`` (NNCF weight compression: INT8
weights, asymmetric per output channel, activations f32; 4x smaller weights) and ``full`` (NNCF
post-training quantisation of weights and activations, transformer preset with SmoothQuant and bias
correction, calibrated on training normals). Either way the post-processing stays f32 (the Gaussian
blur producing ``maps`` is excluded; resize, top-k and mean are never quantised). The anomaly map is
a reconstruction residual, which activation quantisation noise feeds straight into: accuracy is
gated by the caller on decisions, not on map tolerance.

openvino and nncf are imported inside the functions (optional extras).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["INT8_MODES", "IR_SUFFIX", "RT_KEY", "WEIGHTS_SUFFIX", "onnx_to_ir", "read_ir"]

IR_SUFFIX, WEIGHTS_SUFFIX = ".xml", ".bin"
RT_KEY = "inpformer"
MAPS_OUTPUT = "maps"
INT8_MODES = ("none", "weights", "full")


def _blur(model: Any) -> list[str]:
    """The friendly name of the op producing ``maps`` when it is the blur convolution (kept f32)."""
    producer = model.output(MAPS_OUTPUT).get_node().input_value(0).get_node()
    return [producer.get_friendly_name()] if producer.get_type_name() == "Convolution" else []


def onnx_to_ir(
    onnx_path: str | os.PathLike,
    target: str | os.PathLike,
    metadata: str,
    int8: str = "none",
    calibration: list[np.ndarray] | None = None,
) -> Path:
    """Write ``target`` (``.xml`` + ``.bin``) from an exported ONNX file. ``int8``: ``none`` (f32),
    ``weights`` (INT8 weights, asymmetric per channel; activations f32) or ``full`` (weights and
    activations, calibrated on ``calibration``: normalised batches 1×3×C×C float32). A failure
    leaves no file behind."""
    import openvino as ov

    if int8 not in INT8_MODES:
        raise ValueError(f"int8 mode {int8!r}: one of {INT8_MODES}.")
    target = Path(target)
    model = ov.convert_model(str(onnx_path))
    if int8 == "weights":
        import nncf

        model = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM)
    elif int8 == "full":
        import nncf

        if not calibration:
            raise ValueError("full INT8 quantisation needs calibration images.")

        scope = nncf.IgnoredScope(names=_blur(model), validate=False)
        model = nncf.quantize(
            model,
            nncf.Dataset(calibration),
            subset_size=len(calibration),
            model_type=nncf.ModelType.TRANSFORMER,
            ignored_scope=scope,
        )
    model.set_rt_info(metadata, RT_KEY)
    partial = target.with_name(target.stem + ".partial" + IR_SUFFIX)
    try:
        ov.save_model(model, str(partial), compress_to_fp16=False)
        partial.with_suffix(WEIGHTS_SUFFIX).replace(target.with_suffix(WEIGHTS_SUFFIX))
        partial.replace(target)
    finally:
        partial.unlink(missing_ok=True)
        partial.with_suffix(WEIGHTS_SUFFIX).unlink(missing_ok=True)
    return target


def read_ir(path: str | os.PathLike) -> tuple[Any, str]:
    """(the compiled model on CPU at f32 inference precision, its ``inpformer`` metadata text).

    Raises ValueError naming the file when it is not a readable IR or has no metadata."""
    import openvino as ov

    path = Path(path)
    if not path.with_suffix(WEIGHTS_SUFFIX).is_file():
        raise ValueError(f"{path}: its weights {path.with_suffix(WEIGHTS_SUFFIX).name} are missing beside it.")
    core = ov.Core()
    try:
        model = core.read_model(str(path))
    except Exception as err:  # OpenVINO raises RuntimeError with its parser's message
        raise ValueError(f"{path}: not a readable OpenVINO IR ({type(err).__name__}); export it again.") from err
    if not model.has_rt_info(RT_KEY):
        return core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"}), ""
    text = model.get_rt_info(RT_KEY).astype(str)
    # f32 for the layers left in float: OpenVINO would otherwise run bf16 on CPUs that have it
    return core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"}), text
