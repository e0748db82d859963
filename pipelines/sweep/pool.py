"""Sweep workers as Prefect flow runs on a work pool (``inpformer sweep --prefect-pool NAME``).

The coordinator (``run_sweep``) creates the study, the validation split and the MLflow parent run as
usual, then registers the deployment ``inpformer-sweep-worker/sweep-<pool>`` on the pool and submits
one flow run per worker share. A worker started anywhere with ``prefect worker start --pool NAME``
(a ``process`` pool) picks them up; each flow run runs ``inpformer sweep --n-trials K`` in the
workspace folder ``root`` with the parent run and sweep id in its environment, so its trials land
in the same study and under the same MLflow parent run. Machines share the workspace path, the code
(git), the prepared data (a DVC remote) and the study storage (PostgreSQL).

prefect is imported at module top: only ``--prefect-pool`` imports this module.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
from typing import Any

from prefect import flow, get_run_logger
from prefect.client.schemas.objects import StateType
from prefect.deployments import run_deployment
from prefect.flow_runs import wait_for_flow_run

from pipelines.sweep.command import worker_command

__all__ = ["WORKER_FLOW", "run_on_pool", "sweep_worker_flow"]

WORKER_FLOW = "inpformer-sweep-worker"
ENTRYPOINT = "pipelines.sweep.pool.sweep_worker_flow"  # a module path: workers import the installed package


@flow(name=WORKER_FLOW, log_prints=True)
def sweep_worker_flow(root: str, n_trials: int, env: dict[str, str], params_path: str, overrides: list[str]) -> int:
    """``n_trials`` trials of the shared study, as one worker (``env``: parent run, worker index, sweep id)."""
    cmd = worker_command(params_path, overrides, n_trials)
    get_run_logger().info("%d trial(s) in %s", n_trials, root)
    code = subprocess.run(cmd, cwd=root, env={**os.environ, **env}, check=False).returncode
    if code:
        msg = f"the sweep worker exited with {code}"
        raise RuntimeError(msg)
    return code


def _deploy(pool: str) -> str:
    """Register (or update) the worker deployment on ``pool``; its ``flow/deployment`` name."""
    from prefect.deployments.runner import EntrypointType

    deployment = sweep_worker_flow.to_deployment(name=f"sweep-{pool}", entrypoint_type=EntrypointType.MODULE_PATH)
    deployment.apply(work_pool_name=pool)
    return f"{WORKER_FLOW}/sweep-{pool}"


def run_on_pool(
    pool: str, root: str, jobs: list[tuple[int, dict[str, str]]], params_path: str, overrides: list[str]
) -> list[int]:
    """Submit one flow run per (trials, environment) job to ``pool``; wait for all; their exit codes
    (0 completed, 1 otherwise)."""
    name = _deploy(pool)
    runs: list[Any] = []
    for n_trials, env in jobs:
        parameters = {
            "root": root,
            "n_trials": n_trials,
            "env": env,
            "params_path": params_path,
            "overrides": overrides,
        }
        runs.append(run_deployment(name, parameters=parameters, timeout=0))
        print(f"submitted {n_trials} trial(s) to work pool {pool!r} as flow run {runs[-1].name}")
    codes = []
    for run in runs:
        final = asyncio.run(wait_for_flow_run(run.id, timeout=None, log_states=False))
        codes.append(0 if final.state is not None and final.state.type == StateType.COMPLETED else 1)
    return codes
