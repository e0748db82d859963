"""``inpformer app``: a web inspector on 127.0.0.1 (FastAPI, one page, no build step).

Pick a model (workspace folders, registered versions and aliases, exported files, or those given
with ``--model``) and a category, drop or choose images, and see each one's overlay (in its own
pixel frame), score, threshold and decision. A slider moves the image threshold; decisions update
at once. Scoring goes through the same :class:`~components.scoring.decision.DecisionRule` as ``predict``
and the MLflow model.

Guards (the page is for this machine's browser; a hostile page open in that browser must not reach it):

* **Host allow-list**: requests whose ``Host`` is not the bound host, 127.0.0.1, localhost or one of
  ``serve.allowed_hosts`` get 421 (a DNS-rebinding page cannot list models or score).
* **Origin check**: a state-changing request (POST) whose ``Origin`` is another site gets 403.
* **Body limit**: ``serve.max_upload_mb`` of image (its base64 in JSON: 4/3 of that), enforced from
  ``Content-Length`` before reading and while reading (413); error replies never echo the body.
* **Concurrency bound**: at most ``serve.max_concurrent`` images scored at once; more get 503 at once.

API: ``GET /api/models`` → the offered refs; ``GET /api/model?ref=…`` → its categories and version
(loads it); ``POST /api/score`` with
``{"model", "category", "image": base64 file}`` → score, threshold, decision, the category's score
range, and the overlay as a base64 PNG; a ``reject`` or ``review`` upload joins the review queue.
The Review tab's routes: :mod:`pipelines.serve.review_api`.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import logging
import socket
import threading
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from PIL import Image
from pydantic import BaseModel

from components.data.io import ImageReadError, decode_rgb
from components.scoring.package import PACKAGE_FILE
from pipelines.builders import resolve_device
from pipelines.config import Params
from pipelines.loop.review import QUEUED_ACTIONS, queue_upload
from pipelines.paths import MODELS_DIR
from pipelines.serve.predict import LoadedModel, open_model, overlay_for, score_pil
from pipelines.serve.review_api import add_review_routes

logger = logging.getLogger(__name__)

__all__ = ["ScoreRequest", "create_app", "offered_models", "run_app"]

PAGE_FILE = Path(__file__).with_name("static") / "index.html"  # the page: plain HTML + JS, no build step

REGISTRY_VERSIONS = 20  # newest registered versions offered
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
STATE_CHANGING = ("POST", "PUT", "PATCH", "DELETE")
BASE64_GROWTH = 4 / 3  # base64 text per byte of file
JSON_ENVELOPE_BYTES = 64 * 1024  # the request's other fields
MIB = 2**20


class ScoreRequest(BaseModel):
    """One image to score."""

    model: str
    category: str = ""
    image: str  # base64 of the file
    name: str = ""  # the file's name (shown in the review queue)


def offered_models(p: Params, given: list[str]) -> list[str]:
    """``given``, else the workspace's model folders, exported files and registry versions/aliases."""
    if given:
        return list(given)
    refs = [str(d) for d in sorted(MODELS_DIR.iterdir()) if (d / PACKAGE_FILE).is_file()] if MODELS_DIR.is_dir() else []
    exported = Path(p.export.out_dir)
    if exported.is_dir():
        refs += [str(f) for f in sorted(exported.iterdir()) if f.suffix in (".onnx", ".pt")]
    return refs + _registry_refs(p)


def _registry_refs(p: Params) -> list[str]:
    from pipelines.tracking.guard import sqlite_path, tracking_uri

    db = sqlite_path(p)
    if not p.tracking.enabled or db is None or not db.is_file():
        return []
    try:
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=tracking_uri(p))
        name = p.tracking.registered_model
        model = client.get_registered_model(name)
        versions = client.search_model_versions(f"name='{name}'", max_results=REGISTRY_VERSIONS)
    except Exception as err:  # no registry yet, or unreadable: the workspace models still work
        logger.info("registry not offered: %s", err)
        return []
    aliases = [f"models:/{name}@{a}" for a in sorted(model.aliases)]
    numbers = sorted((int(v.version) for v in versions), reverse=True)
    return aliases + [f"models:/{name}/{v}" for v in numbers]


def _decode(text: str, limit: int) -> Image.Image:
    try:
        data = base64.b64decode(text.split(",", 1)[-1], validate=True)  # data URLs too
    except (binascii.Error, ValueError) as err:
        raise HTTPException(status_code=400, detail=f"not base64: {err}") from err
    if len(data) > limit:
        raise HTTPException(status_code=413, detail=f"image larger than {limit / MIB:g} MiB (serve.max_upload_mb)")
    try:
        return decode_rgb(data, "upload")
    except ImageReadError as err:
        raise HTTPException(status_code=400, detail=str(err)) from err


