"""``inpformer predict``: score new images with a trained or registered model.

For every image: a row in ``predictions.csv`` and ``predictions.jsonl`` (path, category, score,
the category's image threshold, decision, model) and an overlay PNG in the image's own pixel frame
(heat map on a per-category scale of 0…2× the category's pixel threshold, and the outline of the
thresholded mask); optionally the raw map as ``.npy`` (NaN outside what the model saw).

* Model: a workspace model folder (``artifacts/models/<group>``: scoring and thresholds from the
  package the evaluate stage calibrated, ``artifacts/eval/packages/<group>/package.json``), a registry
  URI (``models:/inpformer@champion``: the package registered with it) or an exported file (the
  package in its metadata). Every one is read by :func:`components.scoring.package.read_package`.
* Category: ``--category``, else the first folder of the image's path that names one of the model's
  categories, else the model's only category; an unknown category is an error.
* Folders are searched recursively; masks under ``ground_truth/`` (MVTec layout) are not scored.
* Bad files (corrupt, empty, not an image, too many pixels) are reported and skipped, never fatal.
"""

from __future__ import annotations

import base64
import csv
import glob
import io
import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from components.data.io import ImageReadError, is_image_file, read_rgb
from components.engine.checkpoint import DIGEST_FILE, WEIGHTS_FILE, load_model
from components.files import atomic_write_text, file_digest
from components.scoring.decision import ANOMALOUS
from components.scoring.export import FORMATS, load_exported
from components.scoring.package import LEGACY_SCORING_FILE, PACKAGE_FILE, ModelPackage, read_package
from components.scoring.scorer import LoadedModel, encode_map_png, overlay_for, score_pil, torch_scorer
from pipelines.builders import build_scoring, resolve_device
from pipelines.config import Params
from pipelines.paths import MODELS_DIR, calibrated_package_dir
from pipelines.tracking.guard import tracking_uri

logger = logging.getLogger(__name__)

__all__ = [
    "LoadedModel",
    "ScoreSummary",
    "collect_images",
    "default_model",
    "open_model",
    "overlay_for",
    "predict_images",
    "score_images",
    "score_pil",
]

CSV_COLUMNS = ("path", "category", "score", "threshold", "decision", "model", "version")
REGISTRY_SCHEMES = ("models:/", "runs:/")
MASK_FOLDER = "ground_truth"  # masks of an MVTec-layout tree: not images to score


@dataclass(frozen=True)
class ScoreSummary:
    """What a predict or scoring run wrote: one row per scored image (as in predictions.jsonl) and
    the files it skipped (their messages)."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    @property
    def scored(self) -> int:
        """Images scored."""
        return len(self.rows)

    @property
    def anomalous(self) -> int:
        """Images decided anomalous."""
        return sum(r["decision"] == ANOMALOUS for r in self.rows)


def collect_images(sources: list[str], limit: int | None = None) -> list[tuple[Path, Path]]:
    """(image, the source it came from) for files, folders (recursive) and globs, sorted, at most ``limit``."""
    found: list[tuple[Path, Path]] = []
    for source in sources:
        matches = [Path(m) for m in sorted(glob.glob(source, recursive=True))] or [Path(source)]  # noqa: PTH207 (absolute globs)
        for m in matches:
            if m.is_dir():
                files = (f for f in sorted(m.rglob("*")) if f.is_file() and is_image_file(f))
                found += [(f, m) for f in files if MASK_FOLDER not in f.relative_to(m).parts]
            elif m.is_file():
                found.append((m, m.parent))
            else:
                msg = f"{source}: no such file, folder or matching glob."
                raise FileNotFoundError(msg)
    if not found:
        msg = f"no image files in {', '.join(sources)} (extensions: png, jpg, jpeg, bmp, tif, tiff, webp)."
        raise FileNotFoundError(msg)
    return found[:limit] if limit else found


def _from_registry(p: Params, uri: str, dst: Path) -> tuple[Path, str]:
    """Download a registered model into ``dst``: (its model folder, its version)."""
    import mlflow  # heavy: only for registry URIs

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one line per file otherwise

    mlflow.set_tracking_uri(tracking_uri(p))  # the workspace's store, as every stage resolves it
    local = Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(dst)))
    folders = [f.parent for f in local.rglob(PACKAGE_FILE)] or [f.parent for f in local.rglob(LEGACY_SCORING_FILE)]
    if len(folders) != 1:
        msg = f"{uri}: expected one model folder with {PACKAGE_FILE}, found {len(folders)}."
        raise ValueError(msg)
    version = uri.rsplit("/", 1)[-1]
    if uri.startswith("models:/") and "@" in uri:
        name, alias = uri[len("models:/") :].split("@", 1)
        version = str(mlflow.MlflowClient().get_model_version_by_alias(name, alias).version)
    return folders[0], f"v{version}" if version.isdigit() else version


def _weights_id(folder: Path) -> str:
    """A short id of a model folder's weights (from its digest.json, else the file itself)."""
    digest = folder / DIGEST_FILE
    if digest.is_file():
        entry = json.loads(digest.read_text()).get(WEIGHTS_FILE, {})
        if entry.get("sha256"):
            return str(entry["sha256"])[:12]
    weights = folder / WEIGHTS_FILE
    return file_digest(weights)[:12] if weights.is_file() else "unknown"


