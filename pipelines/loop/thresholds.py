"""Audited threshold versions: ``inpformer thresholds show | history | set | approve``.

A registered model version carries the thresholds its evaluation calibrated (in its package). A
line changes them as a process setting: ``set`` writes a new threshold version as a tag of that
model version (``inpformer.threshold.NNNN``: category, image and review thresholds, the previous
values, who, when, why, and ``approved`` or ``draft``), so the audit history lives in the registry
with the version it applies to and is never rewritten. ``approve N`` approves a draft as a new
version. predict, the app, scheduled scoring and export (:func:`pipelines.serve.predict.open_model`)
decide with the latest approved version of each category; the rule they report is ``manual@tNNNN``.
The MLflow pyfunc logged with a version keeps the thresholds it was registered with.
"""

from __future__ import annotations

import getpass
import json
import math
import os
import tempfile
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from components.scoring.decision import CategoryThresholds
from components.scoring.package import ModelPackage, read_package
from pipelines.config import Params
from pipelines.tracking.guard import tracking_uri

__all__ = [
    "TAG_PREFIX",
    "apply_versions",
    "approve",
    "history",
    "registry_client",
    "registry_version",
    "set_threshold",
    "show",
]

TAG_PREFIX = "inpformer.threshold."
APPROVED, DRAFT = "approved", "draft"


def registry_client(p: Params) -> Any:
    import mlflow  # heavy: only for these commands

    mlflow.set_tracking_uri(tracking_uri(p))
    return mlflow.MlflowClient()


def registry_version(client: Any, ref: str) -> tuple[str, str]:
    """(registered name, version number) of ``models:/<name>@<alias>`` or ``models:/<name>/<version>``."""
    if not ref.startswith("models:/"):
        msg = f"{ref}: thresholds are versioned with registered models: models:/<name>@<alias> or models:/<name>/<n>."
        raise ValueError(msg)
    body = ref[len("models:/") :].rstrip("/")
    if "@" in body:
        name, alias = body.split("@", 1)
        try:
            return name, str(client.get_model_version_by_alias(name, alias).version)
        except Exception as err:  # MLflow raises a generic exception for an unknown alias
            raise ValueError(f"{ref}: no such registered model alias ({err}).") from err
    name, _, version = body.partition("/")
    if not version.isdigit():
        raise ValueError(f"{ref}: expected models:/<name>/<version number>.")
    return name, version


def versions_of(tags: dict[str, str]) -> list[dict[str, Any]]:
    """The threshold versions recorded in a model version's tags, oldest first."""
    out = []
    for key in sorted(k for k in tags if k.startswith(TAG_PREFIX)):
        try:
            entry = json.loads(tags[key])
        except ValueError:
            continue  # not ours: never fatal for scoring
        if isinstance(entry, dict) and isinstance(entry.get("category"), str):
            out.append(entry)
    return out


def apply_versions(package: ModelPackage, entries: list[dict[str, Any]]) -> ModelPackage:
    """``package`` with each category's latest approved threshold version applied."""
    thresholds = dict(package.thresholds)
    for entry in entries:
        category = entry["category"]
        if entry.get("status") != APPROVED or category not in thresholds:
            continue
        image, review = float(entry["image_threshold"]), float(entry.get("review_threshold", math.nan))
        if not math.isfinite(image):
            continue
        thresholds[category] = replace(
            thresholds[category],
            image_threshold=image,
            review_threshold=review,
            rule=f"manual@t{int(entry['version']):04d}",
        )
    return replace(package, thresholds=thresholds)


def _package(client: Any, name: str, version: str) -> ModelPackage:
    """The registered version's package (only its package.json is downloaded)."""
    import mlflow

    mv = client.get_model_version(name, version)
    folder = Path(mv.source.rstrip("/")).name
    subs = [a.path for a in client.list_artifacts(mv.run_id, f"{folder}/artifacts") if a.is_dir]
    if len(subs) != 1:
        raise ValueError(f"models:/{name}/{version}: expected one model folder in its artifacts, found {subs}.")
    sub = Path(subs[0]).name
    with tempfile.TemporaryDirectory(prefix="inpformer-package-") as tmp:
        mlflow.artifacts.download_artifacts(f"models:/{name}/{version}/artifacts/{sub}/package.json", dst_path=tmp)
        return read_package(next(Path(tmp).rglob("package.json")).parent)


