"""What git says about the code a run was made from (recorded as run tags)."""

from __future__ import annotations

import os
import subprocess

__all__ = ["CODE_PATHS", "code_dirty", "git_commit"]


def git_commit(root: str | os.PathLike = ".") -> str:
    """The current commit (``unknown`` outside git)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10, check=False
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


CODE_PATHS = ("components", "pipelines", "dvc.yaml", "pyproject.toml")  # what a commit must hold to rebuild a run


def code_dirty(root: str | os.PathLike = ".") -> bool:
    """Whether the code differs from the commit (uncommitted changes to :data:`CODE_PATHS`; params
    are recorded whole, so their changes do not count). False outside git."""
    try:
        out = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", *CODE_PATHS],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        return out.returncode == 0 and bool(out.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return False
