"""The reproducibility journey on a fresh copy of the repository (issue 21): `dvc repro`, then
`inpformer reproduce models:/inpformer@champion` rebuilds it bit for bit from its record, and two
`dvc exp run --temp` in a row as the README shows each carry only their own change."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import TINY_PIPELINE, copy_repository

BIN = Path(sys.executable).parent


def _env() -> dict[str, str]:
    return dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", HF_HUB_OFFLINE="1")


def _sh(cmd: list[str], work: Path, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, cwd=work, env=_env(), capture_output=True, text=True, timeout=900)
    if check:
        assert out.returncode == 0, f"{cmd}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


def _workspace(tmp_path: Path) -> Path:
    """A committed copy of the repository with the tiny demo params (one category, 12 images, 1 epoch)."""
    from pipelines.config.overrides import apply_overrides

    work = copy_repository(tmp_path / "repo")
    over = [*TINY_PIPELINE, "data.synthetic.n_train=12", "train.epochs=1"]
    tree = apply_overrides(yaml.safe_load((work / "params.yaml").read_text()), over)
    (work / "params.yaml").write_text(yaml.safe_dump(tree, sort_keys=False))
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    _sh(["git", "add", "-A"], work)
    _sh([*git, "commit", "-qm", "baseline"], work)
    return work


@pytest.mark.slow
def test_reproduce_the_champion_and_experiments_that_do_not_stack(tmp_path) -> None:
    work = _workspace(tmp_path)
    _sh([str(BIN / "dvc"), "repro"], work)
    recorded = json.loads((work / "metrics" / "metrics.json").read_text())
    lock = (work / "dvc.lock").read_bytes()

    out = _sh([str(BIN / "inpformer"), "reproduce", "models:/inpformer@champion"], work, check=False)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "bit-identical" in out.stdout and "mad" in out.stdout  # same machine, kernels, threads
    assert (work / "dvc.lock").read_bytes() == lock  # the workspace is untouched
    assert json.loads((work / "metrics" / "metrics.json").read_text()) == recorded
    worktrees = _sh(["git", "worktree", "list"], work).stdout.strip().splitlines()
    assert len(worktrees) == 1  # the scratch tree is gone

    for name, change in (("b2", "eval.blur_sigma=2.0"), ("b3", "eval.top_ratio=0.02")):
        _sh([str(BIN / "dvc"), "exp", "run", "--temp", "-n", name, "-S", change], work)
    show = json.loads(_sh([str(BIN / "dvc"), "exp", "show", "--json"], work).stdout)
    params = {
        rev["name"]: rev["data"]["params"]["params.yaml"]["data"]["eval"]
        for entry in show
        for exp in entry.get("experiments") or []
        for rev in exp.get("revs") or []
    }
    base = yaml.safe_load((work / "params.yaml").read_text())["eval"]
    assert params["b3"]["top_ratio"] == 0.02 and params["b3"]["blur_sigma"] == base["blur_sigma"]  # not stacked
    assert params["b2"]["blur_sigma"] == 2.0 and params["b2"]["top_ratio"] == base["top_ratio"]
    assert yaml.safe_load((work / "params.yaml").read_text())["eval"] == base  # the workspace keeps its baseline
