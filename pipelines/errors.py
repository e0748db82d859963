"""Errors the command line reports as the user's to fix (one line, exit code 1), not as bugs."""

from __future__ import annotations

__all__ = ["CommandFailed"]


class CommandFailed(RuntimeError):
    """An external command (``dvc``, ``git``) the pipeline ran exited with an error."""
