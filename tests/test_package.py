"""The model package: one JSON, one writer and one reader, bound to its weights, strict on bad input."""

from __future__ import annotations

import hashlib
import json
import math

import pytest
import torch
from conftest import bare_package, tiny_model
from safetensors.torch import save_file

from components.engine.checkpoint import CheckpointError, load_model, repackage, save_model
from components.model import InpFormerConfig
from components.scoring.decision import CategoryThresholds
from components.scoring.inference import ScoringConfig
from components.scoring.package import PACKAGE_FILE, ModelPackage, PackageError, read_package, write_package

CALIBRATED = ModelPackage(
    InpFormerConfig(image_size=392),
    resize=448,
    categories=("bottle", "cable"),
    dataset="mvtec",
    setting="multi_class",
    scoring=ScoringConfig(map_kind="fused"),
    thresholds={"bottle": CategoryThresholds(0.5, 0.4, "f1@test", 0.1, 0.9, 0.0, 1.0), "cable": CategoryThresholds()},
    threshold_split="test",
)


def test_json_round_trip_is_exact_and_stable(tmp_path) -> None:
    text = CALIBRATED.to_json()
    again = ModelPackage.from_json(text)
    assert again.model == CALIBRATED.model and again.thresholds["bottle"] == CALIBRATED.thresholds["bottle"]
    assert math.isnan(again.thresholds["cable"].image_threshold)  # NaN survives (Python's json writes NaN)
    assert again.to_json() == text  # equal packages are equal bytes
    assert again.crop == 392 and again.transform().resize == 448 and again.calibrated
    assert again.rule().image("bottle", 0.6)[2] == "anomalous" and again.rule().image("cable", 0.6)[2] == "unknown"
    data = json.loads(text)
    assert data["schema"] == 1 and "crop_size" not in data and "image_size" not in data  # each value once
    write_package(tmp_path, CALIBRATED)
    assert (tmp_path / PACKAGE_FILE).read_text() == text and read_package(tmp_path).to_json() == text


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"extra": 1}, r"unknown package keys \['extra'\]"),
        ({"normalize": "false"}, r"'normalize' must be true or false"),
        ({"resize": 448.5}, r"'resize' must be an integer"),
        ({"resize": True}, r"'resize' must be an integer"),
        ({"model": []}, r"'model' must be a JSON object"),
        ({"thresholds": {"bottle": 3}}, r"'thresholds.bottle' must be a JSON object"),
        ({"scoring": {"map_kind": "nope"}}, r"map_kind"),
        ({"schema": 2}, r"schema 2"),
        ({"resize": 100}, r"crop side 392 exceeds the resize side 100"),
    ],
)
def test_bad_package_json_is_one_error_naming_the_file_and_key(tmp_path, change, message) -> None:
    data = {**json.loads(CALIBRATED.to_json()), **change}
    (tmp_path / PACKAGE_FILE).write_text(json.dumps(data))
    with pytest.raises(PackageError, match=message) as err:
        read_package(tmp_path)
    assert str(tmp_path / PACKAGE_FILE) in str(err.value)


def test_model_folder_records_the_weights_digest_and_refuses_a_package_of_other_weights(tmp_path) -> None:
    model = tiny_model()
    folder = save_model(tmp_path / "m", model, bare_package(model, 64, ("a",)))
    _, package = load_model(folder)
    digest = hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    assert package.provenance.weights_sha256 == digest
    other = tiny_model(seg_head_channels=4)
    elsewhere = save_model(tmp_path / "other", other, bare_package(other, 64, ("a",)))
    with pytest.raises(CheckpointError, match="computed on other weights"):
        repackage(folder, read_package(elsewhere))
    repackage(folder, package.calibrate(ScoringConfig(), {"a": CategoryThresholds(1.0)}))
    _, again = load_model(folder)  # the digest file follows the new package
    assert again.thresholds["a"].image_threshold == 1.0


def test_folders_from_before_the_package_are_read(tmp_path) -> None:
    """config.json (+ scoring.json in a registered copy), as written by earlier versions."""
    torch.manual_seed(0)
    model = tiny_model()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "model.safetensors"))
    config = {"model": model.config.to_dict(), "image_size": 64, "crop_size": 56, "categories": ["a"], "group": "all"}
    (tmp_path / "config.json").write_text(json.dumps({**config, "encoder_pretrained": False}))
    scoring = {"scoring": {"map_kind": "fused", "resize": 64}, "thresholds": {"a": {"image_threshold": 0.3}}}
    (tmp_path / "scoring.json").write_text(json.dumps({**scoring, "image_size": 64, "crop_size": 56}))
    loaded, package = load_model(tmp_path)
    assert package.resize == 64 and package.crop == 56 and package.categories == ("a",)
    assert package.scoring == ScoringConfig(map_kind="fused", resize=64)
    assert package.thresholds["a"].image_threshold == 0.3
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
