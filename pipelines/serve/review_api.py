"""The app's Review tab API (:mod:`pipelines.loop.review`): the queue, its images, verdicts.

``GET /api/review`` → the pending items; ``GET /api/review/{id}/image`` and ``/overlay`` → the queued
copies (looked up in the queue, never a path from the request); ``POST /api/review/{id}`` with
``{"verdict": "normal"|"defect", "defect": TYPE}`` → the ledger entry. The app's Host, Origin and
body guards apply to these routes as to the others.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException
from fastapi.responses import FileResponse
from pydantic import BaseModel

from pipelines.config import Params
from pipelines.loop.review import ID_LENGTH, mark, pending

__all__ = ["VerdictRequest", "add_review_routes"]

ITEM_ID = re.compile(rf"^[0-9a-f]{{{ID_LENGTH}}}$")
MEDIA = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".bmp": "image/bmp", ".tif": "image/tiff"}


class VerdictRequest(BaseModel):
    """An operator's verdict on one queued image."""

    verdict: str
    defect: str = ""


def _item(p: Params, item: str) -> dict[str, Any]:
    if not ITEM_ID.match(item):
        raise HTTPException(status_code=404, detail="not a review item id")
    found = [e for e in pending(p) if e["id"] == item]
    if not found:
        raise HTTPException(status_code=404, detail=f"{item}: not in the review queue (already marked?)")
    return found[0]


def add_review_routes(app: FastAPI, p: Params) -> None:
    """Register the Review tab's routes on ``app``."""
    root = Path(p.review.queue_dir)

    @app.get("/api/review")
    def review_list() -> list[dict[str, Any]]:
        keys = ("id", "category", "score", "threshold", "action", "version", "path", "queued")
        return [{k: e.get(k) for k in keys} | {"name": e.get("name") or Path(e["path"]).name} for e in pending(p)]

    @app.get("/api/review/{item}/{kind}")
    def review_file(item: str, kind: str) -> FileResponse:
        entry = _item(p, item)
        if kind not in ("image", "overlay") or not entry.get(kind):
            raise HTTPException(status_code=404, detail=f"no {kind} for {item}")
        path = root / entry[kind]
        if not path.is_file():
            raise HTTPException(status_code=404, detail=f"{item}: its queued {kind} is gone")
        return FileResponse(path, media_type=MEDIA.get(path.suffix.lower(), "application/octet-stream"))

    @app.post("/api/review/{item}")
    def review_mark(item: str, request: VerdictRequest) -> dict[str, Any]:
        _item(p, item)
        try:
            return mark(p, item, request.verdict, request.defect or None, "app")
        except ValueError as err:
            raise HTTPException(status_code=422, detail=str(err)) from err
