"""ONNX Runtime INT8 of an exported scorer (``inpformer export --format onnx --int8``).

Two modes, as for OpenVINO (:mod:`components.scoring.openvino_ir`): ``weights`` is ONNX Runtime's
dynamic quantisation (INT8 weights per output channel; each MatMul/Gemm quantises its input on the
fly per call, so there is nothing to calibrate) and ``full`` its static quantisation (QDQ format,
INT8 weights per channel, activations calibrated on training normals, MatMul/Gemm/Conv). The
post-processing stays f32 either way: the Gaussian blur producing ``maps`` is excluded, and resize,
top-k and mean are never quantised. The ``inpformer`` metadata of the f32 file is carried over, so
readers (:func:`components.scoring.export.load_exported`) treat it like any ONNX export. Accuracy is
gated by the caller on decisions, not on map tolerance.

onnx and onnxruntime are imported inside the functions (optional extras).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

__all__ = ["ONNX_INT8_MODES", "quantize_onnx"]

ONNX_INT8_MODES = ("weights", "full")
MAPS_OUTPUT = "maps"
STATIC_OPS = ("MatMul", "Gemm", "Conv")
DYNAMIC_OPS = ("MatMul", "Gemm")


def _blur(graph) -> list[str]:
    """The name of the node producing ``maps`` when it is the blur convolution (kept f32)."""
    producer = next((n for n in graph.node if MAPS_OUTPUT in n.output), None)
    return [producer.name] if producer is not None and producer.op_type == "Conv" and producer.name else []


class _Calibration:
    """ONNX Runtime's calibration reader over normalised 1×3×C×C float32 batches."""

    def __init__(self, input_name: str, batches: list[np.ndarray]) -> None:
        self.items = iter([{input_name: b} for b in batches])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.items, None)


def quantize_onnx(
    onnx_path: str | os.PathLike,
    target: str | os.PathLike,
    int8: str,
    calibration: list[np.ndarray] | None = None,
) -> Path:
    """Write ``target`` (``.onnx``) quantised from the f32 export ``onnx_path`` (see the module).
    A failure leaves no file behind."""
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

    if int8 not in ONNX_INT8_MODES:
        raise ValueError(f"int8 mode {int8!r}: one of {ONNX_INT8_MODES}.")
    source = onnx.load(str(onnx_path))
    metadata = {p.key: p.value for p in source.metadata_props}
    exclude = _blur(source.graph)
    target = Path(target)
    partial = target.with_name(target.stem + ".partial" + target.suffix)
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))  # the quantiser logs every skipped tensor and generic advice on root
    try:
        if int8 == "weights":
            quantize_dynamic(
                str(onnx_path),
                str(partial),
                per_channel=True,
                weight_type=QuantType.QInt8,
                op_types_to_quantize=list(DYNAMIC_OPS),
                nodes_to_exclude=exclude,
            )
        else:
            if not calibration:
                raise ValueError("full INT8 quantisation needs calibration images.")
            quantize_static(
                str(onnx_path),
                str(partial),
                _Calibration(source.graph.input[0].name, calibration),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=QuantType.QInt8,
                weight_type=QuantType.QInt8,
                op_types_to_quantize=list(STATIC_OPS),
                nodes_to_exclude=exclude,
            )
        quantised = onnx.load(str(partial))
        del quantised.metadata_props[:]
        for key, value in metadata.items():
            quantised.metadata_props.add(key=key, value=value)
        onnx.save(quantised, str(partial))
        partial.replace(target)
    finally:
        root.setLevel(level)
        partial.unlink(missing_ok=True)
    return target
