"""A throwaway PostgreSQL server on 127.0.0.1 (random port) for the distributed-sweep tests.

Uses the server binaries of Debian's ``postgresql`` package (``.ci/run`` installs it). As root the
server runs as the ``postgres`` user (PostgreSQL refuses root). A missing server fails the test,
naming the fix; it is never skipped silently.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

__all__ = ["postgres_server"]


def _bin(name: str) -> str:
    debian = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), reverse=True)
    found = shutil.which(name) or (str(debian[0]) if debian else None)
    if not found:
        pytest.fail(f"PostgreSQL's {name} not found: apt-get install -y postgresql (.ci/run does)")
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def postgres_server(database: str = "optuna") -> Iterator[str]:
    """Start a server in a temporary folder; yield ``postgresql://postgres@127.0.0.1:PORT/<database>``."""
    folder = Path(tempfile.mkdtemp(prefix="inpformer-pg-"))
    data, port = folder / "data", _free_port()
    as_user: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]

    def run(*cmd: str) -> None:
        done = subprocess.run([*as_user, *cmd], capture_output=True, text=True, timeout=120, check=False)
        if done.returncode:
            pytest.fail(f"{' '.join(cmd)} failed: {done.stderr[-2000:]}")

    run(_bin("initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8")
    options = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off"
    run(_bin("pg_ctl"), "-D", str(data), "-o", options, "-l", str(folder / "log"), "-w", "start")
    try:
        run(_bin("createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", database)
        yield f"postgresql://postgres@127.0.0.1:{port}/{database}"
    finally:
        subprocess.run([*as_user, _bin("pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True, timeout=60, check=False)  # fmt: skip
        shutil.rmtree(folder, ignore_errors=True)
