"""Where a predict / scoring run's files go: names that never collide, a staged run moved into place
whole, and tables whose CSV cells a spreadsheet never runs."""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from components.files import csv_safe
from components.scoring.scorer import encode_map_png

__all__ = ["CSV_COLUMNS", "LOCK_FILE", "MAPS", "OVERLAYS", "STAGING_PREFIX", "output_names", "publish", "save_map"]

CSV_COLUMNS = ("path", "category", "score", "threshold", "decision", "action", "raw_score", "model", "version")
CSV_FILE, JSONL_FILE = "predictions.csv", "predictions.jsonl"
OVERLAYS, MAPS = "overlays", "maps"
LOCK_FILE = ".lock"  # one writer per output folder
STAGING_PREFIX = ".staging-"  # a run's outputs until they are complete


def output_names(images: list[tuple[Path, Path]]) -> list[Path]:
    """Each image's output name (relative): its path below its source root (below the roots' common
    folder when there are several), extension kept. Distinct images never share a name."""
    roots = {root.resolve() for _, root in images}
    base = Path(os.path.commonpath([str(r) for r in roots])) if len(roots) > 1 else None
    names, taken = [], set()
    for image, root in images:
        rel = image.resolve().relative_to(base) if base is not None else image.relative_to(root)
        name, n = rel, 1
        while name in taken:  # the same file given twice (or a link to it): a numbered name
            n += 1
            name = rel.with_name(f"{rel.name}~{n}")
        taken.add(name)
        names.append(name)
    return names


def publish(out: Path, staging: Path, rows: list[dict[str, Any]], append: bool) -> None:
    """Move a finished run from ``staging`` into ``out`` (the caller holds the lock).

    Replace: the old tables, overlays and maps go, the new ones come. Append: overlays and maps are
    added (a name already there, e.g. the same image scored by a new model version, gets a numbered
    name so earlier rows keep theirs), then the tables grow by the new rows.
    """
    moves: list[tuple[Path, Path]] = []
    targets: set[Path] = set()
    for kind in (OVERLAYS, MAPS) if append else ():
        for src in sorted(f for f in (staging / kind).rglob("*") if f.is_file()):
            dst, n = out / src.relative_to(staging), 1
            while dst.exists() or dst in targets:
                n += 1
                dst = (out / src.relative_to(staging)).with_name(f"{src.stem}~{n}{src.suffix}")
            moves.append((src, dst))
            targets.add(dst)
    renamed = {str(s.relative_to(staging)): d for s, d in moves}
    for row in rows:
        row["overlay"] = str(renamed.get(row["overlay"], out / row["overlay"]))
    old = _read_tables(out) if append else ("", "")
    csv_text, jsonl_text = _tables(rows, header=not old[0])
    _write(staging / CSV_FILE, old[0] + csv_text)  # staged first: a full disk fails here, out untouched
    _write(staging / JSONL_FILE, old[1] + jsonl_text)
    if append:
        for src, dst in moves:
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, dst)
    else:
        for kind in (OVERLAYS, MAPS):
            remove = out / kind
            if remove.exists():
                shutil.rmtree(remove)
            if (staging / kind).exists():
                os.replace(staging / kind, remove)
    os.replace(staging / JSONL_FILE, out / JSONL_FILE)
    os.replace(staging / CSV_FILE, out / CSV_FILE)


def _write(path: Path, text: str) -> None:
    with open(path, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


def _read_tables(out: Path) -> tuple[str, str]:
    csv_file, jsonl_file = out / CSV_FILE, out / JSONL_FILE
    return (
        csv_file.read_text() if csv_file.is_file() else "",
        jsonl_file.read_text() if jsonl_file.is_file() else "",
    )


def _tables(rows: list[dict[str, Any]], header: bool) -> tuple[str, str]:
    """(CSV, JSONL) text of ``rows``; CSV cells that a spreadsheet would run are neutralised."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=[*CSV_COLUMNS, "overlay"])
    if header:
        writer.writeheader()
    writer.writerows({k: csv_safe(v) for k, v in row.items()} for row in rows)
    return buffer.getvalue(), "".join(json.dumps(r) + "\n" for r in rows)


def save_map(stem: Path, full: np.ndarray, kind: str) -> None:
    """``stem``: the image's output name (extension kept; the map's is added). ``npy``: float32 with
    NaN outside the crop; ``png16``: 16-bit PNG (0 outside the crop), value v
    meaning ``v / 65535 * scale`` with ``scale`` in the PNG's text chunk (:func:`encode_map_png`)."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    if kind == "npy":
        buffer = io.BytesIO()
        np.save(buffer, full)
        stem.with_name(stem.name + ".npy").write_bytes(buffer.getvalue())
    else:
        stem.with_name(stem.name + ".png").write_bytes(base64.b64decode(encode_map_png(full)[0]))
