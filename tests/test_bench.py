"""bench/gpu_check.sh runs end to end in its --dry-run mode (tiny model, CPU)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_gpu_check_dry_run_prints_its_table() -> None:
    env = {**os.environ, "PYTHON": sys.executable}
    done = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_check.sh"), "--dry-run"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    for variant in ("fp32", "bf16", "bf16+sdpa", "bf16+sdpa+compile"):
        row = next(x for x in lines if x.split() and x.split()[0] == variant)
        assert len(row.split()) == 5, row  # train ms, peak GiB, ms/img, map diff: measured, not an error
    for variant in ("fp32 eager", "fp32 torchscript", "bf16 eager", "bf16 torchscript"):  # the export rows
        row = next(x for x in lines if x.startswith(variant + " "))
        assert len(row.split()) == 4, row  # ms and score difference: measured, not an error
    assert float(next(x for x in lines if x.startswith("fp32 torchscript ")).split()[3]) < 1e-5
    assert "DDP smoke test: passed (gloo, 2 CPU processes" in done.stdout
