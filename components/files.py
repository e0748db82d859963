"""Writing files so that a crash never leaves a half-written one that the next stage trusts."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "CSV_FORMULA_PREFIXES",
    "DEFAULT_DIR_MODE",
    "DEFAULT_FILE_MODE",
    "DiskFullError",
    "LockedError",
    "atomic_write_bytes",
    "atomic_write_text",
    "csv_safe",
    "current_umask",
    "disk_full_as_error",
    "disk_full_message",
    "exclusive_lock",
    "file_digest",
    "is_disk_full",
]

DEFAULT_FILE_MODE = 0o666  # what open() creates, before the umask (mkstemp creates 0600)
DEFAULT_DIR_MODE = 0o777  # what mkdir() creates, before the umask (mkdtemp creates 0700)


HASH_BLOCK = 1 << 20  # bytes read per step while hashing a file


def file_digest(path: str | os.PathLike, algorithm: str = "sha256") -> str:
    """Hex digest of a file's bytes (read in blocks, never whole into memory)."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(HASH_BLOCK), b""):
            h.update(block)
    return h.hexdigest()


def current_umask() -> int:
    """The process umask (read without changing it for longer than the call)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file (UTF-8) atomically: see :func:`atomic_write_bytes`."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write a file atomically (temporary file in the same folder, fsync, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        Path(tmp).chmod(DEFAULT_FILE_MODE & ~current_umask())  # as a plain open() would (shared remotes)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# OWASP "CSV injection": a spreadsheet evaluates a cell that begins with one of these.
CSV_FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")
LOCK_POLL_S = 0.2  # how often a waiting writer retries a held lock


def csv_safe(value: Any) -> Any:
    """``value`` for a CSV cell: a string that a spreadsheet would run as a formula gets a leading
    ``'`` (OWASP's rule); numbers and other strings are unchanged."""
    if isinstance(value, str) and value.startswith(CSV_FORMULA_PREFIXES):
        return "'" + value
    return value


class LockedError(RuntimeError):
    """Another process holds a lock this one needs; the message names the holder and the fix."""


class DiskFullError(OSError):
    """No space left while writing; the message names the path and the free space."""


def disk_full_message(path: str | os.PathLike, err: BaseException | None = None) -> str:
    """One line for a full disk (or quota) while writing ``path``: the path, the free space, the fix."""
    where = Path(path).absolute()
    probe = next((p for p in [where, *where.parents] if p.exists()), Path())
    free = shutil.disk_usage(probe).free
    why = getattr(err, "strerror", None) or os.strerror(errno.ENOSPC)
    return (
        f"no space left writing {path} ({free / 2**20:.1f} MiB free on its file system; {why}). "
        "Free some space (old experiments: `dvc gc`, `dvc exp remove`) and run the command again; "
        "finished outputs are kept."
    )


# How libraries that wrap the OS error in their own type (safetensors' Rust I/O) spell a full disk.
DISK_FULL_TEXT = ("No space left on device", "StorageFull", "Disk quota exceeded", "code: 28")


def is_disk_full(err: BaseException) -> bool:
    """Whether ``err`` is the OS (or a library wrapping it) saying the disk or the quota is full."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return any(text in str(err) for text in DISK_FULL_TEXT)


@contextlib.contextmanager
def disk_full_as_error(path: str | os.PathLike) -> Iterator[None]:
    """Turn a full disk while writing ``path`` (in the block) into :class:`DiskFullError`, one line
    naming the path and the free space; other errors pass unchanged."""
    try:
        yield
    except DiskFullError:
        raise
    except Exception as err:
        if is_disk_full(err):
            where = getattr(err, "filename", None) or path  # the file being written, when the OS says
            raise DiskFullError(errno.ENOSPC, disk_full_message(where, err)) from err
        raise


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return "another process"
    pid, host, command, since = (info.get(k, "?") for k in ("pid", "host", "command", "since"))
    return f"pid {pid} on {host} ({command}, since {since})"


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike, what: str, wait_s: float = 0.0) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``path`` (``flock``: released by the OS when the process dies,
    so a killed holder never blocks the next run) while the block runs.

    The lock file names its holder (pid, host, command, start time). A second writer waits up to
    ``wait_s`` seconds, then raises :class:`LockedError` naming the holder and ``what`` is locked.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, DEFAULT_FILE_MODE & ~current_umask())
    try:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    msg = (
                        f"{what} is in use by {_holder(path)}: wait for it to finish (or stop it), "
                        f"then run the command again. Lock file: {path}."
                    )
                    raise LockedError(msg) from None
                time.sleep(LOCK_POLL_S)
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": " ".join(Path(a).name if i == 0 else a for i, a in enumerate(sys.argv))[:200],
            "since": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
