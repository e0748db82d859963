"""``inpformer export``: the model as one ONNX or TorchScript scorer, checked against PyTorch.

The artifact holds the model and its post-processing (:mod:`components.scoring.export`) plus, as metadata,
the preprocessing contract, the scoring settings, the per-category thresholds and the model
version. At export time it is run on ``export.parity_images`` images of the evaluation split and
compared with PyTorch: maps to ``export.map_rtol`` and scores to ``export.score_rtol`` (relative to
the largest value); beyond that the export fails and nothing is kept. When the model came from the
workspace and tracking is on, the artifact is logged to the evaluation run that registered the
model, next to the registered version, and the version gets an ``export_<format>`` tag.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from components.data import batch as keys
from components.data.datasets import ImageDataset
from components.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from components.files import atomic_write_text
from components.scoring.export import FORMATS, ExportParityError, export_model, load_exported, parity
from components.scoring.onnx_int8 import quantize_onnx
from components.scoring.openvino_ir import WEIGHTS_SUFFIX, onnx_to_ir
from pipelines.config import Params
from pipelines.paths import EVAL_RUN_FILE, confined
from pipelines.serve.int8 import calibration_images, int8_gate
from pipelines.serve.predict import default_model, open_model
from pipelines.stages.records import evaluation_records, load_records
from pipelines.tracking.guard import tracking_failed, tracking_uri

logger = logging.getLogger(__name__)

__all__ = ["evaluation_batch", "export"]

INT8_FORMATS = {"openvino": ("OpenVINO", "openvino"), "onnx": ("ONNX Runtime", "onnxruntime")}  # name, runtime


def evaluation_batch(p: Params, package) -> tuple[torch.Tensor, list[str]]:
    """The first ``export.parity_images`` evaluation images (normals and anomalies), transformed,
    and their categories."""
    records = evaluation_records(p, load_records(p))
    if package.categories:
        records = [r for r in records if r.category in package.categories] or records
    normal = [r for r in records if r.label == 0]
    anomalous = [r for r in records if r.label == 1]
    n = p.export.parity_images
    chosen = ((anomalous[: n // 2] + normal)[:n] if anomalous else normal[:n]) or records[:n]
    ds = ImageDataset(chosen, package.transform)
    return torch.stack([ds[i][keys.IMAGE] for i in range(len(ds))]), [r.category for r in chosen]


def _parity_images(p: Params, package) -> torch.Tensor:
    return evaluation_batch(p, package)[0]


def export(
    p: Params, model_ref: str | None = None, out: str | None = None, progress: bool = False, int8: bool = False
) -> dict[str, Any]:
    """Export, check parity (INT8: the decision gate), log; returns a summary (path, parity numbers, run id)."""
    e = p.export
    if int8 and e.format not in INT8_FORMATS:
        raise ValueError(
            f"--int8 quantises an OpenVINO IR or an ONNX file: use --format openvino|onnx (not {e.format})."
        )
    ref = model_ref or default_model(p)
    package = open_model(p, ref, "cpu")  # exported on CPU: the artifact runs anywhere
    if package.model is None:
        msg = f"{ref}: export needs a PyTorch model (a model folder or registry URI), not an exported file."
        raise ValueError(msg)
    target = Path(out) if out else confined(Path(e.out_dir) / f"model{FORMATS[e.format]}")
    if target.suffix != FORMATS[e.format]:
        msg = f"{target}: a {e.format} export must end in {FORMATS[e.format]} (or pass --format)."
        raise ValueError(msg)
    target.parent.mkdir(parents=True, exist_ok=True)
    images = _parity_images(p, package)
    t = package.transform
    metadata = {
        "format": e.format,
        "version": package.version,
        "source": package.label,
        "preprocessing": {  # a reader's summary; the package below is what runtimes read
            "color": "RGB",
            "geometry": t.geometry,  # center_crop: resize, crop; full: resize; letterbox: fit + pad; tile
            "resize": f"{t.resize}x{t.resize} bilinear" if t.geometry == "center_crop" else f"{t.crop} bilinear",
            "input": t.crop,
            "scale": "1/255",
            "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD),
            "layout": "NCHW float32",
            **(
                {
                    "tiles": f"{t.tile or t.crop} px tiles, overlap >= {t.tile_overlap:g}, each resized to the input; "
                    "maps stitched (mean where tiles overlap), image score = top-ratio mean of the stitched map"
                }
                if t.tiled
                else {}
            ),
        },
        "outputs": {"maps": "B x 1 x R x R post-processed anomaly maps", "scores": "B image scores"},
        "package": replace(package.package, normalize=package.rule.normalized).to_dict(),
    }
    metadata["int8"] = e.int8_mode if int8 else "none"
    _write(p, package, metadata, target, images, int8)
    if int8:
        result = int8_gate(p, package, load_exported(target, "cpu", INT8_FORMATS[e.format][1]))
        ok = result["passed"]
    else:
        result = parity(package.model, package.scoring, load_exported(target), images)
        ok = result["map_rel"] <= e.map_rtol and result["score_rel"] <= e.score_rtol
    summary = {"path": str(target), "format": e.format, "version": package.version, **result, "passed": ok}
    if not ok:
        target.unlink(missing_ok=True)
        target.with_suffix(WEIGHTS_SUFFIX).unlink(missing_ok=True)
        if int8:
            raise ExportParityError(
                f"INT8 gate failed on {result['images']} images: {result['reason']}; {target} was removed."
            )
        msg = (
            f"parity check failed on {result['images']} images: maps differ by {result['map_rel']:.2e} "
            f"(limit {e.map_rtol:g}), scores by {result['score_rel']:.2e} (limit {e.score_rtol:g}); "
            f"{target} was removed."
        )
        raise ExportParityError(msg)
    report = target.with_name(target.name + ".parity.json")
    atomic_write_text(report, json.dumps(summary, indent=2))
    summary["run_id"] = _log(p, target, report, ref)
    if int8:
        name = INT8_FORMATS[e.format][0]
        print(f"exported {target} ({name} INT8, {e.int8_mode}) on {result['images']} images: {result['reason']}")
        return summary
    print(
        f"exported {target} ({e.format}, opset {e.opset if e.format == 'onnx' else '-'}): parity on "
        f"{result['images']} images: maps {result['map_rel']:.1e} ≤ {e.map_rtol:g}, "
        f"scores {result['score_rel']:.1e} ≤ {e.score_rtol:g}"
    )
    return summary


def _write(p: Params, package, metadata: dict[str, Any], target: Path, images: torch.Tensor, int8: bool) -> None:
    """The artifact: ONNX / TorchScript directly; OpenVINO from a temporary ONNX beside the target."""
    e = p.export
    if e.format != "openvino" and not int8:
        export_model(package.model, package.scoring, metadata, target, images[:2], e.opset, e.dynamic_batch)
        return
    onnx_file = target.with_name(target.stem + ".tmp" + FORMATS["onnx"])
    try:
        export_model(package.model, package.scoring, metadata, onnx_file, images[:2], e.opset, e.dynamic_batch)
        mode = e.int8_mode if int8 else "none"
        calibration = calibration_images(p, package) if mode == "full" else None
        if e.format == "onnx":
            quantize_onnx(onnx_file, target, mode, calibration)
        else:
            onnx_to_ir(onnx_file, target, json.dumps(metadata, sort_keys=True), mode, calibration)
    finally:
        onnx_file.unlink(missing_ok=True)


def _log(p: Params, target: Path, report: Path, ref: str) -> str:
    """Log the export to the run that registered the model (workspace models only); its run id."""
    if not p.tracking.enabled or not EVAL_RUN_FILE.is_file() or ref.startswith(("models:/", "runs:/")):
        return ""
    record = json.loads(EVAL_RUN_FILE.read_text())
    run_id = record.get("run_id", "")
    group = Path(ref).name
    if not run_id:
        return ""
    try:
        import mlflow

        mlflow.set_tracking_uri(tracking_uri(p))
        client = mlflow.MlflowClient()
        client.log_artifact(run_id, str(target), artifact_path=f"export-{group}")
        if target.with_suffix(WEIGHTS_SUFFIX).is_file() and target.suffix == FORMATS["openvino"]:
            client.log_artifact(run_id, str(target.with_suffix(WEIGHTS_SUFFIX)), artifact_path=f"export-{group}")
        client.log_artifact(run_id, str(report), artifact_path=f"export-{group}")
        version = record.get("registry", {}).get(group, {}).get("version")
        if version:
            uri = f"runs:/{run_id}/export-{group}/{target.name}"
            client.set_model_version_tag(p.tracking.registered_model, str(version), f"export_{p.export.format}", uri)
    except Exception as err:  # the export is written and checked: tracking errors only warn
        tracking_failed(p, "logging the export", err)
        return ""
    return run_id
