"""Scanning dataset folders: which files are images, which links are broken, and a report of it all.

* :class:`ScanReport` — what a scan skipped, converted or found suspicious, printed by ``prepare``.
* :func:`list_images` — the image files of a folder; stray files, link loops and dangling links are
  counted, links leaving the dataset folder are reported.
* :func:`validate_records` — decode every image and mask; bad files are problems (or skipped with
  ``skip_bad``), all-zero masks of anomalous images are reported.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from components.data.datasets import Record
from components.data.io import ImageReadError, image_mode, is_image_file, read_mask, read_rgb

__all__ = ["DatasetError", "ScanReport", "link_ok", "list_images", "validate_records"]


class DatasetError(ValueError):
    """The dataset on disk cannot be used as it is; the message lists the files and the fix."""


@dataclass
class ScanReport:
    """What a scan skipped or converted, reported to the user at the end."""

    skipped_non_images: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    conversions: Counter = field(default_factory=Counter)
    skipped_bad: list[str] = field(default_factory=list)
    broken_links: list[str] = field(default_factory=list)  # loops and dangling links: skipped
    outside_links: list[str] = field(default_factory=list)  # links to files outside the dataset folder: used
    empty_masks: list[str] = field(default_factory=list)  # anomalous images whose mask marks nothing
    missing_masks: list[str] = field(default_factory=list)  # anomalous images without a mask (image-level labels)
    root: Path | None = None  # the dataset folder (links leaving it are reported)

    def raise_if_problems(self, fix: str) -> None:
        """Raise one :class:`DatasetError` listing every problem (first 20 shown)."""
        if self.problems:
            shown = "\n  ".join(self.problems[:20])
            more = f"\n  ... and {len(self.problems) - 20} more" if len(self.problems) > 20 else ""
            msg = f"{len(self.problems)} problem(s) in the dataset:\n  {shown}{more}\n{fix}"
            raise DatasetError(msg)


def link_ok(p: Path, report: ScanReport) -> bool:
    """False (and reported) for a link loop or a dangling link; links leaving the dataset are reported."""
    if not p.is_symlink():
        return True
    try:
        target = p.resolve(strict=True)
    except (OSError, RuntimeError) as err:  # RuntimeError: a loop on some Python versions
        kind = "a link loop" if "loop" in str(err).lower() or isinstance(err, RuntimeError) else "a dangling link"
        report.broken_links.append(f"{p} ({kind}, skipped)")
        return False
    root = (report.root or p.parent).resolve()
    if not target.is_relative_to(root):
        report.outside_links.append(f"{p} → {target}")
    return True


def list_images(folder: Path, report: ScanReport) -> list[Path]:
    out = []
    for p in sorted(folder.iterdir()):
        if not link_ok(p, report):
            continue
        if p.is_file() and is_image_file(p):
            out.append(p)
        elif p.is_file() and not p.name.startswith("."):
            report.skipped_non_images.append(str(p))
    return out


def validate_records(
    records: Iterable[Record], report: ScanReport, skip_bad: bool = False, progress: bool = True
) -> list[Record]:
    """Decode every image and mask; check mask size and that masks mark something.

    Problems go to ``report.problems`` (or, with ``skip_bad``, the record is dropped and counted in
    ``report.skipped_bad``). Non-RGB inputs are counted in ``report.conversions`` by mode.
    """
    kept = []
    records = list(records)
    for rec in tqdm(records, desc="validate", disable=not progress, leave=False):
        try:
            mode = image_mode(rec.path)
            img = read_rgb(rec.path)
            if mode != "RGB":
                report.conversions[mode] += 1
            if rec.mask_path:
                mask = read_mask(rec.mask_path, img.size)
                if rec.label == 1 and not np.asarray(mask).any():
                    report.empty_masks.append(str(rec.mask_path))
        except (ImageReadError, OSError) as err:
            if skip_bad:
                report.skipped_bad.append(str(err))
                continue
            report.problems.append(str(err))
        kept.append(rec)
    return kept
