"""The promotion gate: a candidate replaces the champion only when every check passes.

``inpformer gate [--candidate REF] [--champion REF]`` (and the retrain flow) checks, on this machine:

1. **metric**: both models scored on the same, current test split (the manifest after the latest
   prepare, reviewed images included): the candidate's mAD beats the champion's by more than the
   champion gate's ``registry.min_gain`` (the noise floor when measured; no champion: passes);
2. **parity**: the candidate exports to ONNX and matches PyTorch within ``export.map_rtol`` /
   ``export.score_rtol`` (:func:`pipelines.serve.export.export`);
3. **latency**: the candidate's batch-1 scoring (median of ``LATENCY_RUNS`` after warm-up, timed
   as ``inpformer benchmark`` times) is within ``serve.latency_budget_ms``.

Only then are the aliases ``champion`` and the scope's ``champion-<dataset>-<setting>`` moved to the
candidate. The table is printed and returned (the retrain flow publishes it as a Prefect artifact).
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from components.data.datasets import ImageDataset, Record
from components.errors import ExportParityError
from components.scoring.inference import predict
from components.scoring.scorer import LoadedModel
from pipelines.builders import resolve_device
from pipelines.config import Params
from pipelines.loop.thresholds import registry_client, registry_version
from pipelines.repro.record import min_gain
from pipelines.serve.predict import open_model
from pipelines.stages.eval_checks import result_mad
from pipelines.stages.records import evaluation_records, load_records
from pipelines.tracking.registry import CHAMPION, champion_alias

__all__ = ["batch1_latency_ms", "gate", "mad_on"]

LATENCY_RUNS = 10
ONNX_SUFFIX = ".onnx"


def mad_on(p: Params, model: LoadedModel, test: list[Record]) -> float:
    """The model's mAD (mean over its categories of the per-category mAD) on ``test``."""
    if model.model is None or model.scoring is None:
        raise ValueError(f"{model.label}: the gate scores PyTorch models (a registry version), not exported files.")
    mads = []
    for category in model.categories:
        recs = [r for r in test if r.category == category]
        if len({r.label for r in recs}) < 2:
            continue
        ds = ImageDataset(recs, model.transform)
        res = predict(model.model, ds, model.scoring, p.eval.batch_size, "cpu", 0, progress=False)
        mads.append(result_mad(p, res, recs))
    finite = [m for m in mads if math.isfinite(m)]
    return float(np.mean(finite)) if finite else math.nan


def batch1_latency_ms(model: LoadedModel, runs: int = LATENCY_RUNS) -> float:
    """Median batch-1 scoring time of ``model`` (a normalised input), in milliseconds: the
    benchmark's timing (:func:`pipelines.serve.benchmark.timed`), eager row."""
    from pipelines.serve.benchmark import timed

    side = model.transform.crop
    return timed(model.scorer, torch.zeros(1, 3, side, side), runs, throughput=False)["p50_ms"]


def _champion(p: Params, ref: str) -> LoadedModel | None:
    """The registered model of ``ref``, or None when the alias or version does not exist."""
    try:
        return open_model(p, ref, "cpu")
    except Exception as err:  # no champion yet (MLflow raises a generic error for a missing alias)
        if "alias" in str(err).lower() or "not found" in str(err).lower() or "RESOURCE_DOES_NOT_EXIST" in str(err):
            return None
        raise


def gate(p: Params, candidate: str = "", champion: str = "", promote: bool = True) -> dict[str, Any]:
    """Run the gate (see the module); returns {"passed", "promoted", "checks": [rows], ...}."""
    name = p.tracking.registered_model
    candidate = candidate or f"models:/{name}@candidate"
    champion = champion or f"models:/{name}@{CHAMPION}"
    resolve_device(p.serve.device, "serve.device")
    cand = _champion(p, candidate)
    if cand is None:
        raise ValueError(f"{candidate}: no such registered version; evaluate registers a candidate (dvc repro).")
    champ = _champion(p, champion)
    test = evaluation_records(p, load_records(p))
    cand_mad = mad_on(p, cand, test)
    champ_mad = mad_on(p, champ, test) if champ is not None else math.nan
    gain, source = min_gain(p)
    metric_ok = math.isfinite(cand_mad) and (
        champ is None or not math.isfinite(champ_mad) or cand_mad - champ_mad > gain
    )
    checks = [
        {
            "check": "metric",
            "candidate": round(cand_mad, 6),
            "reference": "no champion" if champ is None else round(champ_mad, 6),
            "limit": f"gain > {gain:.4f} ({source})",
            "passed": metric_ok,
        }
    ]
    with tempfile.TemporaryDirectory(prefix="inpformer-gate-") as tmp:
        from pipelines.serve.export import export  # onnx: only when gating

        q = p.model_copy(update={"export": p.export.model_copy(update={"format": "onnx"})})
        try:
            parity = export(q, candidate, str(Path(tmp) / ("model" + ONNX_SUFFIX)))
            detail, parity_ok = f"maps {parity['map_rel']:.1e}, scores {parity['score_rel']:.1e}", True
        except ExportParityError as err:
            detail, parity_ok = str(err), False
    limits = f"maps <= {p.export.map_rtol:g}, scores <= {p.export.score_rtol:g}"
    checks.append(
        {"check": "parity", "candidate": detail, "reference": "PyTorch", "limit": limits, "passed": parity_ok}
    )
    latency = batch1_latency_ms(cand)
    budget = p.serve.latency_budget_ms
    checks.append(
        {
            "check": "latency",
            "candidate": f"{latency:.1f} ms",
            "reference": "batch 1",
            "limit": f"<= {budget:g} ms",
            "passed": latency <= budget,
        }
    )
    passed = all(c["passed"] for c in checks)
    promoted = False
    if passed and promote:
        client = registry_client(p)
        reg, version = registry_version(client, candidate)
        tags = client.get_model_version(reg, version).tags
        scope = {
            "dataset": tags.get("dataset", ""),
            "setting": tags.get("setting", ""),
            "group": tags.get("group", "all"),
        }
        for alias in (CHAMPION, champion_alias(scope)):
            client.set_registered_model_alias(reg, alias, version)
        promoted = True
    print(_table(checks))
    verdict = {(True, True): "promoted to champion", (True, False): "passed (not promoted)"}.get(
        (passed, promoted), "kept the champion"
    )
    print(f"gate: {candidate} ({cand.version}) {verdict}")
    return {"passed": passed, "promoted": promoted, "candidate": cand.version, "checks": checks}


def _table(checks: list[dict[str, Any]]) -> str:
    head = ["check", "candidate", "reference", "limit", "passed"]
    rows = [[str(c[k]) for k in head] for c in checks]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(cells, widths)) for cells in [head, *rows])
