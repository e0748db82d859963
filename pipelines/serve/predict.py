"""``inpformer predict``: score new images with a trained or registered model.

For every image: a row in ``predictions.csv`` and ``predictions.jsonl`` (path, category, score,
the category's image threshold, decision, model) and an overlay PNG in the image's own pixel frame
(heat map on a per-category scale of 0…2× the category's pixel threshold, the thresholded mask's
outline); optionally the raw map as ``.npy`` (NaN outside what the model saw).

* Model: a workspace model folder (``artifacts/models/<group>``: scoring and thresholds from the
  package the evaluate stage calibrated, ``artifacts/eval/packages/<group>/package.json``), a registry
  URI (``models:/inpformer@champion``: the package registered with it) or an exported file (the
  package in its metadata). Every one is read by :func:`components.scoring.package.read_package`.
* Category: ``--category``, else the nearest folder of the image's path named after one of the
  model's categories, else the model's only category; an unknown category is an error.
* Outputs keep each image's path below its source (extension included: ``a/x.jpg`` →
  ``overlays/a/x.jpg.png``), so two images never share an overlay. CSV cells that begin with
  ``= + - @``, tab or CR get a leading ``'`` (OWASP), so a spreadsheet shows a file name, never runs it.
* One writer per output folder; a run is staged and moved into place when complete. Folders are
  searched recursively (masks under ``ground_truth/`` are not scored; other files are counted).
* Bad files (corrupt, empty, not an image, too many pixels) are reported and skipped, never fatal."""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from components.data.io import IMAGE_EXTENSIONS, ImageReadError, is_image_file, read_rgb
from components.engine.checkpoint import DIGEST_FILE, WEIGHTS_FILE, load_model
from components.files import disk_full_as_error, exclusive_lock, file_digest
from components.scoring.decision import ANOMALOUS
from components.scoring.export import FORMATS, load_exported
from components.scoring.package import PACKAGE_FILE, ModelPackage, read_package
from components.scoring.scorer import LoadedModel, overlay_for, score_pil, torch_scorer
from pipelines.builders import build_scoring, check_memory, resolve_device
from pipelines.config import Params
from pipelines.loop.thresholds import apply_versions
from pipelines.paths import MODELS_DIR, calibrated_package_dir
from pipelines.serve.outputs import (
    LOCK_FILE,
    MAPS,
    OVERLAYS,
    STAGING_PREFIX,
    output_names,
    publish,
    save_map,
)
from pipelines.serve.registered import download_registered

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


def collect_images(
    sources: list[str], limit: int | None = None, ignored: list[Path] | None = None
) -> list[tuple[Path, Path]]:
    """(image, the source it came from) for files, folders (recursive) and globs, sorted, at most
    ``limit``; files of a folder that are not images (``notes.txt``) are appended to ``ignored``."""
    found: list[tuple[Path, Path]] = []
    seen: set[Path] = set()
    for source in sources:
        matches = [Path(m) for m in sorted(glob.glob(source, recursive=True))] or [Path(source)]  # noqa: PTH207 (absolute globs)
        for m in matches:
            if m.is_dir():
                files = [f for f in sorted(m.rglob("*")) if f.is_file() and MASK_FOLDER not in f.relative_to(m).parts]
                pairs = [(f, m) for f in files if is_image_file(f)]
                if ignored is not None:
                    ignored += [f for f in files if not is_image_file(f)]
            elif m.is_file():
                pairs = [(m, m.parent)]
            else:
                msg = f"{source}: no such file, folder or matching glob."
                raise FileNotFoundError(msg)
            for image, root in pairs:  # a file named twice (a folder and a glob in it) is scored once
                if image.resolve() not in seen:
                    seen.add(image.resolve())
                    found.append((image, root))
    if not found:
        msg = f"no image files in {', '.join(sources)} (extensions: {', '.join(IMAGE_EXTENSIONS)})."
        raise FileNotFoundError(msg)
    return found[:limit] if limit else found


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
        package = ModelPackage.from_dict(meta["package"], f"{ref} (metadata 'package')", p.limits.max_model_side)
        return LoadedModel(scorer, package, ref, str(meta.get("version", "exported")))
    with tempfile.TemporaryDirectory(prefix="inpformer-model-") as tmp:
        entries: list[dict[str, Any]] = []
        if ref.startswith(REGISTRY_SCHEMES):
            folder, version, entries = download_registered(p, ref, Path(tmp))
        else:
            folder, version = Path(ref), ""
            if not folder.is_dir():
                msg = f"{ref}: not a model folder, registry URI (models:/…, runs:/…) or .onnx/.pt file."
                raise FileNotFoundError(msg)
        model, package = load_model(folder, device, p.limits.max_model_side)
        check_memory(p, model, p.serve.batch_size, device, "serve.batch_size", training=False)
        version = version or _weights_id(folder)
        weights = file_digest(folder / WEIGHTS_FILE)  # the bytes loaded, whatever the package claims
    if not package.calibrated:
        package = _calibrated(p, package, model.seg_head is not None, weights)
    package = apply_versions(package, entries)  # the latest approved threshold versions (inpformer thresholds)
    return LoadedModel(torch_scorer(model, package.scoring, device), package, ref, version, model)


