"""``inpformer predict``: score new images with a trained or registered model.

For every image: a row in ``predictions.csv`` and ``predictions.jsonl`` (path, category, score,
the category's image threshold, decision, model) and an overlay PNG in the image's own pixel frame
(heat map on a per-category scale of 0…2× the category's pixel threshold, and the outline of the
thresholded mask); optionally the raw map as ``.npy`` (NaN outside what the model saw).

* Model: a workspace model folder (``artifacts/models/<group>``: scoring from params.yaml, thresholds
  from ``artifacts/eval/thresholds.json``) or a registry URI (``models:/inpformer@champion``: the
  scoring and thresholds registered with it, in ``scoring.json``).
* Category: ``--category``, else the first folder of the image's path that names one of the model's
  categories, else the model's only category; an unknown category is an error.
* Folders are searched recursively; masks under ``ground_truth/`` (MVTec layout) are not scored.
* Bad files (corrupt, empty, not an image, too many pixels) are reported and skipped, never fatal.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from components.checkpoint import load_model
from components.data.io import ImageReadError, is_image_file, read_rgb
from components.data.transforms import ImageTransform
from components.files import atomic_write_text
from components.inference import ScoringConfig, score_batch
from components.overlay import map_to_original, render_overlay
from pipelines.builders import build_scoring, resolve_device
from pipelines.config import Params
from pipelines.paths import EVAL_DIR, MODELS_DIR
from pipelines.registry import MODEL_PACKAGE_FILE
from pipelines.tracking_guard import sqlite_path

__all__ = ["ModelPackage", "collect_images", "load_package", "predict_images"]

PREDICT_BATCH = 8  # images per forward pass
HEAT_SCALE = 2.0  # the colour scale ends at this multiple of the category's pixel threshold
CSV_COLUMNS = ("path", "category", "score", "threshold", "decision", "model")
REGISTRY_SCHEMES = ("models:/", "runs:/")
MASK_FOLDER = "ground_truth"  # masks of an MVTec-layout tree: not images to score


@dataclass
class ModelPackage:
    """A model with what scoring needs: post-processing, sizes, per-category thresholds, a label."""

    model: Any
    scoring: ScoringConfig
    transform: ImageTransform
    thresholds: dict[str, dict[str, float]]
    label: str
    categories: list[str] = field(default_factory=list)


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


def _from_registry(p: Params, uri: str) -> Path:
    import mlflow  # heavy: only for registry URIs

    db = sqlite_path(p)  # the workspace's store, as every stage resolves it
    mlflow.set_tracking_uri(f"sqlite:///{db.resolve()}" if db is not None else p.tracking.uri)
    local = Path(mlflow.artifacts.download_artifacts(uri, dst_path=tempfile.mkdtemp(prefix="inpformer-predict-")))
    folders = [p.parent for p in local.rglob(MODEL_PACKAGE_FILE)]
    if len(folders) != 1:
        msg = f"{uri}: expected one model folder with {MODEL_PACKAGE_FILE}, found {len(folders)}."
        raise ValueError(msg)
    return folders[0]


def load_package(p: Params, ref: str | None, device: str) -> ModelPackage:
    """The model of ``ref`` (a folder or a registry URI; default: the workspace's only model)."""
    if ref is None:
        groups = sorted(d.name for d in MODELS_DIR.iterdir() if d.is_dir()) if MODELS_DIR.is_dir() else []
        if len(groups) != 1:
            msg = f"{MODELS_DIR} holds {len(groups)} models ({groups}): choose one with --model."
            raise ValueError(msg)
        ref = str(MODELS_DIR / groups[0])
    registered = ref.startswith(REGISTRY_SCHEMES)
    folder = _from_registry(p, ref) if registered else Path(ref)
    model, config = load_model(folder, device)
    package_file = folder / MODEL_PACKAGE_FILE
    if package_file.is_file():
        package = json.loads(package_file.read_text())
        scoring, thresholds = ScoringConfig.from_dict(package["scoring"]), package.get("thresholds", {})
    else:
        scoring = build_scoring(p, model.seg_head is not None)
        table = EVAL_DIR / "thresholds.json"
        thresholds = json.loads(table.read_text()) if table.is_file() else {}
    categories = list(config.get("categories") or thresholds)
    transform = ImageTransform(resize=int(config["image_size"]), crop=int(config["crop_size"]))
    return ModelPackage(model, scoring, transform, thresholds, ref, categories)


def _categories(images: list[tuple[Path, Path]], package: ModelPackage, forced: str | None) -> list[str]:
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
) -> dict[str, Any]:
    """Score ``sources`` into ``out``; ``options``: model, category, limit, save_maps. Returns a summary."""
    out = Path(out)
    device = resolve_device(p.train.device)
    package = load_package(p, options.get("model"), device)
    images = collect_images(sources, options.get("limit"))
    categories = _categories(images, package, options.get("category"))
    rows: list[dict[str, Any]] = []
    skipped: list[str] = []
    batches = range(0, len(images), PREDICT_BATCH)
    for start in tqdm(batches, desc="predict", disable=not progress):
        loaded = []
        for (image, root), category in zip(images[start : start + PREDICT_BATCH], categories[start:]):
            try:
                loaded.append((image, root, category, read_rgb(image)))
            except ImageReadError as err:
                skipped.append(str(err))
        if loaded:
            rows += _score(package, loaded, out, bool(options.get("save_maps")), device)
    _write_tables(out, rows)
    for message in skipped:
        print(f"skipped: {message}")
    flagged = sum(r["decision"] == "anomalous" for r in rows)
    print(f"{len(rows)} image(s) scored ({flagged} anomalous), {len(skipped)} skipped → {out}/predictions.csv")
    return {"scored": len(rows), "anomalous": flagged, "skipped": skipped}


def _score(package: ModelPackage, loaded: list, out: Path, save_maps: bool, device: str) -> list[dict[str, Any]]:
    batch = torch.stack([package.transform(img) for *_, img in loaded]).to(device)
    with torch.no_grad():
        maps, scores = score_batch(package.model, batch, package.scoring)
    rows = []
    for (image, root, category, img), amap, score in zip(loaded, maps[:, 0].cpu().numpy(), scores.tolist()):
        limits = package.thresholds.get(category, {})
        threshold = float(limits.get("image_threshold", math.nan))
        pixel = float(limits.get("pixel_threshold", math.nan))
        full = map_to_original(amap, img.size, package.transform.resize, package.transform.crop)
        vmax = HEAT_SCALE * pixel if math.isfinite(pixel) else float(np.nanmax(full))
        rel = image.relative_to(root)
        target = out / "overlays" / Path(rel).with_suffix(".png")
        target.parent.mkdir(parents=True, exist_ok=True)
        render_overlay(img, full, vmax, pixel).save(target)
        if save_maps:
            buffer = io.BytesIO()
            np.save(buffer, full)
            map_file = out / "maps" / Path(rel).with_suffix(".npy")
            map_file.parent.mkdir(parents=True, exist_ok=True)
            map_file.write_bytes(buffer.getvalue())
        decision = "unknown" if not math.isfinite(threshold) else ("anomalous" if score >= threshold else "normal")
        rows.append(
            {
                "path": str(image),
                "category": category,
                "score": float(score),
                "threshold": threshold,
                "decision": decision,
                "model": package.label,
                "overlay": str(target),
            }
        )
    return rows


def _write_tables(out: Path, rows: list[dict[str, Any]]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=[*CSV_COLUMNS, "overlay"])
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out / "predictions.csv", buffer.getvalue())
    atomic_write_text(out / "predictions.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
