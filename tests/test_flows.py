"""Prefect against its real API (test harness): scheduled reruns that notice new source images or do
nothing, and a deployment run with overrides that becomes a DVC experiment (slow)."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from test_pipeline import BIN, ROOT, TINY_OVERRIDES, _env, _merge, _run

from components.data.synthetic import generate_synthetic

pytestmark = pytest.mark.slow


def _folder_project(tmp: Path) -> tuple[Path, dict]:
    """A git + DVC project whose dataset is an MVTec-layout folder under sources/ (a `folder` dataset)."""
    proj = tmp / "proj"
    proj.mkdir()
    for item in ("components", "pipelines", "sources", "dvc.yaml", ".dvcignore", ".gitignore"):
        src = ROOT / item
        if src.is_dir():
            shutil.copytree(src, proj / item, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, proj / item)
    generate_synthetic(proj / "sources" / "parts", size=64, n_train=8, n_test_good=2, n_test_per_defect=1,
                       categories=["brick"])  # fmt: skip
    params = _merge(yaml.safe_load((ROOT / "params.yaml").read_text()), TINY_OVERRIDES)
    params["data"].update(dataset="folder", name="parts", source="sources/parts")
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = _env(tmp)
    for cmd in (["git", "init", "-q"], [str(BIN / "dvc"), "init", "-q"], ["git", "add", "-A"]):
        _run(cmd, proj, env)
    _run(["git", "commit", "-qm", "init"], proj, env)
    return proj, env


def _artifact(key: str):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    async def read():
        async with get_client() as client:
            found = await client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])), sort=ArtifactSort.CREATED_DESC
            )
            return found[0] if found else None

    return asyncio.run(read())


def _deployment_run(name: str, parameters: dict, cron: str | None = None):
    """Serve ``pipeline`` as deployment ``name`` (a Runner, as `inpformer serve` does), trigger one run
    of it like the UI or the schedule would, let the runner execute it, and return its final state."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.runner import Runner

    from pipelines import flows

    runner = Runner(name=f"runner-{name}")
    runner.add_flow(flows.pipeline, name=name, cron=cron, parameters={"root": parameters["root"]})
    flow_run = run_deployment(f"inpformer-pipeline/{name}", parameters=parameters, timeout=0)
    asyncio.run(runner.start(run_once=True))

    async def final_state():
        async with get_client() as client:
            return (await client.read_flow_run(flow_run.id)).state

    return asyncio.run(final_state())


def _train_images(proj: Path) -> int:
    return json.loads((proj / "metrics" / "train.json").read_text())["groups"]["all"]["images"]


def test_scheduled_reruns_and_a_deployment_run_with_overrides(tmp_path, monkeypatch) -> None:
    from prefect.testing.utilities import prefect_test_harness

    from pipelines import flows

    proj, env = _folder_project(tmp_path)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    nightly = {"root": str(proj)}
    with prefect_test_harness(server_startup_timeout=None):  # None: the 120 s setting in conftest, not 30 s
        first = flows.pipeline(root=str(proj), return_state=True)  # the first build
        assert first.is_completed() and first.name != flows.NO_CHANGE
        assert _train_images(proj) == 8
        _run(["git", "add", "-A"], proj, env)
        _run(["git", "commit", "-qm", "baseline"], proj, env)
        assert _artifact("inpformer-metrics") is not None

        idle = _deployment_run("nightly", nightly, cron="0 2 * * *")  # the scheduled deployment, nothing new
        assert idle.is_completed() and idle.name == flows.NO_CHANGE, idle  # nothing republished as a result
        assert "nothing ran" in _artifact("inpformer-no-change").data

        good = proj / "sources" / "parts" / "brick" / "train" / "good"
        rng = np.random.default_rng(1)
        for i in range(3):  # three new normal images arrive on the line
            Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8)).save(good / f"new_{i}.png")
        again = _deployment_run("nightly", nightly, cron="0 2 * * *")
        assert again.is_completed() and again.name != flows.NO_CHANGE, again
        assert _train_images(proj) == 11  # prepared and retrained with them
        _run(["git", "add", "-A"], proj, env)
        _run(["git", "commit", "-qm", "new images"], proj, env)

        params_before = (proj / "params.yaml").read_bytes()
        lock_before = (proj / "dvc.lock").read_bytes()
        params = {"overrides": ["loss.gamma=2.0"], "experiment_name": "ui-g2", "root": str(proj)}
        state = _deployment_run("manual", params)  # a run started from the UI with overrides
        assert state.is_completed(), state
        assert (proj / "params.yaml").read_bytes() == params_before  # the workspace is untouched
        assert (proj / "dvc.lock").read_bytes() == lock_before
        show = subprocess.run([str(BIN / "dvc"), "exp", "show", "--json"], cwd=proj, env=env, capture_output=True,
                              text=True, check=True)  # fmt: skip
        names = {r.get("name") for e in json.loads(show.stdout) for x in e.get("experiments") or [] for r in x["revs"]}
        assert "ui-g2" in names
        table = _artifact("inpformer-metrics")
        assert "ui-g2" in table.description and "mad" in table.data
        assert "/#/runs/" in table.description and "tracking disabled" not in table.description  # the exp's run
