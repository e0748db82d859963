"""Champion promotion: the rule, and log_and_register_model driven against a fake MLflow client."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest

from pipelines import tracking
from pipelines.config import load_params
from pipelines.tracking import MODEL_PACKAGE_FILE, log_and_register_model, should_promote

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


class FakeClient:
    """Versions with tags and aliases, as the MLflow registry keeps them."""

    def __init__(self) -> None:
        self.tags: dict[str, dict[str, str]] = {}
        self.aliases: dict[str, str] = {}

    def set_model_version_tag(self, name, version, key, value):
        self.tags.setdefault(version, {})[key] = value

    def set_registered_model_alias(self, name, alias, version):
        self.aliases[alias] = version

    def get_model_version_by_alias(self, name, alias):
        if alias not in self.aliases:
            raise LookupError(f"no alias {alias}")  # MLflow raises its own exception type
        return SimpleNamespace(tags=self.tags[self.aliases[alias]])


@pytest.fixture
def registry(tmp_path, monkeypatch):
    client = FakeClient()
    logged: list[dict] = []

    def log_model(name, python_model, artifacts, pip_requirements, code_paths):
        folder = Path(artifacts["model"])
        logged.append(json.loads((folder / MODEL_PACKAGE_FILE).read_text()))
        assert (folder / "model.safetensors").is_file()
        return SimpleNamespace(model_uri=f"runs:/r/model-{len(logged)}")

    def register_model(uri, name):
        return SimpleNamespace(version=str(len(logged)))

    fake = SimpleNamespace(pyfunc=SimpleNamespace(log_model=log_model), register_model=register_model)
    import mlflow

    monkeypatch.setattr(mlflow, "MlflowClient", lambda: client)
    model_dir = tmp_path / "models" / "all"
    model_dir.mkdir(parents=True)
    (model_dir / "model.safetensors").write_bytes(b"weights")
    (model_dir / "config.json").write_text("{}")
    return client, fake, model_dir, logged


def _register(registry, mad: float, *overrides: str) -> dict:
    client, fake, model_dir, _ = registry
    p = load_params(ROOT / "params.yaml", list(overrides))
    return log_and_register_model(fake, p, model_dir, {"scoring": {"map_kind": "fused"}}, mad, "all")


def test_registry_journey(registry) -> None:
    client, _, model_dir, logged = registry
    assert _register(registry, math.nan)["champion"] is False  # first version without a metric
    assert "champion" not in client.aliases and client.aliases["candidate"] == "1"
    assert _register(registry, 0.5)["champion"] is True  # first real metric
    assert _register(registry, 0.4)["champion"] is False  # worse
    assert client.aliases == {"candidate": "3", "champion": "2"}
    out = _register(registry, 0.9, "data.name=other")  # better, but for another dataset
    assert out["champion"] is False and client.aliases["champion"] == "2"
    assert _register(registry, 0.6)["champion"] is True and client.aliases["champion"] == "5"
    assert client.tags["5"] == {**SCOPE, "mad": "0.600000"}
    assert logged[0] == {"scoring": {"map_kind": "fused"}}  # the package travels inside the model folder
    assert not (model_dir / MODEL_PACKAGE_FILE).exists()  # the workspace's model folder is left alone


def test_tracking_disabled_registers_nothing(registry) -> None:
    assert _register(registry, 0.5, "tracking.enabled=false") == {}
    assert registry[0].aliases == {}


def test_safe_metric_name() -> None:
    assert tracking.safe_metric_name("visa/pcb1 (x)") == "visa/pcb1 _x_"
