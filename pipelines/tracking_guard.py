"""Tracking that never stops the work: guarded MLflow calls, and closing runs left by killed processes.

* :func:`tracking_failed` — a tracking error warns once and the stage goes on (training keeps its
  checkpoints and model); ``tracking.required: true`` makes it fatal instead.
* :class:`Guarded` — the ``mlflow`` module with every call guarded that way.
* :func:`close_stale_runs` — every run records its host and pid; a RUNNING run whose process is gone
  (kill -9, power cut) is marked KILLED by the next run that starts on that host.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

from pipelines.config import Params

logger = logging.getLogger(__name__)

__all__ = ["HOST_TAG", "PID_TAG", "Guarded", "NullRun", "close_stale_runs", "owner_tags", "tracking_failed"]

HOST_TAG = "inpformer.host"  # the machine and process that hold a run open
PID_TAG = "inpformer.pid"
STALE_SEARCH_LIMIT = 1000  # RUNNING runs examined per check


class NullRun:
    """Stand-in when tracking is disabled or failed: every call is a no-op."""

    info = type("Info", (), {"run_id": ""})()

    def __getattr__(self, name: str):
        return lambda *a, **k: None


def tracking_failed(p: Params, what: str, err: BaseException) -> None:
    """A tracking error: raised when ``tracking.required``, else one warning (the work goes on)."""
    if p.tracking.required:
        raise err
    logger.warning(
        "MLflow tracking failed while %s (%s: %s); continuing without it for this step. "
        "Check tracking.uri (%s), or set tracking.required: true to stop on tracking errors.",
        what,
        type(err).__name__,
        str(err).splitlines()[0][:200] if str(err) else "",
        p.tracking.uri,
    )


class Guarded:
    """The ``mlflow`` module with every call guarded: the first failure warns (:func:`tracking_failed`)
    and turns later calls into no-ops, so training never stops because tracking did."""

    def __init__(self, mlflow: Any, p: Params) -> None:
        self._mlflow, self._p, self.failed = mlflow, p, False

    def __getattr__(self, name: str):
        target = getattr(self._mlflow, name)
        if not callable(target):
            return target

        def call(*args: Any, **kwargs: Any) -> Any:
            if self.failed:
                return None
            try:
                return target(*args, **kwargs)
            except Exception as err:
                self.failed = True
                tracking_failed(self._p, f"calling mlflow.{name}", err)
                return None

        return call


def owner_tags() -> dict[str, str]:
    """Which process holds a run open (lets a later run close it when that process is gone)."""
    return {HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid())}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def close_stale_runs(mlflow: Any, experiment: str) -> list[str]:
    """Mark KILLED every RUNNING run of ``experiment`` whose process (same host) is gone: what a
    kill -9 or a power cut leaves behind. Runs of other hosts are left alone."""
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name(experiment)
    runs = client.search_runs(
        [experiment.experiment_id], filter_string="attributes.status = 'RUNNING'", max_results=STALE_SEARCH_LIMIT
    )
    closed = []
    for run in runs:
        tags = run.data.tags
        pid = tags.get(PID_TAG, "")
        if tags.get(HOST_TAG) != socket.gethostname() or not pid.isdigit() or int(pid) == os.getpid():
            continue
        if not _alive(int(pid)):
            client.set_tag(run.info.run_id, "closed_by", f"pid {os.getpid()}: its process {pid} is gone")
            client.set_terminated(run.info.run_id, "KILLED")
            closed.append(run.info.run_id)
    if closed:
        logger.warning("Closed %d MLflow run(s) left RUNNING by a killed process: %s", len(closed), closed)
    return closed
