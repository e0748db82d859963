"""``inpformer retrain``: the pipeline rerun as a DVC experiment, then the promotion gate.

The flow (Prefect ``inpformer-retrain``; a deployment with ``inpformer retrain --serve``) runs
``dvc exp run -n retrain-<UTC time>`` in the workspace with ``INPFORMER_PROMOTION=gate``, so the
evaluate stage registers the new version under the alias ``candidate`` and moves no champion alias;
then :func:`pipelines.loop.gate.gate` decides, and its table is published as the Prefect artifact
``inpformer-gate``. The scoring flow starts it (as a subflow) when a run drifts (``drift.retrain``)
or when ``review.retrain_after`` verdicts have come in since the last retrain; the next scoring
run uses whatever ``champion`` then names.

prefect is imported at module top: only the commands that run flows import this module.
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.artifacts import create_table_artifact

from components.files import atomic_write_text
from pipelines.config import load_params
from pipelines.flows import dvc_executable, run_command
from pipelines.loop.gate import gate
from pipelines.loop.review import RETRAIN_MARK, verdicts
from pipelines.tracking.registry import PROMOTION_ENV

__all__ = ["retrain_flow"]

GATE_KEY = "inpformer-gate"


@flow(name="inpformer-retrain", log_prints=True)
def retrain_flow(root: str = ".", reason: str = "manual", params_path: str = "params.yaml") -> dict[str, Any]:
    """Retrain as a DVC experiment and gate the candidate (see the module)."""
    cwd = os.getcwd()
    os.chdir(Path(root).resolve())
    try:
        name = "retrain-" + datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
        print(f"retraining ({reason}) as DVC experiment {name}")
        run_command([dvc_executable(), "exp", "run", "-n", name], Path.cwd(), {PROMOTION_ENV: "gate"})
        p = load_params(params_path, [])
        result = gate(p)
        create_table_artifact(table=result["checks"], key=GATE_KEY, description=f"gate of {result['candidate']}")
        mark = Path(p.review.queue_dir) / RETRAIN_MARK
        mark.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(mark, json.dumps({"verdicts": len(verdicts(p)), "experiment": name, **result}, default=str))
        return {**result, "experiment": name}
    finally:
        os.chdir(cwd)
