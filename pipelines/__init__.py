"""The orchestration layer: params.yaml, the DVC stages, Prefect flows, MLflow tracking, Optuna sweeps, serving.

Importing it turns telemetry off for every tool it drives, including servers they start in other
processes (Prefect's temporary API server checks only its own setting, not ``DO_NOT_TRACK``).
"""

from __future__ import annotations

import os

TELEMETRY_OFF = {
    "DO_NOT_TRACK": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DVC_NO_ANALYTICS": "1",
}
TRUTHY = ("1", "true", "yes")


def telemetry_off() -> None:
    """Default every tool's telemetry to off; with ``DO_NOT_TRACK`` set, force Prefect's server analytics off."""
    for key, value in TELEMETRY_OFF.items():
        os.environ.setdefault(key, value)
    if os.environ["DO_NOT_TRACK"].strip().lower() in TRUTHY:
        os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"


telemetry_off()
