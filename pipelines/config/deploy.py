"""Params of deployment: decision thresholds, export, and predict / app / scheduled scoring."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from pipelines.config.base import Device, Seed, StrictParams

__all__ = ["ExportParams", "ServeParams", "ThresholdParams"]


class ThresholdParams(StrictParams):
    """How per-category decision thresholds are calibrated (components/scoring/decision.py)."""

    split: Literal["test", "validation"] = "test"  # test: F1-optimal on the evaluated images (paper's F1max)
    rule: Literal["f1", "max_fpr", "min_recall"] = "f1"  # the reject threshold (components/scoring/operating.py)
    max_fpr: float = Field(0.01, ge=0, le=1)  # rule max_fpr: flag at most this share of normal calibration images
    min_recall: float = Field(0.99, ge=0, le=1)  # rule min_recall: flag at least this share of anomalous ones
    review_rule: Literal["none", "max_fpr", "min_recall"] = "none"  # the review band's lower end ('none': no band)
    review_max_fpr: float = Field(0.1, ge=0, le=1)
    review_min_recall: float = Field(0.999, ge=0, le=1)
    validation_fraction: float = Field(0.3, gt=0, lt=1)  # split=validation: share of each category's test images
    fpr: float = Field(0.01, gt=0, lt=1)  # without anomalous calibration images: flag this share of normals
    normalize: bool = False  # report scores normalised so that 0.5 is every category's threshold
    max_normal_flag: float = Field(0.5, gt=0, le=1)  # warn when a threshold flags more normal calibration images
    seed: Seed = 0


class ExportParams(StrictParams):
    """``inpformer export``: formats, and the parity check against PyTorch at export time."""

    format: Literal["onnx", "torchscript", "openvino"] = "onnx"  # openvino: an IR (.xml + .bin), --int8 quantises it
    opset: int = Field(17, ge=11)
    dynamic_batch: bool = True
    parity_images: int = Field(8, ge=1)  # images of the evaluation split the export is checked on
    map_rtol: float = Field(1.0e-4, gt=0)  # max |map diff| / max |map|
    score_rtol: float = Field(1.0e-5, gt=0)  # max |score diff| / max |score|
    out_dir: str = "artifacts/export"
    int8_mode: Literal["weights", "full"] = "weights"  # --int8: INT8 weights only, or weights + activations
    int8_calibration_images: int = Field(32, ge=1)  # --int8 with int8_mode full: training normals NNCF calibrates on
    int8_min_agreement: float = Field(0.99, ge=0, le=1)  # --int8 gate: share of evaluation decisions kept
    int8_max_mad_drop: float = Field(0.005, ge=0)  # --int8 gate: largest mAD drop (0.005 = 0.5 points)


class ServeParams(StrictParams):
    """``inpformer predict``, ``inpformer app`` and ``inpformer serve-scoring``."""

    batch_size: int = Field(8, ge=1)
    device: Device = "auto"  # where predict, the app and scheduled scoring run PyTorch models
    runtime: Literal["onnxruntime", "openvino"] = "onnxruntime"  # what runs exported .onnx models
    heat_scale: float = Field(2.0, gt=0)  # overlay colour scale ends at this multiple of the pixel threshold
    map_size: int = Field(64, ge=8)  # side of the compact maps the pyfunc returns on request
    host: str = "127.0.0.1"
    port: int = Field(7860, ge=1, le=65535)
    model: str = ""  # default model of predict/app/scoring ('' : the workspace's only model)
    watch_out: str = "artifacts/scoring"  # where serve-scoring writes predictions and overlays
    allowed_hosts: list[str] = Field(default_factory=list)  # app: Host names answered besides the bound host/loopback
    max_upload_mb: float = Field(
        50.0, gt=0
    )  # app: largest request body (checked from Content-Length and while reading)
    max_concurrent: int = Field(2, ge=1)  # app: images scored at once; more requests get 503 at once
    latency_budget_ms: float = Field(500.0, gt=0)  # promotion gate: batch-1 latency a candidate may take here
