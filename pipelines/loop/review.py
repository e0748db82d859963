"""The review queue: flagged images wait for an operator's verdict, which becomes versioned data.

* **Queue** (``review.queue_dir``/``queue.jsonl``): every scoring run (and the app) adds the images
  whose action is ``reject`` or ``review``, with a copy of the image and its overlay (so a watched
  folder that is cleaned up loses nothing). An item's id is the first 12 hex digits of the image's
  SHA-256: the same image queued again (renamed, or by a new model version) is one item.
* **Verdicts** (``inpformer review mark ID|PATH --verdict normal|defect [--defect TYPE]``, or the
  app's Review tab): appended to the ledger ``review.dir``/``verdicts.jsonl`` (never rewritten), and
  the image is copied into ``review.dir`` in MVTec layout: ``<category>/test/<TYPE>/<id>.<ext>`` for a
  defect (``review.defect_type`` by default); for a normal ``<category>/test/good/`` (default
  ``review.normals_to: test``: the next evaluation and the promotion gate see the false reject) or
  ``<category>/train/good/``. ``review.dir`` lies under ``sources/``, a dependency of prepare, and
  prepare adds its images to the dataset's categories: ``dvc status`` shows prepare changed and the
  next ``dvc repro`` trains and evaluates on them. Marking an image twice writes a second ledger
  entry; its file is in exactly one place, that of its latest verdict.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from components.files import atomic_write_bytes, atomic_write_text, exclusive_lock, file_digest
from pipelines.config import Params, check_slug
from pipelines.paths import confined

__all__ = [
    "LEDGER_FILE",
    "QUEUE_FILE",
    "RETRAIN_MARK",
    "due_for_retrain",
    "mark",
    "pending",
    "queue_rows",
    "queue_upload",
    "verdicts",
]

QUEUE_FILE, LEDGER_FILE = "queue.jsonl", "verdicts.jsonl"
RETRAIN_MARK = "retrain.json"  # in review.queue_dir: how many verdicts the last retrain saw
QUEUED_ACTIONS = ("reject", "review")
VERDICTS = ("normal", "defect")
ID_LENGTH = 12


def _lines(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _append(path: Path, entries: list[dict[str, Any]]) -> None:
    """Append JSON lines (the file is replaced whole: never half a line)."""
    old = path.read_text() if path.is_file() else ""
    atomic_write_text(path, old + "".join(json.dumps(e) + "\n" for e in entries))


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _user() -> str:
    return os.environ.get("INPFORMER_USER") or getpass.getuser()


def queue_rows(p: Params, rows: list[dict[str, Any]], out: Path) -> int:
    """Queue the ``reject`` / ``review`` rows of a scoring run (overlays as placed, or relative to
    ``out``); returns how many new items were queued."""
    flagged = [r for r in rows if r.get("action") in QUEUED_ACTIONS]
    if not flagged:
        return 0
    root = confined(p.review.queue_dir)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "overlays").mkdir(parents=True, exist_ok=True)
    with exclusive_lock(root / ".lock", "the review queue", p.limits.lock_wait_s):
        known = {e["id"] for e in _lines(root / QUEUE_FILE)}
        new = []
        for r in flagged:
            image = Path(r["path"])
            sha = file_digest(image)
            item = sha[:ID_LENGTH]
            if item in known:
                continue
            known.add(item)
            shutil.copyfile(image, root / "images" / f"{item}{image.suffix.lower()}")
            overlay = Path(r["overlay"]) if Path(r["overlay"]).is_file() else out / r["overlay"]
            if overlay.is_file():
                shutil.copyfile(overlay, root / "overlays" / f"{item}.png")
            new.append(
                {
                    "id": item,
                    "sha256": sha,
                    "path": str(image.resolve()),
                    "name": r.get("name") or f"{image.parent.name}/{image.name}",
                    "image": f"images/{item}{image.suffix.lower()}",
                    "overlay": f"overlays/{item}.png" if overlay.is_file() else "",
                    "category": r["category"],
                    "score": r["score"],
                    "threshold": r["threshold"],
                    "action": r["action"],
                    "model": r.get("model", ""),
                    "version": r.get("version", ""),
                    "queued": _now(),
                }
            )
        _append(root / QUEUE_FILE, new)
    return len(new)


def queue_upload(p: Params, data: bytes, name: str, row: dict[str, Any], overlay_png: bytes) -> int:
    """Queue an image scored from memory (the app): its bytes and overlay are saved first."""
    root = confined(p.review.queue_dir)
    uploads = root / "uploads"
    uploads.mkdir(parents=True, exist_ok=True)
    suffix = Path(name).suffix.lower() or ".png"
    stem = hashlib.sha256(data).hexdigest()[:ID_LENGTH]
    image, overlay = uploads / f"{stem}{suffix}", uploads / f"{stem}.overlay.png"
    atomic_write_bytes(image, data)
    atomic_write_bytes(overlay, overlay_png)
    return queue_rows(p, [{**row, "path": str(image), "overlay": str(overlay)}], root)


def verdicts(p: Params) -> list[dict[str, Any]]:
    """The ledger, oldest first."""
    return _lines(Path(p.review.dir) / LEDGER_FILE)


def pending(p: Params) -> list[dict[str, Any]]:
    """Queued items without a verdict, oldest first."""
    done = {v["id"] for v in verdicts(p)}
    return [e for e in _lines(Path(p.review.queue_dir) / QUEUE_FILE) if e["id"] not in done]


def _find(p: Params, key: str) -> dict[str, Any]:
    items = _lines(Path(p.review.queue_dir) / QUEUE_FILE)
    path = str(Path(key).resolve()) if not key.isalnum() or Path(key).exists() else ""
    found = [e for e in items if e["id"].startswith(key.lower()) or (path and e["path"] == path)]
    if len({e["id"] for e in found}) != 1:
        what = "no queued image" if not found else f"{len(found)} queued images"
        raise ValueError(f"{key}: {what} with this id or path; see `inpformer review list`.")
    return found[0]


def _destination(p: Params, item: dict[str, Any], verdict: str, defect: str) -> Path:
    split, folder = ("test", defect) if verdict == "defect" else (p.review.normals_to, "good")
    category = check_slug(item["category"])
    return Path(p.review.dir) / category / split / folder / Path(item["image"]).name


def mark(p: Params, key: str, verdict: str, defect: str | None = None, reason: str = "") -> dict[str, Any]:
    """Record a verdict on the queued image ``key`` (its id, an id prefix or its path) and place
    the image in ``review.dir`` (see the module); returns the ledger entry."""
    if verdict not in VERDICTS:
        raise ValueError(f"--verdict {verdict!r}: choose one of {VERDICTS}.")
    if defect and verdict != "defect":
        raise ValueError("--defect names a defect type: only with --verdict defect.")
    defect = check_slug(defect or p.review.defect_type)
    if defect == "good":
        raise ValueError("--defect good: 'good' is the folder of normal images; mark it --verdict normal.")
    item = _find(p, key)
    target = _destination(p, item, verdict, defect)
    root = confined(p.review.dir)
    root.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(Path(p.review.queue_dir) / ".lock", "the review queue", p.limits.lock_wait_s):
        source = Path(p.review.queue_dir) / item["image"]
        if not source.is_file():
            raise FileNotFoundError(f"{source}: the queued copy of {item['path']} is gone; queue the image again.")
        category_dir = root / check_slug(item["category"])
        for old in list(category_dir.rglob(target.name)) if category_dir.is_dir() else []:
            if old.resolve() != target.resolve():
                old.unlink()  # a changed verdict moves the image: one place, the latest verdict's
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.is_file():
            tmp = target.with_name(f".{target.name}.partial")
            shutil.copyfile(source, tmp)
            tmp.replace(target)
        entry = {
            "id": item["id"],
            "sha256": item["sha256"],
            "path": item["path"],
            "category": item["category"],
            "verdict": verdict,
            "defect": defect if verdict == "defect" else "",
            "file": str(target.relative_to(root)),
            "score": item["score"],
            "action": item["action"],
            "version": item["version"],
            "reason": reason,
            "user": _user(),
            "time": _now(),
        }
        _append(root / LEDGER_FILE, [entry])
    return entry


def due_for_retrain(p: Params) -> bool:
    """Whether ``review.retrain_after`` new verdicts came in since the last retrain."""
    if not p.review.retrain_after:
        return False
    mark = Path(p.review.queue_dir) / RETRAIN_MARK
    seen = json.loads(mark.read_text()).get("verdicts", 0) if mark.is_file() else 0
    return len(verdicts(p)) - seen >= p.review.retrain_after
