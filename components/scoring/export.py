"""Export a trained model as one self-contained scorer (ONNX or TorchScript), and run it.

The exported graph is :func:`components.scoring.inference.score_batch`: normalised images B×3×C×C float32 →
``maps`` B×1×R×R (post-processed: resize, Gaussian blur) and ``scores`` B (top-ratio mean). The
preprocessing is a contract written into the artifact's metadata (``inpformer`` JSON, also the
thresholds and categories): RGB, resize to ``image_size``² (bilinear), centre crop ``crop_size``,
scale to 0…1, normalise with ``mean``/``std``. The batch dimension is dynamic on request; the image
size is fixed (the position table is resized for it at export time).

onnx and onnxruntime are imported inside the functions (the ``export`` extra).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from components.errors import ExportParityError, RuntimeMissingError
from components.files import disk_full_as_error
from components.scoring.inference import ScoringConfig, score_batch

__all__ = [
    "ExportParityError",
    "RuntimeMissingError",
    "Scorer",
    "ScoringModule",
    "export_model",
    "load_exported",
    "parity",
]

METADATA_KEY = "inpformer"
INPUT_NAME, OUTPUT_NAMES = "images", ("maps", "scores")
TORCHSCRIPT_META = "inpformer.json"
FORMATS = {"onnx": ".onnx", "torchscript": ".pt", "openvino": ".xml"}  # openvino: an IR converted from the ONNX


class ScoringModule(nn.Module):
    """The model plus its post-processing as one module: images → (maps B×1×R×R, scores B)."""

    def __init__(self, model: nn.Module, scoring: ScoringConfig) -> None:
        super().__init__()
        self.model, self.scoring = model, scoring

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return score_batch(self.model, images, self.scoring)


def check_external_data(graph: Any, path: Path) -> None:
    """Every tensor an ONNX file keeps outside itself lies in the file's own folder (a model file is
    untrusted input: ``location: ../../etc/shadow`` must not be read). Raises ValueError naming it."""
    import onnx

    folder = path.resolve().parent
    tensors = list(graph.graph.initializer)
    for node in graph.graph.node:
        tensors += [a.t for a in node.attribute if a.type == onnx.AttributeProto.TENSOR]
    for tensor in tensors:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        target = (folder / location).resolve()
        if not location or Path(location).is_absolute() or not target.is_relative_to(folder):
            msg = (
                f"{path}: tensor {tensor.name!r} points at external data {location!r} outside the model's folder "
                f"{folder}; refusing to read it. Export the model again."
            )
            raise ValueError(msg)


class Scorer:
    """Runs an exported artifact: ``scorer(images)`` → (maps B×R×R, scores B) as numpy float32.

    Attributes:
        metadata: the artifact's ``inpformer`` JSON (scoring, sizes, thresholds, categories).
    """

    def __init__(self, path: str | os.PathLike, device: str = "cpu", runtime: str = "onnxruntime") -> None:
        path = Path(path)
        self.path, self.device, self.runtime = path, device, runtime
        self.session = self.module = self.compiled = None
        if path.suffix == FORMATS["onnx"]:
            import onnx

            try:
                graph = onnx.load(str(path), load_external_data=False)
            except Exception as err:  # protobuf's DecodeError and friends: not an ONNX file
                msg = f"{path}: not a readable ONNX file ({type(err).__name__}); export it again."
                raise ValueError(msg) from err
            check_external_data(graph, path)
            meta = {p.key: p.value for p in graph.metadata_props}
            if runtime == "openvino":
                import openvino

                # f32: OpenVINO would otherwise run bf16 on CPUs that have it (maps off by ~1e-2)
                self.compiled = openvino.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
            else:
                import onnxruntime as ort

                wanted = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device.startswith("cuda") else []
                available = ort.get_available_providers()
                providers = [p for p in wanted if p in available] or ["CPUExecutionProvider"]
                self.session = ort.InferenceSession(str(path), providers=providers)
        elif path.suffix == FORMATS["openvino"]:
            from components.scoring.openvino_ir import read_ir

            self.compiled, text = read_ir(path)
            meta = {METADATA_KEY: text} if text else {}
        else:
            files = {TORCHSCRIPT_META: ""}
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # torch.jit deprecation, see export_model
                self.module = torch.jit.load(str(path), map_location=device, _extra_files=files)
            meta = {METADATA_KEY: files[TORCHSCRIPT_META]}
        if METADATA_KEY not in meta:
            msg = f"{path}: no '{METADATA_KEY}' metadata; export it with `inpformer export`."
            raise ValueError(msg)
        try:
            self.metadata: dict[str, Any] = json.loads(meta[METADATA_KEY])
        except (ValueError, RecursionError) as err:
            msg = f"{path}: its '{METADATA_KEY}' metadata is not valid JSON ({err}); export it again."
            raise ValueError(msg) from err
        if not isinstance(self.metadata, dict):
            msg = f"{path}: its '{METADATA_KEY}' metadata is not a JSON object; export it again."
            raise ValueError(msg)

    def __call__(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """images B×3×C×C (normalised) → (maps B×R×R, scores B)."""
        if self.compiled is not None:
            out = self.compiled([images.cpu().numpy()])
            return np.asarray(out[OUTPUT_NAMES[0]])[:, 0], np.asarray(out[OUTPUT_NAMES[1]])
        if self.session is not None:
            maps, scores = self.session.run(list(OUTPUT_NAMES), {INPUT_NAME: images.cpu().numpy()})
            return maps[:, 0], scores
        with torch.no_grad():
            maps, scores = self.module(images.to(self.device))
        return maps[:, 0].float().cpu().numpy(), scores.float().cpu().numpy()  # float: bf16 under autocast


def export_model(
    model: nn.Module,
    scoring: ScoringConfig,
    metadata: dict[str, Any],
    target: str | os.PathLike,
    example: torch.Tensor,
    opset: int = 17,
    dynamic_batch: bool = True,
) -> Path:
    """Write ``target`` (``.onnx`` or ``.pt``, by suffix) from ``model`` traced on ``example`` B×3×C×C.

    Written beside the target first, then moved: a failed export leaves nothing behind.
    """
    target = Path(target)
    if target.suffix == FORMATS["onnx"] and importlib.util.find_spec("onnx") is None:
        msg = f"{target}: exporting to ONNX needs onnx: pip install 'inpformer[export]'."
        raise RuntimeMissingError(msg)
    module = ScoringModule(model.eval(), scoring).eval()
    partial = target.with_name(target.name + ".partial")
    try:
        with disk_full_as_error(target):
            _export(module, metadata, target, partial, example, opset, dynamic_batch)
            partial.replace(target)
    except BaseException:
        partial.unlink(missing_ok=True)  # never a half-written file beside the target
        raise
    return target


def _export(
    module: nn.Module,
    metadata: dict[str, Any],
    target: Path,
    partial: Path,
    example: torch.Tensor,
    opset: int,
    dynamic_batch: bool,
) -> None:
    text = json.dumps(metadata, sort_keys=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # sizes become constants: intended
        # the TorchScript-based exporter and torch.jit are deprecated in new torch releases but present
        # through 2.14 (our range) and need no onnxscript; the parity check guards their output
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        if target.suffix == FORMATS["onnx"]:
            import onnx

            axes = {n: {0: "batch"} for n in (INPUT_NAME, *OUTPUT_NAMES)} if dynamic_batch else None
            torch.onnx.export(
                module,
                (example,),
                str(partial),
                input_names=[INPUT_NAME],
                output_names=list(OUTPUT_NAMES),
                dynamic_axes=axes,
                opset_version=opset,
                dynamo=False,
            )
            graph = onnx.load(str(partial))
            entry = graph.metadata_props.add()
            entry.key, entry.value = METADATA_KEY, text
            onnx.save(graph, str(partial))
        elif target.suffix == FORMATS["torchscript"]:
            with torch.no_grad():
                traced = torch.jit.trace(module, (example,), check_trace=False)
            torch.jit.save(traced, str(partial), _extra_files={TORCHSCRIPT_META: text})
        else:
            partial.unlink(missing_ok=True)
            msg = f"{target}: the export target must end in {' or '.join(FORMATS.values())}."
            raise ValueError(msg)


def parity(
    model: nn.Module, scoring: ScoringConfig, scorer: Scorer, images: torch.Tensor, batch_size: int = 4
) -> dict[str, float]:
    """Relative differences of the exported scorer from PyTorch on ``images`` N×3×C×C.

    Returns ``map_rel`` = max |Δmap| / max |map| and ``score_rel`` = max |Δscore| / max |score|.
    """
    ref_maps, ref_scores, maps, scores = [], [], [], []
    for chunk in torch.split(images, batch_size):
        m, s = score_batch(model, chunk, scoring)
        ref_maps.append(m[:, 0].numpy())
        ref_scores.append(s.numpy())
        em, es = scorer(chunk)
        maps.append(em)
        scores.append(es)
    rm, rs, em, es = (np.concatenate(x).astype(np.float64) for x in (ref_maps, ref_scores, maps, scores))
    return {
        "map_rel": float(np.abs(em - rm).max() / max(np.abs(rm).max(), 1e-12)),
        "score_rel": float(np.abs(es - rs).max() / max(np.abs(rs).max(), 1e-12)),
        "images": len(rs),
    }


def load_exported(path: str | os.PathLike, device: str = "cpu", runtime: str = "onnxruntime") -> Scorer:
    """A :class:`Scorer` of an exported artifact (ONNX files run on ``runtime``: onnxruntime or
    openvino); a clear error when that runtime is missing."""
    if Path(path).suffix == FORMATS["openvino"] and importlib.util.find_spec("openvino") is None:
        raise RuntimeMissingError(f"{path}: OpenVINO IR models need openvino: pip install 'inpformer[openvino]'.")
    if Path(path).suffix == FORMATS["onnx"]:
        try:
            importlib.import_module("onnx")
            importlib.import_module(runtime)
        except ImportError as err:
            msg = f"{path}: ONNX models on {runtime} need it installed: pip install 'inpformer[export]' ({runtime})."
            raise RuntimeMissingError(msg) from err
    return Scorer(path, device, runtime)
