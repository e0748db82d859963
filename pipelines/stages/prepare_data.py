"""``inpformer prepare``: index (and for ``synthetic``, generate) a dataset into a manifest."""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

from components.data.datasets import Record, write_manifest
from components.data.download import DATASET_SOURCES, GIB, ExtractLimits, fetch_dataset
from components.data.io import is_image_file
from components.data.readers import (
    MVTEC_CATEGORIES,
    ScanReport,
    flat_records,
    mvtec_records,
    realiad_records,
    validate_records,
)
from components.data.synthetic import generate_synthetic
from components.evaluation.coverage import Coverage
from components.files import atomic_write_text
from pipelines.config import Params, check_slug
from pipelines.paths import SOURCES_DIR, manifest_path, raw_dir, relative_to
from pipelines.stages.reporting import count_table, format_table
from pipelines.view import build_transform, report_coverage

logger = logging.getLogger(__name__)

__all__ = ["prepare", "prepare_textures"]

LOCAL_KINDS = ("folder", "flat")  # read where they are; the others are downloaded or extracted
TEXTURE_SUFFIXES = (".jpg", ".jpeg", ".png")
SKIP_BAD_ADVICE = "Fix or remove the files listed above, or set data.skip_bad: true to skip them (they are counted)."


def prepare(p: Params, source: str | None = None, dataset: str | None = None, name: str | None = None) -> Path:
    """Index a dataset into ``data/prepared/<name>/manifest.csv`` (paths relative to it); return the manifest."""
    kind = dataset or p.data.dataset
    name = check_slug(name) if name else p.data.name
    source = source if source is not None else p.data.source
    if kind == "dtd":  # the texture source of the pseudo anomalies, not a dataset to index
        return prepare_textures(source, extract_limits(p))
    _unread_sources(kind, source, p.synthesis.texture_dir, p.review.dir)
    if source and not Path(source).resolve().is_relative_to(SOURCES_DIR.resolve()):
        logger.warning(
            "data.source %s is outside %s/: DVC cannot see new or changed images there, so `dvc repro` and "
            "scheduled runs will not prepare again by themselves. Put (or copy) it under %s/.",
            source,
            SOURCES_DIR,
            SOURCES_DIR,
        )
    report = ScanReport()
    records = _masks_as_configured(p, kind, _scan(p, kind, name, source, report))
    records += _reviewed(p, records)
    _check_category_names(records)
    records = validate_records(records, report, skip_bad=p.data.skip_bad, progress=False)
    report.raise_if_problems(SKIP_BAD_ADVICE)
    raw_dir(name).mkdir(parents=True, exist_ok=True)  # a DVC out even when the images stay where they are
    if kind in LOCAL_KINDS:  # written only once the data checked out: a failed prepare leaves nothing
        atomic_write_text(raw_dir(name) / "SOURCE.txt", f"{kind}: {relative_to(source, Path.cwd())}\n")
    coverage = _coverage(p, records)
    _write(name, count_table(records, report.empty_masks, coverage), records)
    print(f"Prepared '{name}' ({kind}) → {manifest_path(name)}")
    print(format_table(count_table(records, report.empty_masks, coverage)))
    _print_report(report)
    return manifest_path(name)


def _unread_sources(kind: str, source: str, textures: str, reviewed: str) -> None:
    """Warn when sources/ holds images this prepare does not read (a rerun triggered by them changes
    nothing); the pseudo-anomaly textures (``synthesis.texture_dir``) are read elsewhere."""
    if not SOURCES_DIR.is_dir():
        return
    used = [Path(d).resolve() for d in (source, textures, reviewed) if d]
    images = [
        f for f in SOURCES_DIR.rglob("*") if is_image_file(f) and not any(f.resolve().is_relative_to(u) for u in used)
    ]
    if images:
        logger.warning(
            "%s/ holds %d image(s) that this prepare does not read (data.dataset=%s, data.source=%s), e.g. %s: "
            "DVC reran prepare because they changed, but the results will not. To use them set data.dataset: "
            "folder and data.source: %s/<folder>.",
            SOURCES_DIR,
            len(images),
            kind,
            source or "(empty)",
            images[0],
            SOURCES_DIR,
        )


def prepare_textures(source: str | None, limits: ExtractLimits | None = None) -> Path:
    """Fetch or extract DTD (the pseudo-anomaly textures) and say which folder to configure."""
    root = fetch_dataset("dtd", raw_dir("dtd"), source or None, limits=limits or ExtractLimits())
    images = root / "images" if (root / "images").is_dir() else root
    n = sum(1 for f in images.rglob("*") if f.suffix.lower() in TEXTURE_SUFFIXES)
    print(f"DTD textures: {n} images in {images}\nSet synthesis.texture_dir: {images}")
    return images


def _scan(p: Params, kind: str, name: str, source: str, report: ScanReport) -> list[Record]:
    """The records of dataset ``kind`` (downloaded or generated first when needed)."""
    if kind == "synthetic":
        s = p.data.synthetic
        root = generate_synthetic(
            raw_dir(name), s.seed, s.size, s.n_train, s.n_test_good, s.n_test_per_defect, s.categories
        )
        return mvtec_records(root, report=report)
    if kind in LOCAL_KINDS and not source:
        layout = "MVTec layout" if kind == "folder" else "good/ and bad/ (and masks/, test_good/)"
        msg = f"data.dataset={kind} needs --from <folder with {layout}> (or data.source)."
        raise ValueError(msg)
    if kind == "flat":
        records = _flat(Path(source), name, p.seed, report)
        if p.data.masks == "required":
            report.problems += report.missing_masks
        return records
    root = (
        Path(source)
        if kind == "folder"
        else fetch_dataset(kind, raw_dir(name), source or None, limits=extract_limits(p))
    )
    if kind == "realiad":
        jsons = root / "realiad_jsons" / "realiad_jsons"
        return realiad_records(root / "realiad_1024", jsons, p.data.categories or None, report)
    order = MVTEC_CATEGORIES if kind == "mvtec" else DATASET_SOURCES.get(kind, {}).get("order", ())
    strict = p.data.masks == "required" or kind not in LOCAL_KINDS  # benchmark datasets ship every mask
    return mvtec_records(root, p.data.categories or None, order=order, require_masks=strict, report=report)