def _calibrated(p: Params, package: ModelPackage, has_head: bool, weights: str) -> ModelPackage:
    """A workspace model's package as the evaluate stage calibrated it; else scoring from params.yaml
    and no thresholds (decisions ``unknown``).

    Raises:
        StaleThresholdsError: the calibrated package names other weights than the model's
            (``limits.allow_stale_thresholds``: a loud warning instead).
    """
    folder = calibrated_package_dir(package.group)
    if not (folder / PACKAGE_FILE).is_file():
        return package.calibrate(build_scoring(p, has_head), {}, normalize=p.eval.threshold.normalize)
    calibrated = read_package(folder)
    ours, theirs = weights, calibrated.provenance.weights_sha256
    if ours != theirs:
        msg = (
            f"{folder / PACKAGE_FILE} holds thresholds calibrated for other weights ({theirs[:12] or 'unrecorded'}…; "
            f"the model has {ours[:12] or 'unrecorded'}…): the model was trained again after the last evaluation. "
            "Run `inpformer evaluate` (or `dvc repro`) to calibrate these weights"
        )
        if not p.limits.allow_stale_thresholds:
            raise StaleThresholdsError(msg + " (limits.allow_stale_thresholds=true only warns).")
        logger.warning("%s. Deciding with them anyway (limits.allow_stale_thresholds=true).", msg)
    return calibrated


class StaleThresholdsError(ValueError):
    """The calibrated package in the workspace describes other weights than the model folder holds."""


def _categories(images: list[tuple[Path, Path]], package: LoadedModel, forced: str | None) -> list[str]:
    """Each image's category (see the module docstring); one error listing the images without one."""
    out, unknown = [], []
    for image, _ in images:
        parts = reversed(image.resolve().parts[:-1])  # the nearest folder first, up to the root
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
    ignored: list[Path] = []
    images = collect_images(sources, options.get("limit"), ignored)
    if ignored:
        print(f"{len(ignored)} non-image file(s) ignored, e.g. {ignored[0]}")
    return score_images(p, package, images, Path(out), options, progress)


def score_images(
    p: Params,
    package: LoadedModel,
    images: list[tuple[Path, Path]],
    out: Path,
    options: dict[str, Any],
    progress: bool = False,
) -> ScoreSummary:
    """Score ``images`` ((image, its source root) pairs) with ``package`` into ``out``.

    One writer at a time per ``out`` (a lock; a second waits ``limits.lock_wait_s``, then fails naming
    the holder). Everything is written into a staging folder inside ``out`` and moved into place at
    the end, so an interrupted or failed run (a full disk) leaves ``out`` as it was: every row of
    ``predictions.csv`` always matches its overlay. ``options["append"]``: add to the tables instead
    of replacing them (and their overlays).
    """
    categories = _categories(images, package, options.get("category"))
    names = output_names(images)
    out.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(out / LOCK_FILE, f"the output folder {out}", p.limits.lock_wait_s):
        for stale in out.glob(f"{STAGING_PREFIX}*"):  # left by a killed run (its lock is gone with it)
            shutil.rmtree(stale, ignore_errors=True)
        staging = Path(tempfile.mkdtemp(dir=out, prefix=STAGING_PREFIX))
        try:
            with disk_full_as_error(out):
                rows, skipped = _score_all(p, package, images, categories, names, staging, options, progress)
                publish(out, staging, rows, bool(options.get("append")))
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    for message in skipped:
        print(f"skipped: {message}")
    flagged = sum(r["decision"] == ANOMALOUS for r in rows)
    print(f"{len(rows)} image(s) scored ({flagged} anomalous), {len(skipped)} skipped → {out}/predictions.csv")
    return ScoreSummary(rows=rows, skipped=skipped)


def _score_all(
    p: Params,
    package: LoadedModel,
    images: list[tuple[Path, Path]],
    categories: list[str],
    names: list[Path],
    staging: Path,
    options: dict[str, Any],
    progress: bool,
) -> tuple[list[dict[str, Any]], list[str]]:
    rows: list[dict[str, Any]] = []
    skipped: list[str] = []
    size = p.serve.batch_size
    for start in tqdm(range(0, len(images), size), desc="predict", disable=not progress, unit="batch"):
        loaded = []
        batch = zip(images[start : start + size], categories[start : start + size], names[start : start + size])
        for (image, _), category, name in batch:
            try:
                loaded.append((image, name, category, read_rgb(image)))
            except ImageReadError as err:
                skipped.append(str(err))
        if loaded:
            rows += _score(p, package, loaded, staging, options.get("save_maps") or "")
    return rows, skipped


def _score(p: Params, package: LoadedModel, loaded: list, staging: Path, save_maps: str) -> list[dict[str, Any]]:
    """Score one batch; overlays (and maps) into ``staging``; rows name their final place."""
    results = score_pil(package, [img for *_, img in loaded], [c for _, _, c, _ in loaded], p.serve.batch_size)
    rows = []
    for (image, name, category, img), res in zip(loaded, results):
        overlay = Path(OVERLAYS) / f"{name}.png"
        (staging / overlay).parent.mkdir(parents=True, exist_ok=True)
        overlay_for(package, img, category, res["map"], p.serve.heat_scale).save(staging / overlay)
        if save_maps:
            save_map(staging / MAPS / name, res["map"], save_maps)
        rows.append(
            {
                "path": str(image),
                "category": category,
                "score": res["score"],
                "threshold": res["threshold"],
                "decision": res["decision"],
                "action": res["action"],  # pass | review | reject (the review band: eval.threshold.review_rule)
                "raw_score": res["raw_score"],
                "model": package.label,
                "version": package.version,
                "overlay": str(overlay),  # relative to the staging folder until publish() places it
            }
        )
    return rows
