"""Scheduled scoring: a flow run scores exactly the new images of a watched folder, once per model version."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import model_workspace
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # a Prefect test server


def _add_images(folder: Path, names: list[str], seed: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name in names:
        Image.fromarray(rng.integers(0, 255, (60, 60, 3), dtype=np.uint8)).save(folder / name)


def test_scoring_flow_scores_each_new_image_once(tmp_path, monkeypatch) -> None:
    from prefect.testing.utilities import prefect_test_harness
    from test_flows import _artifact

    from pipelines.serve.scoring import FLAGGED_KEY, LEDGER_FILE, scoring_flow

    monkeypatch.chdir(tmp_path)
    model_workspace(tmp_path, ["a"], {"a": {"image_threshold": -1e9, "pixel_threshold": 0.5}})  # all flagged
    watch = tmp_path / "inbox"
    watch.mkdir()
    args = {"watch": str(watch), "out": "scored", "model": "artifacts/models/all", "root": str(tmp_path),
            "overrides": ["train.device=cpu"]}  # fmt: skip
    with prefect_test_harness(server_startup_timeout=None):  # None: the 120 s setting in conftest, not 30 s
        assert scoring_flow(**args)["scored"] == 0  # an empty folder is not an error
        _add_images(watch, ["1.png", "2.png", "3.png"], seed=0)
        first = scoring_flow(**args)
        assert first["scored"] == 3 and first["flagged"] == 3
        assert scoring_flow(**args)["scored"] == 0  # nothing new
        shutil.copy(watch / "1.png", watch / "1-copy.png")  # the same content under a new name
        _add_images(watch / "line2", ["4.png"], seed=1)
        third = scoring_flow(**args)
        assert third["scored"] == 1
        table = _artifact(FLAGGED_KEY)
        assert "4.png" in table.data and "overlay" in table.data and "file://" in table.data
    rows = list(csv.DictReader((tmp_path / "scored" / "predictions.csv").open()))
    assert sorted(Path(r["path"]).name for r in rows) == ["1.png", "2.png", "3.png", "4.png"]
    assert all(Path(r["overlay"]).is_file() for r in rows)
    ledger = (tmp_path / "scored" / LEDGER_FILE).read_text().splitlines()
    assert len(ledger) == 4 and len({json.loads(x)["version"] for x in ledger}) == 1