def _host_name(value: str) -> str:
    """The host of a ``Host`` header or an origin's netloc, without port or IPv6 brackets, lower-case."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1 : value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


class GuardMiddleware:
    """Host allow-list, Origin check and request-body limit, before FastAPI reads anything (ASGI)."""

    def __init__(self, app: Any, allowed: set[str], max_body: int) -> None:
        self.app, self.allowed, self.max_body = app, allowed, max_body

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        host = _host_name(headers.get("host", ""))
        if host not in self.allowed:
            await _reply(send, 421, f"host {host!r} is not served here (serve.allowed_hosts)")
            return
        origin = headers.get("origin")
        if scope["method"] in STATE_CHANGING and origin is not None:
            if origin == "null" or _host_name(urlsplit(origin).netloc) not in self.allowed:
                await _reply(send, 403, f"cross-site request from origin {origin!r} refused")
                return
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body:
            await _reply(send, 413, f"request body larger than {self.max_body / MIB:.1f} MiB (serve.max_upload_mb)")
            return
        await self._bounded(scope, receive, send)

    async def _bounded(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """Run the app with a body counted while it is read: past the limit, answer 413 at once and
        tell the app the client left (its own reply is dropped)."""
        seen, refused = 0, False

        async def counted() -> dict[str, Any]:
            nonlocal seen, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:
                    refused = True
                    await _reply(send, 413, f"request body larger than {self.max_body / MIB:.1f} MiB")
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: dict[str, Any]) -> None:
            if not refused:
                await send(message)

        await self.app(scope, counted, guarded_send)


async def _reply(send: Any, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def create_app(p: Params, models: list[str], host: str | None = None) -> FastAPI:
    """The app offering ``models`` (loaded on first use and kept), guarded for ``host`` (default
    ``serve.host``) as the module docstring says."""
    app = FastAPI(title="inpformer inspector")
    device = resolve_device(p.serve.device, "serve.device")
    cache: dict[str, LoadedModel] = {}
    image_limit = int(p.serve.max_upload_mb * MIB)
    allowed = {_host_name(h) for h in (host or p.serve.host, *LOOPBACK_NAMES, *p.serve.allowed_hosts)}
    app.add_middleware(
        GuardMiddleware, allowed=allowed, max_body=int(image_limit * BASE64_GROWTH) + JSON_ENVELOPE_BYTES
    )
    slots = threading.BoundedSemaphore(p.serve.max_concurrent)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, err: RequestValidationError) -> JSONResponse:  # never echo the body back
        fields = sorted({".".join(str(x) for x in e.get("loc", ())) for e in err.errors()})
        return JSONResponse(status_code=422, content={"detail": f"invalid request: fields {fields}"})

    def package(ref: str) -> LoadedModel:
        if ref not in models:
            raise HTTPException(status_code=404, detail=f"model {ref!r} is not offered: {models}")
        if ref not in cache:
            try:
                cache[ref] = open_model(p, ref, device)
            except (ValueError, FileNotFoundError, ImportError) as err:
                raise HTTPException(status_code=422, detail=f"{ref}: {err}") from err
        return cache[ref]

    @app.get("/", response_class=HTMLResponse)
    def index() -> str:
        return PAGE_FILE.read_text(encoding="utf-8")

    @app.get("/api/models")
    def list_models() -> list[str]:
        return models

    @app.get("/api/model")
    def model_info(ref: str) -> dict[str, Any]:
        pkg = package(ref)  # loaded on first use only: offering many versions costs nothing
        return {"categories": pkg.categories, "version": pkg.version}

    @app.post("/api/score")
    def score(request: ScoreRequest) -> dict[str, Any]:
        if not slots.acquire(blocking=False):
            raise HTTPException(status_code=503, detail="busy: too many images being scored (serve.max_concurrent)")
        try:
            return _score(request)
        finally:
            slots.release()

    def _score(request: ScoreRequest) -> dict[str, Any]:
        pkg = package(request.model)
        category = request.category or (pkg.categories[0] if len(pkg.categories) == 1 else "")
        if category not in pkg.categories:
            raise HTTPException(status_code=422, detail=f"category {category!r} is not one of {pkg.categories}")
        image = _decode(request.image, image_limit)
        res = score_pil(pkg, [image], [category], p.serve.batch_size)[0]
        overlay = overlay_for(pkg, image, category, res["map"], p.serve.heat_scale)
        buffer = io.BytesIO()
        overlay.save(buffer, format="PNG")
        if res["action"] in QUEUED_ACTIONS:  # flagged uploads wait in the review queue (the Review tab)
            row = {"category": category, "score": res["score"], "threshold": res["threshold"], "action": res["action"]}
            row |= {"model": pkg.label, "version": pkg.version, "name": Path(request.name).name}
            raw = base64.b64decode(request.image.split(",", 1)[-1])
            queue_upload(p, raw, request.name or "upload.png", row, buffer.getvalue())
        t = pkg.rule.of(category)
        low, high = (0.0, 1.0) if pkg.rule.normalized else (t.image_min, t.image_max)
        return {
            "category": category,
            "score": _finite(res["score"], None),
            "threshold": _finite(res["threshold"], None),
            "decision": res["decision"],
            "action": res["action"],
            "rule": t.rule,
            "range": [_finite(low, res["score"]), _finite(high, res["score"])],  # slider bounds
            "version": pkg.version,
            "overlay": base64.b64encode(buffer.getvalue()).decode("ascii"),
        }

    add_review_routes(app, p)
    return app


def _finite(x: float, fallback: float) -> float:
    return float(x) if x == x and abs(x) != float("inf") else float(fallback)


def run_app(p: Params, models: list[str], host: str | None, port: int | None) -> None:
    """Serve the app (``serve.host``:``serve.port`` unless given) until interrupted."""
    import uvicorn

    offered = offered_models(p, models)
    if not offered:
        msg = "no model to offer: train one (dvc repro), or pass --model (folder, models:/…, .onnx)."
        raise FileNotFoundError(msg)
    host, port = host or p.serve.host, port or p.serve.port
    print(f"inpformer inspector on http://{host}:{port}/ with {len(offered)} model(s)")
    uvicorn.run(create_app(p, offered, host), host=host, port=port, log_level="warning")


def listening_socket(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    """A bound, listening socket (port 0: a free one), for serving without a start-up race."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(16)
    return sock
