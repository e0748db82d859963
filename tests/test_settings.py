"""Each of the six settings completes through `dvc exp run` on the embedded data (tiny model, slow)."""

from __future__ import annotations

import json
import math
import shutil

import pytest
from test_pipeline import BIN, _cli, _run

pytestmark = pytest.mark.slow

# The README's table of settings runs exactly these -S sets (the demo adds nothing else).
SETTINGS = {
    "multi_class": [],
    "single_class": ["setting.kind=single_class"],
    "few_shot": ["setting.kind=few_shot", "setting.few_shot_k=2"],
    "semi_supervised": ["setting.kind=semi_supervised", "setting.semi_supervised_n=1"],
    "super_multi_class": ["setting.kind=super_multi_class", "data.extra_sources=[extra]"],
    "zero_shot": ["setting.kind=zero_shot", "setting.zero_shot_source=weights/source_model"],
}


@pytest.fixture(scope="module")
def project(e2e_project):
    """The shared baseline project (conftest.e2e_project), after test_pipeline used it: each setting runs
    on top of the baseline params (its categories are unchanged by what those tests added)."""
    proj, env, _ = e2e_project
    # super-multi-class unions a second prepared dataset; zero-shot scores with a model trained elsewhere
    _cli(["prepare", "--name", "extra", "--set", "data.synthetic.seed=5", "--set", "data.synthetic.categories=[grass]"],
         proj, env)  # fmt: skip
    shutil.copytree(proj / "artifacts" / "models" / "all", proj / "weights" / "source_model")
    return proj, env


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_setting_runs_as_a_dvc_experiment(project, setting: str) -> None:
    proj, env = project
    sets = [x for s in SETTINGS[setting] for x in ("-S", s)]
    _run(["git", "checkout", "--", "params.yaml"], proj, env)  # each setting on top of the baseline params
    _run([str(BIN / "dvc"), "exp", "run", "-n", setting.replace("_", "-"), *sets], proj, env)
    metrics = json.loads((proj / "metrics" / "metrics.json").read_text())
    cats = set(metrics["categories"])
    want = (
        {"extra/grass", "synthetic/brick", "synthetic/washer"}
        if setting == "super_multi_class"
        else {"brick", "washer"}
    )
    assert cats == want
    assert math.isfinite(metrics["mean"]["mad"]) and 0 <= metrics["mean"]["mad"] <= 1
    train = json.loads((proj / "metrics" / "train.json").read_text())
    assert train["setting"] == setting
    groups = train["groups"]
    if setting == "single_class":
        assert set(groups) == {"brick", "washer"}
    elif setting == "zero_shot":
        assert groups == {}  # nothing trained: the source model scores (INP distance)
        run = json.loads((proj / "artifacts" / "eval_run.json").read_text())
        assert {m["map"] for m in run["maps"].values()} == {"inp_distance"}
    elif setting == "few_shot":
        assert groups["all"]["images"] == 2 * 2 * 22  # k shots × categories × 22 augmentations
    else:
        assert set(groups) == {"all"}
