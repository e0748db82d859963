"""Drift of a scoring run (``drift.json`` next to its predictions) and its monitoring record.

For every category of the run: :func:`components.scoring.drift.drift_report` against the reference
the evaluate stage stored in the model package (reference normal scores; pooled encoder features of
the training images). The embedding part needs the PyTorch model (not an exported file) and a
non-tiled geometry; otherwise ``embedding_z`` is null. The report is written atomically to
``<out>/drift.json`` (and appended to ``<out>/drift_history.jsonl``), and logged as a run of the MLflow
experiment ``<tracking.experiment>-monitoring`` (metrics ``<category>.psi``, ``.ks_p``,
``.embedding_z``, ``.flagged_rate``; tags: model version, drift).
"""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from components.data.io import read_rgb
from components.files import atomic_write_text
from components.scoring.drift import DriftSettings, drift_report
from components.scoring.scorer import LoadedModel
from pipelines.config import Params
from pipelines.tracking.runs import safe_metric_name, tracked_run

__all__ = ["DRIFT_FILE", "log_monitoring", "run_drift"]

DRIFT_FILE, HISTORY_FILE = "drift.json", "drift_history.jsonl"
MONITORING_SUFFIX = "-monitoring"


def _features(p: Params, package: LoadedModel, paths: list[str]) -> np.ndarray | None:
    """Pooled encoder features (N×C) of the images, or None (exported model, tiles)."""
    model, transform = package.model, package.transform
    if model is None or transform.tiled or not paths:
        return None
    device = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for start in range(0, len(paths), p.serve.batch_size):
            batch = torch.stack([transform(read_rgb(path)) for path in paths[start : start + p.serve.batch_size]])
            fused, _, _ = model.encode(batch.to(device))
            out.append(fused.mean(1).float().cpu().numpy())
    return np.concatenate(out)


def run_drift(p: Params, package: LoadedModel, rows: list[dict[str, Any]], out: Path) -> dict[str, Any]:
    """The drift report of a scoring run's ``rows`` (raw scores), written to ``out``/drift.json."""
    d = p.drift
    settings = DriftSettings(d.bins, d.psi_max, d.ks_alpha, d.embedding_max, d.min_images)
    categories: dict[str, Any] = {}
    for category in sorted({r["category"] for r in rows}):
        mine = [r for r in rows if r["category"] == category]
        scores = np.asarray([r["raw_score"] for r in mine], np.float64)
        enough = len(mine) >= d.min_images
        features = _features(p, package, [r["path"] for r in mine]) if enough else None
        threshold = package.rule.of(category).image_threshold
        categories[category] = drift_report(package.package.drift.get(category), scores, threshold, features, settings)
    report = {
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": package.label,
        "version": package.version,
        "images": len(rows),
        "drift": any(c.get("drift") for c in categories.values()),
        "categories": categories,
    }
    text = json.dumps(_safe(report), indent=2)
    atomic_write_text(out / DRIFT_FILE, text + "\n")
    history = out / HISTORY_FILE
    atomic_write_text(history, (history.read_text() if history.is_file() else "") + json.dumps(_safe(report)) + "\n")
    return report


def _safe(value: Any) -> Any:
    """NaN and infinities as null (strict JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_safe(v) for v in value]
    return value


def log_monitoring(p: Params, report: dict[str, Any], out: Path) -> str:
    """One MLflow run of ``<experiment>-monitoring`` for the scoring run; its id ('' untracked)."""
    tracking = p.tracking.model_copy(update={"experiment": p.tracking.experiment + MONITORING_SUFFIX})
    q = p.model_copy(update={"tracking": tracking})
    tags = {"model_version": report["version"], "model": report["model"], "drift": str(report["drift"]).lower()}
    with tracked_run(q, "monitoring", f"scoring {report['version']}", tags=tags) as mlflow:
        metrics = {"images": float(report["images"]), "drift": float(report["drift"])}
        for category, entry in report["categories"].items():
            for key in ("psi", "ks", "ks_p", "embedding_z", "flagged_rate", "expected_rate"):
                value = entry.get(key)
                if isinstance(value, float) and math.isfinite(value):
                    metrics[safe_metric_name(f"{category}.{key}")] = value
        mlflow.log_metrics(metrics)
        mlflow.log_artifact(str(out / DRIFT_FILE))
        run = mlflow.active_run()
        return run.info.run_id if run is not None else ""
