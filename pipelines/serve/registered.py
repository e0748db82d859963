"""A registered model (``models:/…``, ``runs:/…``) downloaded for scoring, with its threshold versions."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from components.scoring.package import LEGACY_SCORING_FILE, PACKAGE_FILE
from pipelines.config import Params
from pipelines.loop.thresholds import registry_version, versions_of
from pipelines.tracking.guard import tracking_uri

__all__ = ["download_registered"]


def download_registered(p: Params, uri: str, dst: Path) -> tuple[Path, str, list[dict[str, Any]]]:
    """Download a registered model into ``dst``: (its model folder, its version, its threshold versions)."""
    import mlflow  # heavy: only for registry URIs

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one line per file otherwise

    mlflow.set_tracking_uri(tracking_uri(p))  # the workspace's store, as every stage resolves it
    local = Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(dst)))
    folders = [f.parent for f in local.rglob(PACKAGE_FILE)] or [f.parent for f in local.rglob(LEGACY_SCORING_FILE)]
    if len(folders) != 1:
        msg = f"{uri}: expected one model folder with {PACKAGE_FILE}, found {len(folders)}."
        raise ValueError(msg)
    version, entries = uri.rsplit("/", 1)[-1], []
    if uri.startswith("models:/"):
        client = mlflow.MlflowClient()
        name, version = registry_version(client, uri)
        entries = versions_of(dict(client.get_model_version(name, version).tags or {}))
    return folders[0], f"v{version}" if version.isdigit() else version, entries
