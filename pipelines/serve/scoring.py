"""Scheduled scoring: a Prefect flow that scores the new images of a watched folder.

``inpformer serve-scoring --watch DIR --cron "*/10 * * * *"`` serves the flow as a deployment (its
runs and schedule are in the Prefect UI); ``--once`` runs it once now. Each run:

1. loads the model (default: ``models:/<tracking.registered_model>@champion``, or ``serve.model``);
2. lists the images under ``DIR`` (recursive; the category from the folder names, as ``predict``);
3. skips every image already scored by the same model version: the ledger ``scored.jsonl`` in the
   output folder holds (content SHA-256, model version) of each scored image, so a renamed copy
   is not scored again and a new champion scores everything once more;
4. appends the new rows to ``predictions.csv`` / ``.jsonl``, writes their overlays, and publishes a
   table artifact (key ``inpformer-flagged``) of the images decided anomalous, with links to
   their overlays;
5. queues the ``reject`` / ``review`` images for an operator (:mod:`pipelines.loop.review`);
6. writes ``drift.json`` (``drift.enabled``; :mod:`pipelines.loop.monitor`), logs it as an MLflow
   monitoring run and publishes it (artifact key ``inpformer-drift``);
7. starts ``inpformer retrain`` as a subflow when the run drifts (``drift.retrain``) or
   ``review.retrain_after`` verdicts came in since the last retrain.

Predictions are written before the ledger: a crash in between scores those images again rather
than losing them. A file that cannot be read (still being copied, corrupt) is reported and tried
again next run.

prefect is imported at module top: this module is only imported by the commands that run flows.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact

from components.files import atomic_write_text, file_digest
from components.scoring.decision import ANOMALOUS
from pipelines.builders import resolve_device
from pipelines.config import load_params
from pipelines.loop.monitor import log_monitoring, run_drift
from pipelines.loop.review import due_for_retrain, queue_rows
from pipelines.serve.predict import collect_images, open_model, score_images

__all__ = ["LEDGER_FILE", "retrain_reason", "run_once", "scoring_flow", "serve_scoring"]

LEDGER_FILE = "scored.jsonl"
FLAGGED_KEY = "inpformer-flagged"
DRIFT_KEY = "inpformer-drift"


def _ledger(out: Path) -> set[tuple[str, str]]:
    path = out / LEDGER_FILE
    if not path.is_file():
        return set()
    entries = (json.loads(line) for line in path.read_text().splitlines() if line.strip())
    return {(e["sha256"], e["version"]) for e in entries}


@flow(name="inpformer-scoring", log_prints=True)
def scoring_flow(
    watch: str,
    out: str = "",
    model: str = "",
    root: str = ".",
    overrides: list[str] | None = None,
    params_path: str = "params.yaml",
) -> dict[str, Any]:
    """Score the images under ``watch`` that this model version has not scored yet (see the module)."""
    logger = get_run_logger()
    cwd = os.getcwd()
    os.chdir(Path(root).resolve())
    try:
        p = load_params(params_path, list(overrides or []))
        target = Path(out or p.serve.watch_out)
        ref = model or p.serve.model or f"models:/{p.tracking.registered_model}@champion"
        package = open_model(p, ref, resolve_device(p.serve.device, "serve.device"))
        try:
            images = collect_images([watch])
        except FileNotFoundError:
            images = []
        done = _ledger(target)
        digests = {img: file_digest(img) for img, _ in images}
        new = [(img, src) for img, src in images if (digests[img], package.version) not in done]
        logger.info("%d image(s) in %s, %d new for %s %s", len(images), watch, len(new), ref, package.version)
        if not new:
            return {"scored": 0, "flagged": 0, "queued": 0, "version": package.version}
        summary = score_images(p, package, new, target, {"append": True})
        ledger = target / LEDGER_FILE
        old = ledger.read_text() if ledger.is_file() else ""
        scored = {row["path"] for row in summary.rows}
        lines = [
            json.dumps({"sha256": digests[img], "version": package.version, "path": str(img)})
            for img, _ in new
            if str(img) in scored
        ]
        atomic_write_text(ledger, old + "".join(line + "\n" for line in lines))
        flagged = [r for r in summary.rows if r["decision"] == ANOMALOUS]
        table = [
            {
                "image": r["path"],
                "category": r["category"],
                "score": round(r["score"], 6),
                "threshold": round(r["threshold"], 6),
                "overlay": f"[overlay]({Path(r['overlay']).resolve().as_uri()})",
            }
            for r in flagged
        ]
        create_table_artifact(
            table=table or [{"image": "none flagged", "category": "", "score": "", "threshold": "", "overlay": ""}],
            key=FLAGGED_KEY,
            description=f"{len(flagged)} of {summary.scored} new image(s) flagged by {ref} ({package.version})",
        )
        queued = queue_rows(p, summary.rows, target)
        result = {"scored": summary.scored, "flagged": len(flagged), "queued": queued, "version": package.version}
        if p.drift.enabled:
            report = run_drift(p, package, summary.rows, target)
            log_monitoring(p, report, target)
            _publish_drift(report)
            result["drift"] = report["drift"]
        trigger = retrain_reason(p, result)
        if trigger:
            from pipelines.loop.retrain import retrain_flow  # a subflow: the in-flow trigger

            result["retrain"] = retrain_flow(root=str(Path.cwd()), reason=trigger, params_path=params_path)
        return result
    finally:
        os.chdir(cwd)


def _publish_drift(report: dict[str, Any]) -> None:
    """The drift report as the Prefect table artifact ``inpformer-drift``."""
    table = [
        {
            "category": c,
            "images": e["images"],
            "drift": e["drift"],
            "psi": e.get("psi"),
            "ks_p": e.get("ks_p"),
            "embedding_z": e.get("embedding_z"),
            "flagged_rate": e.get("flagged_rate"),
            "expected_rate": e.get("expected_rate"),
            "reasons": "; ".join(e["reasons"]),
        }
        for c, e in report["categories"].items()
    ]
    create_table_artifact(table=table, key=DRIFT_KEY, description=f"drift: {report['drift']} ({report['version']})")


def retrain_reason(p: Any, result: dict[str, Any]) -> str:
    """Why this scoring run starts a retrain ('' : it does not)."""
    if result.get("drift") and p.drift.retrain:
        return "drift"
    return "review.retrain_after verdicts" if due_for_retrain(p) else ""


def _parameters(
    watch: str, model: str | None, out: str | None, overrides: list[str], params_path: str
) -> dict[str, Any]:
    """The flow's parameters: absolute watch folder, params file and workspace root."""
    return {
        "watch": str(Path(watch).resolve()),
        "out": out or "",
        "model": model or "",
        "root": os.getcwd(),
        "overrides": list(overrides),
        "params_path": str(Path(params_path).resolve()),
    }


def run_once(
    watch: str, model: str | None, out: str | None, overrides: list[str], params_path: str = "params.yaml"
) -> dict[str, Any]:
    """One flow run now (``serve-scoring --once``)."""
    return scoring_flow(**_parameters(watch, model, out, overrides, params_path))


def serve_scoring(
    watch: str,
    cron: str,
    model: str | None,
    out: str | None,
    name: str,
    overrides: list[str],
    params_path: str = "params.yaml",
) -> None:
    """Serve :func:`scoring_flow` as a deployment with a cron schedule (Prefect UI)."""
    parameters = _parameters(watch, model, out, overrides, params_path)
    scoring_flow.serve(name=name, cron=cron, parameters=parameters, limit=1)