def _reviewed(p: Params, records: list[Record]) -> list[Record]:
    """The images operators gave a verdict (``review.dir``, MVTec layout: pipelines/loop/review.py)
    in the dataset's categories, without masks (image-level labels)."""
    root = Path(p.review.dir)
    if not root.is_dir() or not any(d.is_dir() for d in root.iterdir()):
        return []
    found = mvtec_records(root, require_masks=False, report=ScanReport())  # no train/good there is fine
    cats = {r.category for r in records}
    other = sorted({r.category for r in found} - cats)
    if other:
        logger.warning(
            "%s/ holds reviewed images of categories %s that %s does not have: not used.", root, other, p.data.name
        )
    kept = [r for r in found if r.category in cats]
    if kept:
        tests = sum(r.split == "test" for r in kept)
        print(f"{len(kept)} reviewed image(s) from {root}/ added ({tests} test, {len(kept) - tests} train)")
    return kept


def _masks_as_configured(p: Params, kind: str, records: list[Record]) -> list[Record]:
    """Your own datasets (folder, flat) per ``data.masks``: ``none`` drops the masks (image-level
    labels only); ``optional`` keeps defect images without a mask, counted in a notice."""
    if kind not in LOCAL_KINDS:
        return records
    if p.data.masks == "none":
        return [replace(r, mask_path="") for r in records]
    unmasked = [r for r in records if r.label == 1 and not r.mask_path]
    if unmasked:
        print(
            f"{len(unmasked)} of {sum(r.label == 1 for r in records)} anomalous image(s) have no mask "
            f"(data.masks={p.data.masks}): they count in the image metrics; pixel metrics come from the images "
            f"with masks (none: null in metrics.json). E.g. {unmasked[0].path}"
        )
    return records


def _check_category_names(records: list[Record]) -> None:
    """Category names become file names (plots, curves): each must be a safe name (no '/', no '..')."""
    for category in sorted({r.category for r in records}):
        try:
            check_slug(category)
        except ValueError as err:
            msg = f"category {err}. Rename its folder (or its name in the dataset's index)."
            raise ValueError(msg) from err


def extract_limits(p: Params) -> ExtractLimits:
    """``data.extract`` as :class:`ExtractLimits`."""
    e = p.data.extract
    return ExtractLimits(int(e.max_gb * GIB), e.max_ratio, e.max_members)


def _flat(root: Path, name: str, seed: int, report: ScanReport) -> list[Record]:
    def optional(sub: str) -> Path | None:
        return root / sub if (root / sub).is_dir() else None

    good, bad, masks, test_good = root / "good", optional("bad"), optional("masks"), optional("test_good")
    return flat_records(good, bad, masks, test_good, category=name, seed=seed, report=report)


def _coverage(p: Params, records: list[Record]) -> dict[str, Coverage]:
    """Per category, how much of its test defect pixels the configured field of view holds (the
    warning with "coverage" below ``eval.min_mask_coverage`` comes now, before any training)."""
    tf = build_transform(p)
    cats = dict.fromkeys(r.category for r in records)
    return {c: report_coverage(p, c, [r for r in records if r.category == c and r.split == "test"], tf) for c in cats}


def _write(name: str, counts: list[dict[str, Any]], records: list[Record]) -> None:
    """The manifest (paths relative to its folder) and the count table as JSON."""
    out_dir = manifest_path(name).parent
    rel = [
        Record(
            relative_to(r.path, out_dir),
            r.category,
            r.split,
            r.label,
            relative_to(r.mask_path, out_dir) if r.mask_path else "",
            r.defect,
        )
        for r in records
    ]
    write_manifest(manifest_path(name), rel)
    atomic_write_text(out_dir / "counts.json", json.dumps(counts, indent=2))


def _print_report(report: ScanReport) -> None:
    if report.skipped_non_images:
        print(f"Skipped {len(report.skipped_non_images)} non-image file(s), e.g. {report.skipped_non_images[0]}")
    if report.skipped_bad:
        print(f"Skipped {len(report.skipped_bad)} unreadable file(s) (data.skip_bad), e.g. {report.skipped_bad[0]}")
    if report.conversions:
        print("Converted: " + ", ".join(f"{k}: {v}" for k, v in sorted(report.conversions.items())))
    if report.broken_links:
        print(f"WARNING: skipped {len(report.broken_links)} broken link(s), e.g. {report.broken_links[0]}")
    if report.outside_links:
        print(
            f"WARNING: {len(report.outside_links)} link(s) point outside the dataset folder (used; DVC does not "
            f"track their targets), e.g. {report.outside_links[0]}"
        )
    if report.empty_masks:
        print(
            f"WARNING: {len(report.empty_masks)} anomalous image(s) have an all-zero mask (no defect pixel: "
            f"they count for image-level metrics only), e.g. {report.empty_masks[0]}"
        )
