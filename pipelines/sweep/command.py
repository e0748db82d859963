"""Sweep worker processes: their one command line (local and Prefect work-pool workers) and how
they are stopped."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys

__all__ = ["WORKER_ENV", "start_workers", "stop_workers", "worker_command"]

WORKER_ENV = "INPFORMER_SWEEP_WORKER"  # a worker's index: its sampler seed offset


def worker_command(params_path: str, overrides: list[str], share: int) -> list[str]:
    """The command line of one worker process running ``share`` trials of the study."""
    head = [sys.executable, "-m", "pipelines.cli", "sweep", "--no-progress", "--n-trials", str(share)]
    return [*head, "--params", params_path, *(x for o in overrides for x in ("--set", o))]


def start_workers(
    params_path: str, overrides: list[str], shares: list[int], env: dict[str, str], grace_s: float
) -> list[subprocess.Popen]:
    """Start shares 1… (share 0 runs in the caller) as worker processes, each in a process group of
    its own, so that :func:`stop_workers` stops them with everything they started."""
    procs: list[subprocess.Popen] = []
    try:
        for worker, share in enumerate(shares[1:], start=1):
            if share:
                cmd = worker_command(params_path, overrides, share)
                worker_env = dict(os.environ, **env, **{WORKER_ENV: str(worker)})
                procs.append(subprocess.Popen(cmd, env=worker_env, process_group=0))
    except BaseException:
        stop_workers(procs, grace_s)
        raise
    return procs


def stop_workers(procs: list[subprocess.Popen], grace_s: float) -> None:
    """SIGTERM each worker's process group (they end their trials and MLflow runs), then SIGKILL
    what is still running after ``grace_s``."""
    for proc in procs:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        with contextlib.suppress(ProcessLookupError):  # the leader is gone: nothing it started outlives it
            os.killpg(proc.pid, signal.SIGKILL)
