"""Champion promotion: the rule, and log_and_register_model driven against a fake MLflow client."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import pytest

from components.model import InpFormerConfig
from components.scoring.decision import CategoryThresholds
from components.scoring.inference import ScoringConfig
from components.scoring.package import ModelPackage, read_package, write_package
from pipelines.config import load_params
from pipelines.tracking import runs as tracking
from pipelines.tracking.registry import champion_alias, log_and_register_model, should_promote
from pipelines.tracking.runs import tracked_run

ROOT = Path(__file__).resolve().parents[1]
SCOPE = {"dataset": "synthetic", "setting": "multi_class", "group": "all"}


@pytest.mark.parametrize(
    ("champion", "mad", "promote"),
    [
        (None, 0.5, True),  # first version
        (None, math.nan, False),  # first version, but no metric
        ({**SCOPE, "mad": "0.600000"}, 0.5, False),  # worse
        ({**SCOPE, "mad": "0.600000"}, 0.6, False),  # equal is not better
        ({**SCOPE, "mad": "0.600000"}, 0.7, True),  # better
        ({**SCOPE, "mad": "0.600000"}, math.nan, False),  # NaN never wins
        ({**SCOPE, "mad": "0.600000"}, math.inf, False),
        ({**SCOPE, "mad": "nan"}, 0.1, True),  # a NaN champion is replaced by any finite one
        ({**SCOPE, "dataset": "other", "mad": "0.1"}, 0.9, False),  # other dataset: keep it
        ({**SCOPE, "setting": "few_shot", "mad": "0.1"}, 0.9, False),  # other setting: keep it
        ({"dataset": "synthetic", "setting": "multi_class", "mad": "0.1"}, 0.9, True),  # no group tag = all
    ],
)
def test_should_promote(champion, mad, promote) -> None:
    assert should_promote(champion, SCOPE, mad) is promote


@pytest.fixture
def registry(tmp_path, monkeypatch):
    """A temporary MLflow store (SQLite) in ``tmp_path`` and a model folder to register."""
    monkeypatch.chdir(tmp_path)
    model_dir = tmp_path / "models" / "all"
    model_dir.mkdir(parents=True)
    (model_dir / "model.safetensors").write_bytes(b"weights")
    write_package(model_dir, PACKAGE)
    return model_dir


PACKAGE = ModelPackage(InpFormerConfig(), resize=448, categories=("brick",))


def _register(model_dir: Path, mad: float, *overrides: str) -> dict:
    p = load_params(ROOT / "params.yaml", list(overrides))
    calibrated = PACKAGE.calibrate(ScoringConfig(map_kind="fused"), {"brick": CategoryThresholds(0.5, 0.4, "f1")})
    with tracked_run(p, "evaluate", "evaluate") as mlflow:
        return log_and_register_model(mlflow, p, model_dir, calibrated, mad, "all")


def _aliases() -> dict[str, str]:
    from mlflow import MlflowClient

    return {k: str(v) for k, v in MlflowClient().get_registered_model("inpformer").aliases.items()}


@pytest.mark.slow  # six registrations in a real MLflow store
def test_registry_journey(registry) -> None:
    """First version without a metric, first real one, worse, another dataset, better, NaN."""
    scoped = "champion-synthetic-multi_class"
    assert _register(registry, math.nan)["champion"] is False
    assert _aliases() == {"candidate": "1"}
    first = _register(registry, 0.5)
    assert first["champion"] and first["default_champion"] and first["alias"] == scoped
    assert _register(registry, 0.4)["champion"] is False  # worse
    assert _aliases() == {"candidate": "3", "champion": "2", scoped: "2"}
    other = _register(registry, 0.9, "data.name=other")  # better, but another dataset: its own champion
    assert other["champion"] and not other["default_champion"]
    assert _aliases()["champion-other-multi_class"] == "4" and _aliases()["champion"] == "2"
    assert _register(registry, 0.6)["champion"] is True
    assert _register(registry, math.nan)["champion"] is False  # NaN never wins
    assert _aliases() == {
        "candidate": "6",
        "champion": "5",
        scoped: "5",
        "champion-other-multi_class": "4",
    }
    assert read_package(registry) == PACKAGE  # the workspace's model folder is left alone


def test_registered_model_has_no_host_paths_and_pinned_requirements(registry, tmp_path) -> None:
    import mlflow

    out = _register(registry, 0.5)
    local = Path(mlflow.artifacts.download_artifacts(out["model_uri"], dst_path=str(tmp_path / "dl")))
    for f in local.rglob("*"):
        if f.is_file() and f.suffix in ("", ".yaml", ".txt", ".json"):
            text = f.read_text(errors="ignore")
            assert str(tmp_path) not in text and str(ROOT) not in text, f  # no absolute host path
    requirements = (local / "requirements.txt").read_text().split()
    for pkg in ("torch", "timm", "safetensors", "numpy", "pillow"):
        assert any(r.startswith(f"{pkg}==") for r in requirements), (pkg, requirements)
    registered = read_package(local / "artifacts" / "all")
    assert registered.scoring == ScoringConfig(map_kind="fused")
    assert registered.thresholds["brick"].image_threshold == 0.5
    assert registered.provenance.weights_sha256 == hashlib.sha256(b"weights").hexdigest()  # bound to the bytes
    assert registered.provenance.libraries["torch"] and registered.provenance.git_commit  # "unknown" outside git


def test_tracking_disabled_registers_nothing(registry) -> None:
    assert _register(registry, 0.5, "tracking.enabled=false") == {}
    assert not (Path("mlruns")).exists()


def test_safe_metric_name() -> None:
    assert tracking.safe_metric_name("visa/pcb1 (x)") == "visa/pcb1 _x_"


def test_champion_alias_is_a_valid_mlflow_alias() -> None:
    assert champion_alias({"dataset": "mvtec", "setting": "single_class", "group": "metal nut.v2"}) == (
        "champion-mvtec-single_class-metal_nut_v2"
    )
    assert champion_alias({"dataset": "d.1", "setting": "few_shot", "group": "all"}) == "champion-d_1-few_shot"