def _effective(client: Any, name: str, version: str) -> tuple[ModelPackage, list[dict[str, Any]]]:
    entries = versions_of(dict(client.get_model_version(name, version).tags or {}))
    return apply_versions(_package(client, name, version), entries), entries


def show(p: Params, ref: str) -> list[dict[str, Any]]:
    """Per category the thresholds predict/app/scoring use now, and their rule."""
    client = registry_client(p)
    name, version = registry_version(client, ref)
    package, _ = _effective(client, name, version)
    return [
        {
            "category": c,
            "image_threshold": t.image_threshold,
            "review_threshold": t.review_threshold,
            "rule": t.rule,
            "review_rule": t.review_rule,
        }
        for c, t in package.thresholds.items()
    ]


def history(p: Params, ref: str) -> list[dict[str, Any]]:
    """Every threshold version of the model version, oldest first."""
    client = registry_client(p)
    name, version = registry_version(client, ref)
    return versions_of(dict(client.get_model_version(name, version).tags or {}))


def _check(package: ModelPackage, category: str, image: float, review: float | None, reason: str) -> None:
    if category not in package.thresholds:
        raise ValueError(f"category {category!r} is not one of the model's {sorted(package.thresholds)}.")
    if not math.isfinite(image):
        raise ValueError(f"--image {image}: a threshold must be a finite number.")
    if review is not None and not (math.isfinite(review) and review < image):
        raise ValueError(f"--review {review}: the review threshold must be finite and below --image {image}.")
    if not reason.strip():
        raise ValueError("--reason is required: say why the threshold changes (it is the audit trail).")


def _write(client: Any, name: str, version: str, entry: dict[str, Any]) -> dict[str, Any]:
    entries = versions_of(dict(client.get_model_version(name, version).tags or {}))
    number = max((int(e.get("version", 0)) for e in entries), default=0) + 1
    entry = {"version": number, **entry, "user": os.environ.get("INPFORMER_USER") or getpass.getuser()}
    entry["time"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    client.set_model_version_tag(name, version, f"{TAG_PREFIX}{number:04d}", json.dumps(entry))
    return entry


def set_threshold(
    p: Params, ref: str, category: str, image: float, review: float | None, reason: str, draft: bool = False
) -> dict[str, Any]:
    """Write a new threshold version of ``category`` (see the module); returns it."""
    client = registry_client(p)
    name, version = registry_version(client, ref)
    package, _ = _effective(client, name, version)
    old: CategoryThresholds | None = package.thresholds.get(category)
    kept = old.review_threshold if old is not None and math.isfinite(old.review_threshold) else None
    if review is None and kept is not None and kept >= image:
        msg = f"the review band's lower end {kept:g} is not below --image {image:g}: pass --review too."
        raise ValueError(msg)
    _check(package, category, image, review if review is not None else kept, reason)
    assert old is not None  # _check: a category of the model
    band = math.nan if kept is None else kept  # --image alone keeps the review band's lower end
    entry = {
        "category": category,
        "image_threshold": float(image),
        "review_threshold": band if review is None else float(review),
        "previous": {
            "image_threshold": old.image_threshold,
            "review_threshold": old.review_threshold,
            "rule": old.rule,
        },
        "reason": reason,
        "status": DRAFT if draft else APPROVED,
        "model_version": version,
    }
    return _write(client, name, version, entry)


def approve(p: Params, ref: str, number: int, reason: str) -> dict[str, Any]:
    """Approve draft threshold version ``number`` as a new, approved version."""
    client = registry_client(p)
    name, version = registry_version(client, ref)
    drafts = [
        e for e in versions_of(dict(client.get_model_version(name, version).tags or {})) if e.get("version") == number
    ]
    if not drafts or drafts[0].get("status") != DRAFT:
        raise ValueError(f"{ref}: threshold version {number} is not a draft (see `inpformer thresholds history`).")
    draft = drafts[0]
    entry = {k: draft[k] for k in ("category", "image_threshold", "review_threshold", "previous", "model_version")}
    return _write(
        client,
        name,
        version,
        {**entry, "reason": reason or f"approves t{number:04d}", "status": APPROVED, "approves": number},
    )
