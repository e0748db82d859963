"""The one command line of a sweep worker process (local workers and Prefect work-pool workers)."""

from __future__ import annotations

import sys

__all__ = ["worker_command"]


def worker_command(params_path: str, overrides: list[str], share: int) -> list[str]:
    """The command line of one worker process running ``share`` trials of the study."""
    head = [sys.executable, "-m", "pipelines.cli", "sweep", "--no-progress", "--n-trials", str(share)]
    return [*head, "--params", params_path, *(x for o in overrides for x in ("--set", o))]
