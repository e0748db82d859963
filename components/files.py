"""Writing files so that a crash never leaves a half-written one that the next stage trusts."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

__all__ = ["DEFAULT_DIR_MODE", "DEFAULT_FILE_MODE", "atomic_write_text", "current_umask", "file_digest"]

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
    """Write a text file atomically (temporary file in the same folder, fsync, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        Path(tmp).chmod(DEFAULT_FILE_MODE & ~current_umask())  # as a plain open() would (shared remotes)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