def default_model(p: Params) -> str:
    """``serve.model``, else the workspace's only model folder."""
    if p.serve.model:
        return p.serve.model
    groups = sorted(d.name for d in MODELS_DIR.iterdir() if d.is_dir()) if MODELS_DIR.is_dir() else []
    if len(groups) != 1:
        msg = f"{MODELS_DIR} holds {len(groups)} models ({groups}): choose one with --model (or serve.model)."
        raise ValueError(msg)
    return str(MODELS_DIR / groups[0])


def open_model(p: Params, ref: str | None, device: str) -> LoadedModel:
    """The model of ``ref``: a model folder, a registry URI or an exported ``.onnx`` / ``.pt`` file
    (default: :func:`default_model`)."""
    ref = ref or default_model(p)
    if ref.endswith(tuple(FORMATS.values())):
        if not Path(ref).is_file():
            msg = f"{ref}: no such exported model; write one with `inpformer export`."
            raise FileNotFoundError(msg)
        scorer = load_exported(ref, device, p.serve.runtime)
        meta = scorer.metadata
        if "package" not in meta:
            msg = f"{ref}: exported before model packages (no 'package' in its metadata); export it again."
            raise ValueError(msg)
        package = ModelPackage.from_dict(meta["package"], f"{ref} (metadata 'package')")
        return LoadedModel(scorer, package, ref, str(meta.get("version", "exported")))
    with tempfile.TemporaryDirectory(prefix="inpformer-model-") as tmp:
        if ref.startswith(REGISTRY_SCHEMES):
            folder, version = _from_registry(p, ref, Path(tmp))
        else:
            folder, version = Path(ref), ""
            if not folder.is_dir():
                msg = f"{ref}: not a model folder, registry URI (models:/…, runs:/…) or .onnx/.pt file."
                raise FileNotFoundError(msg)
        model, package = load_model(folder, device)
        version = version or _weights_id(folder)
    if not package.calibrated:
        package = _calibrated(p, package, model.seg_head is not None)
    return LoadedModel(torch_scorer(model, package.scoring, device), package, ref, version, model)


def _calibrated(p: Params, package: ModelPackage, has_head: bool) -> ModelPackage:
    """A workspace model's package as the evaluate stage calibrated it; else scoring from params.yaml
    and no thresholds (decisions ``unknown``)."""
    folder = calibrated_package_dir(package.group)
    if not (folder / PACKAGE_FILE).is_file():
        return package.calibrate(build_scoring(p, has_head), {}, normalize=p.eval.threshold.normalize)
    calibrated = read_package(folder)
    ours, theirs = package.provenance.weights_sha256, calibrated.provenance.weights_sha256
    if ours and theirs and ours != theirs:
        logger.warning(
            "%s was calibrated for other weights (%s…, the model has %s…): re-run `inpformer evaluate`.",
            folder / PACKAGE_FILE,
            theirs[:12],
            ours[:12],
        )
    return calibrated


def _categories(images: list[tuple[Path, Path]], package: LoadedModel, forced: str | None) -> list[str]:
    """Each image's category (see the module docstring); one error listing the images without one."""
    out, unknown = [], []
    for image, root in images:
        parts = [*image.relative_to(root).parts[:-1], root.resolve().name]
        category = forced or next((c for c in parts if c in package.categories), "")
        if not category and len(package.categories) == 1:
            category = package.categories[0]
        if category not in package.categories:
            unknown.append(f"{image} ({category or 'no category in its path'})")
        out.append(category)
    if unknown:
        msg = (
            f"{len(unknown)} image(s) of no category of the model {package.categories}, e.g. {unknown[0]}. "
            "Pass --category or put the images in a folder named after their category."
        )
        raise ValueError(msg)
    return out


