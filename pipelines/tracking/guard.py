"""Tracking that never stops the work: guarded MLflow calls, and closing runs left by killed processes.

* :func:`tracking_failed` — a tracking error warns once and the stage goes on (training keeps its
  checkpoints and model); ``tracking.required: true`` makes it fatal instead.
* :class:`Guarded` — the ``mlflow`` module with every call guarded that way.
* :func:`close_stale_runs` — every run records its host and pid; a RUNNING run whose process is gone
  (kill -9, power cut) is marked KILLED by the next run that starts on that host.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sqlite3
from pathlib import Path
from typing import Any

from pipelines.config import Params

logger = logging.getLogger(__name__)

__all__ = [
    "HOST_TAG",
    "PID_TAG",
    "TRACKING_ROOT_ENV",
    "Guarded",
    "NullRun",
    "TrackingUnavailable",
    "check_available",
    "check_sqlite",
    "close_stale_runs",
    "owner_tags",
    "reset_unavailable",
    "sqlite_path",
    "tracking_failed",
    "tracking_root",
    "tracking_uri",
]

HOST_TAG = "inpformer.host"  # the machine and process that hold a run open
PID_TAG = "inpformer.pid"
STALE_SEARCH_LIMIT = 1000  # RUNNING runs examined per check


class NullRun:
    """Stand-in when tracking is disabled or failed: every call is a no-op."""

    info = type("Info", (), {"run_id": ""})()

    def __getattr__(self, name: str):
        return lambda *a, **k: None


class TrackingUnavailable(RuntimeError):
    """The tracking store cannot be used (checked before MLflow's own minutes of retries)."""


_UNAVAILABLE: dict[str, str] = {}  # tracking store → why it failed, for the rest of this process
TRACKING_ROOT_ENV = "INPFORMER_TRACKING_ROOT"  # relative tracking paths resolve here (temporary exp copies)
SQLITE_PREFIX = "sqlite:///"


DVC_TEMP_EXPS = (".dvc", "tmp", "exps")  # where `dvc exp run --temp` / queued experiments run


def tracking_root() -> Path:
    """Where relative tracking paths resolve: ``INPFORMER_TRACKING_ROOT``; else, inside a DVC temporary
    experiment copy (``<workspace>/.dvc/tmp/exps/...``), the workspace, so its runs are not deleted
    with the copy; else the current folder."""
    if os.environ.get(TRACKING_ROOT_ENV):
        return Path(os.environ[TRACKING_ROOT_ENV])
    parts = Path.cwd().parts
    n = len(DVC_TEMP_EXPS)
    for i in range(len(parts) - n, 0, -1):
        if parts[i : i + n] == DVC_TEMP_EXPS:
            return Path(*parts[:i])
    return Path()


def sqlite_path(p: Params) -> Path | None:
    """The SQLite database file of ``tracking.uri`` (relative paths from the tracking root), or None."""
    if not p.tracking.uri.startswith(SQLITE_PREFIX):
        return None
    return tracking_root() / p.tracking.uri[len(SQLITE_PREFIX) :]


def tracking_uri(p: Params) -> str:
    """``tracking.uri`` with a SQLite path made absolute (MLflow caches stores by URI string: a
    relative one would keep pointing at the folder it was first used from)."""
    db = sqlite_path(p)
    return f"{SQLITE_PREFIX}{db.resolve()}" if db is not None else p.tracking.uri


def _store(p: Params) -> str:
    db = sqlite_path(p)
    return str(db.resolve()) if db is not None else p.tracking.uri


def check_available(p: Params) -> None:
    """Raise :class:`TrackingUnavailable` at once when this process already found the store unusable."""
    if _store(p) in _UNAVAILABLE:
        msg = f"{p.tracking.uri} is unavailable ({_UNAVAILABLE[_store(p)]})"
        raise TrackingUnavailable(msg)


def reset_unavailable() -> None:
    """Try the tracking store again on the next call (a new command in this process)."""
    _UNAVAILABLE.clear()


def tracking_failed(p: Params, what: str, err: BaseException) -> None:
    """A tracking error: raised when ``tracking.required``; else one warning, and tracking is off for
    the rest of this process (no further attempts, no repeated waits): the work goes on."""
    if p.tracking.required:
        raise err
    reason = f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
    if _store(p) in _UNAVAILABLE:
        logger.info("MLflow tracking still off (%s) while %s.", _UNAVAILABLE[_store(p)], what)
        return
    _UNAVAILABLE[_store(p)] = reason
    logger.warning(
        "MLflow tracking failed while %s (%s); continuing without tracking for the rest of this command. "
        "Check tracking.uri (%s), or set tracking.required: true to stop on tracking errors.",
        what,
        reason,
        p.tracking.uri,
    )


def check_sqlite(db: Path, timeout_s: float) -> None:
    """Fail fast (within ``timeout_s``) when a SQLite tracking database cannot be used: not a file,
    not a database, or locked. MLflow itself retries for about 100 s per attempt."""
    if db.exists() and not db.is_file():
        msg = f"{db} is not a file (a SQLite database is expected there)"
        raise TrackingUnavailable(msg)
    try:
        with contextlib.closing(sqlite3.connect(db, timeout=timeout_s)) as con:
            con.execute("PRAGMA schema_version").fetchone()
            con.execute("BEGIN IMMEDIATE")  # a write lock: fails when another process holds the database
            con.rollback()
    except sqlite3.Error as err:
        msg = f"{db}: {err}"
        raise TrackingUnavailable(msg) from err


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