def predict_images(
    p: Params, sources: list[str], out: str | os.PathLike, options: dict[str, Any], progress: bool = False
) -> ScoreSummary:
    """Score ``sources`` into ``out``; ``options``: model, category, limit, save_maps (npy|png16).

    Returns what was scored: the rows written and the files skipped.
    """
    device = resolve_device(p.serve.device, "serve.device")
    package = options.get("package") or open_model(p, options.get("model"), device)
    if options.get("normalized"):
        package.rule.normalized = True
    images = collect_images(sources, options.get("limit"))
    return score_images(p, package, images, Path(out), options, progress)


def score_images(
    p: Params,
    package: LoadedModel,
    images: list[tuple[Path, Path]],
    out: Path,
    options: dict[str, Any],
    progress: bool = False,
) -> ScoreSummary:
    """Score ``images`` ((image, its source root) pairs) with ``package`` into ``out``."""
    categories = _categories(images, package, options.get("category"))
    rows: list[dict[str, Any]] = []
    skipped: list[str] = []
    size = p.serve.batch_size
    for start in tqdm(range(0, len(images), size), desc="predict", disable=not progress, unit="batch"):
        loaded = []
        for (image, root), category in zip(images[start : start + size], categories[start : start + size]):
            try:
                loaded.append((image, root, category, read_rgb(image)))
            except ImageReadError as err:
                skipped.append(str(err))
        if loaded:
            rows += _score(p, package, loaded, out, options.get("save_maps") or "")
    _write_tables(out, rows, append=bool(options.get("append")))
    for message in skipped:
        print(f"skipped: {message}")
    flagged = sum(r["decision"] == ANOMALOUS for r in rows)
    print(f"{len(rows)} image(s) scored ({flagged} anomalous), {len(skipped)} skipped → {out}/predictions.csv")
    return ScoreSummary(rows=rows, skipped=skipped)


def _score(p: Params, package: LoadedModel, loaded: list, out: Path, save_maps: str) -> list[dict[str, Any]]:
    results = score_pil(package, [img for *_, img in loaded], [c for _, _, c, _ in loaded])
    rows = []
    for (image, root, category, img), res in zip(loaded, results):
        rel = Path(image.relative_to(root))
        target = out / "overlays" / rel.with_suffix(".png")
        target.parent.mkdir(parents=True, exist_ok=True)
        overlay_for(package, img, category, res["map"], p.serve.heat_scale).save(target)
        if save_maps:
            _save_map(out / "maps" / rel, res["map"], save_maps)
        rows.append(
            {
                "path": str(image),
                "category": category,
                "score": res["score"],
                "threshold": res["threshold"],
                "decision": res["decision"],
                "model": package.label,
                "version": package.version,
                "overlay": str(target),
            }
        )
    return rows


def _save_map(stem: Path, full: np.ndarray, kind: str) -> None:
    """``npy``: float32 with NaN outside the crop; ``png16``: 16-bit PNG (0 outside the crop), value v
    meaning ``v / 65535 * scale`` with ``scale`` in the PNG's text chunk (:func:`encode_map_png`)."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    if kind == "npy":
        buffer = io.BytesIO()
        np.save(buffer, full)
        stem.with_suffix(".npy").write_bytes(buffer.getvalue())
    else:
        stem.with_suffix(".png").write_bytes(base64.b64decode(encode_map_png(full)[0]))


def _write_tables(out: Path, rows: list[dict[str, Any]], append: bool = False) -> None:
    out.mkdir(parents=True, exist_ok=True)
    csv_file, jsonl_file = out / "predictions.csv", out / "predictions.jsonl"
    old_csv = csv_file.read_text() if append and csv_file.is_file() else ""
    old_jsonl = jsonl_file.read_text() if append and jsonl_file.is_file() else ""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=[*CSV_COLUMNS, "overlay"])
    if not old_csv:
        writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(csv_file, old_csv + buffer.getvalue())
    atomic_write_text(jsonl_file, old_jsonl + "".join(json.dumps(r) + "\n" for r in rows))
