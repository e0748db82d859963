"""Trust (issue 19): a registered version describes its own weights, and no input, request or signal
makes the pipeline silently wrong, lose outputs or leak. One test (or group) per numbered point of
the issue, each a reproduction of what it reported."""

from __future__ import annotations

import csv
import errno
import io
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_PIPELINE, copy_repository, model_workspace, tiny_model
from PIL import Image

from components.engine.checkpoint import DIGEST_FILE, MODEL_FILES, CheckpointError, load_model, save_model, write_digest
from components.files import file_digest
from components.scoring.package import ModelPackage, PackageError, read_package
from pipelines.config import load_params

ROOT = Path(__file__).resolve().parents[1]
TINY = [*TINY_PIPELINE, "data.synthetic.n_train=8", "train.epochs=1", "data.synthetic.categories=[brick, grass]"]


def _cli(*args: str) -> int:
    from pipelines.cli import main

    return main(list(args))


def _sets(extra: list[str] = ()) -> list[str]:
    return [x for o in [*TINY, *extra] for x in ("--set", o)]


def _image(path: Path, size=(64, 48), seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny trained (not evaluated) workspace: categories brick and grass, an MLflow store."""
    root = tmp_path_factory.mktemp("trained")
    shutil.copy(ROOT / "params.yaml", root / "params.yaml")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        for command in ("prepare", "synthesize", "train"):
            assert _cli(command, "--no-progress", *_sets()) == 0, command
    finally:
        os.chdir(cwd)
    return root


@pytest.fixture
def workspace(trained, tmp_path, monkeypatch):
    """A private copy of the trained workspace, as the current directory."""
    root = tmp_path / "ws"
    shutil.copytree(trained, root)
    monkeypatch.chdir(root)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return root


def _client():
    from mlflow import MlflowClient

    from pipelines.tracking.guard import tracking_uri

    return MlflowClient(tracking_uri=tracking_uri(load_params("params.yaml")))


def _versions() -> list:
    try:
        return _client().search_model_versions("name='inpformer'")
    except Exception:  # no registered model yet
        return []


# -- 1. the record is bound to the weights --------------------------------------------------------------


@pytest.mark.slow  # the evaluate tests share one tiny trained workspace (~20 s with MLflow)
def test_evaluate_refuses_a_model_of_another_dataset(workspace, capsys) -> None:
    """After a failed `train --set data.name=mydata`, evaluate scored the previous model and made it
    champion of mydata. Now: an error naming both scopes, and nothing registered."""
    other = ["data.name=mydata", "data.synthetic.categories=[gravel]"]
    assert _cli("prepare", "--no-progress", *_sets(other)) == 0
    assert _cli("train", "--no-progress", *_sets([*other, "train.batch_size=100000"])) == 1  # fails: batch > data
    capsys.readouterr()
    assert _cli("evaluate", "--no-progress", *_sets(other)) == 1
    err = capsys.readouterr().err
    assert "not trained for this evaluation" in err and "'synthetic'" in err and "'mydata'" in err
    assert "gravel" in err
    assert _versions() == []


@pytest.mark.slow
def test_registered_version_holds_the_scored_weights_even_if_the_folder_changes(workspace, monkeypatch) -> None:
    """`train --no-resume --set seed=7` while evaluate runs registered the NEW weights with the OLD
    metrics. Now evaluate scores and registers one snapshot: every version's weights digest is the
    digest its metrics and thresholds were computed on."""
    from pipelines.stages import evaluation

    scored = file_digest(workspace / "artifacts/models/all/model.safetensors")
    real = evaluation._evaluate_category

    def replace_the_folder_midway(*args, **kwargs):  # a writer that ignores the workspace lock
        out = real(*args, **kwargs)
        import torch

        from components.model import InpFormer

        _, package = load_model(workspace / "artifacts/models/all")
        torch.manual_seed(7)  # `train --no-resume --set seed=7`: the same architecture, other weights
        save_model(workspace / "artifacts/models/all", InpFormer(package.model), package)
        return out

    monkeypatch.setattr(evaluation, "_evaluate_category", replace_the_folder_midway)
    assert _cli("evaluate", "--no-progress", *_sets()) == 0
    now = file_digest(workspace / "artifacts/models/all/model.safetensors")
    assert now != scored
    metrics = json.loads((workspace / "metrics/metrics.json").read_text())
    thresholds = json.loads((workspace / "artifacts/eval/thresholds.json").read_text())
    package = read_package(workspace / "artifacts/eval/packages/all")
    assert metrics["weights"]["all"] == scored
    assert {t["weights_sha256"] for t in thresholds.values()} == {scored}
    assert package.provenance.weights_sha256 == scored
    versions = _versions()
    assert len(versions) == 1 and versions[0].tags["weights_sha256"] == scored


@pytest.mark.slow
def test_a_second_writer_of_the_workspace_fails_naming_the_holder(workspace, capsys) -> None:
    from components.files import exclusive_lock
    from pipelines.paths import WORKSPACE_LOCK

    with exclusive_lock(WORKSPACE_LOCK, "the workspace"):
        assert _cli("train", "--no-progress", "--no-resume", *_sets(["seed=7"])) == 1
        assert _cli("evaluate", "--no-progress", *_sets()) == 1
    err = capsys.readouterr().err
    assert err.count(f"is in use by pid {os.getpid()}") == 2 and "Lock file: artifacts/.lock" in err


def test_predict_refuses_thresholds_of_other_weights(tmp_path, monkeypatch, capsys) -> None:
    """`train` then `predict` (no evaluate) decided with the previous weights' thresholds."""
    monkeypatch.chdir(tmp_path)
    model_workspace(tmp_path, ["a"], {"a": {"image_threshold": 0.5, "pixel_threshold": 0.5}})
    import torch

    _, package = load_model(tmp_path / "artifacts/models/all")
    torch.manual_seed(1)
    save_model(tmp_path / "artifacts/models/all", tiny_model(image_size=56), package)  # trained again
    _image(tmp_path / "new/a/x.png")
    assert _cli("predict", "new", "--out", "out", "--set", "train.device=cpu") == 1
    err = capsys.readouterr().err
    assert "calibrated for other weights" in err and "inpformer evaluate" in err
    assert not (tmp_path / "out/predictions.csv").exists()
    assert _cli("predict", "new", "--out", "out", "--set", "limits.allow_stale_thresholds=true") == 0  # loudly


def test_the_mlflow_model_refuses_a_package_of_other_weights(tmp_path, monkeypatch) -> None:
    from dataclasses import replace
    from types import SimpleNamespace

    from components.scoring.package import write_package
    from pipelines.serve.pyfunc import InpFormerPyfunc

    monkeypatch.chdir(tmp_path)
    model_workspace(tmp_path, ["a"], {"a": {"image_threshold": 0.5, "pixel_threshold": 0.5}})
    registered = tmp_path / "registered"
    shutil.copytree(tmp_path / "artifacts/models/all", registered)
    calibrated = read_package(tmp_path / "artifacts/eval/packages/all")
    other = replace(calibrated, provenance=replace(calibrated.provenance, weights_sha256="0" * 64))
    write_package(registered, other)
    write_digest(registered, MODEL_FILES)
    with pytest.raises(ValueError, match="do not describe its weights"):
        InpFormerPyfunc().load_context(SimpleNamespace(artifacts={"model": str(registered)}))
    write_package(registered, calibrated)
    write_digest(registered, MODEL_FILES)
    InpFormerPyfunc().load_context(SimpleNamespace(artifacts={"model": str(registered)}))  # its own: loads


@pytest.mark.slow
def test_a_category_without_test_images_is_an_error_unless_allowed(workspace, capsys) -> None:
    manifest = workspace / "data/prepared/synthetic/manifest.csv"
    rows = list(csv.DictReader(manifest.open()))
    kept = [r for r in rows if not (r["category"] == "grass" and r["split"] == "test")]
    with manifest.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(kept)
    assert _cli("evaluate", "--no-progress", *_sets()) == 1
    assert "['grass'] of data.name=synthetic have no test images" in capsys.readouterr().err
    assert _cli("evaluate", "--no-progress", *_sets(["eval.allow_untested=true"])) == 0
    metrics = json.loads((workspace / "metrics/metrics.json").read_text())
    assert metrics["untested"] == ["grass"] and list(metrics["categories"]) == ["brick"]
    (version,) = _versions()
    assert set(_client().get_registered_model("inpformer").aliases) == {"candidate"}  # registered, never promoted
    assert version.tags["weights_sha256"] == metrics["weights"]["all"]


# -- 2. CSV formula injection ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "cell"),
    [("=cmd|' -C calc'!A0", "'=cmd|' -C calc'!A0"), ("+1", "'+1"), ("-x", "'-x"), ("@SUM(A1)", "'@SUM(A1)"),
     ("\tx", "'\tx"), ("\rx", "'\rx"), ("plain", "plain"), ("a=b", "a=b")],
)  # fmt: skip
def test_csv_cells_are_neutralised(value, cell) -> None:
    from components.files import csv_safe

    assert csv_safe(value) == cell
    assert csv_safe(-0.5) == -0.5  # numbers stay numbers


def test_predictions_csv_neutralises_file_names_and_categories(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    model_workspace(tmp_path, ["=evil"], {"=evil": {"image_threshold": 0.5, "pixel_threshold": 0.5}})
    _image(tmp_path / "new" / "=evil" / "=cmd|' -C calc'!A0.png")
    assert _cli("predict", "new", "--out", "out") == 0
    (row,) = list(csv.DictReader((tmp_path / "out/predictions.csv").open()))
    for key in ("path", "category", "overlay"):
        assert not row[key].startswith(("=", "+", "-", "@")), row[key]
    assert row["category"] == "'=evil"
    (record,) = [json.loads(x) for x in (tmp_path / "out/predictions.jsonl").read_text().splitlines()]
    assert record["category"] == "=evil"  # JSON keeps the true value


# -- 3. the web inspector --------------------------------------------------------------------------------


@pytest.fixture
def client(tmp_path, monkeypatch):
    from fastapi.testclient import TestClient

    from pipelines.serve.app import create_app

    monkeypatch.chdir(tmp_path)
    model_workspace(tmp_path, ["a"], {"a": {"image_threshold": 0.5, "pixel_threshold": 0.5}})
    p = load_params("params.yaml", ["serve.max_upload_mb=0.01", "serve.max_concurrent=1", "serve.device=cpu"])
    return TestClient(create_app(p, ["artifacts/models/all"]), base_url="http://127.0.0.1:7860")


def _png() -> str:
    import base64

    buffer = io.BytesIO()
    Image.new("RGB", (20, 20), (90, 90, 90)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_inspector_answers_only_its_own_host(client) -> None:
    assert client.get("/api/models").status_code == 200
    assert client.get("/api/models", headers={"host": "localhost:7860"}).status_code == 200
    rebound = client.get("/api/models", headers={"host": "attacker.example:7860"})
    assert rebound.status_code == 421 and "artifacts" not in rebound.text


def test_inspector_refuses_cross_site_posts(client) -> None:
    body = {"model": "artifacts/models/all", "category": "a", "image": _png()}
    assert client.post("/api/score", json=body, headers={"origin": "http://attacker.example"}).status_code == 403
    assert client.post("/api/score", json=body, headers={"origin": "null"}).status_code == 403
    assert client.post("/api/score", json=body, headers={"origin": "http://127.0.0.1:7860"}).status_code == 200


def test_inspector_bounds_the_body_and_never_echoes_it(client) -> None:
    big = b'{"model": "' + b"x" * 200_000 + b'"}'
    declared = client.post("/api/score", content=big, headers={"content-type": "application/json"})
    assert declared.status_code == 413 and len(declared.content) < 500

    def chunks():  # no Content-Length: the limit holds while reading
        yield big[:100_000]
        yield big[100_000:]

    streamed = client.post("/api/score", content=chunks(), headers={"content-type": "application/json"})
    assert streamed.status_code == 413 and len(streamed.content) < 500
    invalid = client.post("/api/score", json={"model": "y" * 5000, "image": 7})
    assert invalid.status_code == 422 and "yyyy" not in invalid.text and len(invalid.content) < 500


def test_inspector_bounds_concurrent_scoring(client, monkeypatch) -> None:
    from pipelines.serve import app as app_module

    entered, release = threading.Event(), threading.Event()
    real = app_module.score_pil

    def slow(*args, **kwargs):
        entered.set()
        release.wait(timeout=60)
        return real(*args, **kwargs)

    monkeypatch.setattr(app_module, "score_pil", slow)
    body = {"model": "artifacts/models/all", "category": "a", "image": _png()}
    first: dict = {}
    worker = threading.Thread(target=lambda: first.update(r=client.post("/api/score", json=body)))
    worker.start()
    assert entered.wait(timeout=60)
    busy = client.post("/api/score", json=body)
    release.set()
    worker.join(timeout=60)
    assert busy.status_code == 503 and first["r"].status_code == 200


# -- 4. hostile or malformed model files ---------------------------------------------------------------


def _edit_package(folder: Path, edit) -> None:
    data = json.loads((folder / "package.json").read_text())
    edit(data)
    (folder / "package.json").write_text(json.dumps(data))
    write_digest(folder, MODEL_FILES)  # a hostile file comes with a matching digest


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.update(normalize="false"), "'normalize' must be true or false"),
        (lambda d: d.update(resize=8008) or d["model"].update(image_size=8008), "'resize' is 8008, outside [14, 2048]"),
        (lambda d: d["model"].update(decoder_depth="8"), "'model.decoder_depth' must be an integer"),
        (lambda d: d["model"].update(num_prototypes=10**9), "'num_prototypes' of 'model' is 1000000000"),
        (lambda d: d.update(categories="ab"), "'categories' must be a list of a string"),
        (lambda d: d.update(thresholds={"a": ["x"]}), "'thresholds.a' must be a JSON object"),
        (lambda d: d.update(provenance={"weights_sha256": 5}), "'provenance.weights_sha256' must be a string"),
        (lambda d: d.update(schema=True), "package schema True"),
    ],
)
def test_hostile_package_fields_are_one_line_errors(tmp_path, edit, message) -> None:
    model = tiny_model(image_size=56)
    folder = save_model(tmp_path / "m", model, ModelPackage(model.config, 64, ("a",)))
    _edit_package(folder, edit)
    with pytest.raises(PackageError, match=r".*") as info:
        load_model(folder)
    assert message in str(info.value) and str(folder / "package.json") in str(info.value)


def test_a_crop_that_contradicts_the_weights_is_refused(tmp_path) -> None:
    model = tiny_model(image_size=56)
    folder = save_model(tmp_path / "m", model, ModelPackage(model.config, 128, ("a",)))
    _edit_package(folder, lambda d: d["model"].update(image_size=112))
    with pytest.raises(CheckpointError, match="trained at input side 56, but .* says 112"):
        load_model(folder)


def test_a_safetensors_shape_that_contradicts_its_offsets_is_refused(tmp_path) -> None:
    model = tiny_model(image_size=56)
    folder = save_model(tmp_path / "m", model, ModelPackage(model.config, 64, ("a",)))
    weights = folder / "model.safetensors"
    raw = weights.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    name = next(k for k in header if k != "__metadata__" and len(header[k]["shape"]) == 2)
    header[name]["shape"] = [1] * len(header[name]["shape"])
    text = json.dumps(header, separators=(",", ":")).encode().ljust(n)  # same length: only the shape lies
    assert len(text) == n
    weights.write_bytes(raw[:8] + text + raw[8 + n :])
    write_digest(folder, MODEL_FILES)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model(folder)


def test_onnx_external_data_outside_its_folder_is_refused(tmp_path) -> None:
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    from components.scoring.export import Scorer

    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.arange(4, dtype=np.float32).tobytes())
    tensor = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[4])
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", "../secret.bin"), ("offset", "0"), ("length", "16")):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    graph = helper.make_graph([helper.make_node("Identity", ["w"], ["out"])], "g", [], [], initializer=[tensor])
    graph.output.append(helper.make_tensor_value_info("out", TensorProto.FLOAT, [4]))
    model = helper.make_model(graph)
    model.metadata_props.add(key="inpformer", value="{}")
    (tmp_path / "m").mkdir()
    onnx.save(model, str(tmp_path / "m" / "model.onnx"))
    with pytest.raises(ValueError, match="outside the model's folder"):
        Scorer(tmp_path / "m" / "model.onnx")
    (tmp_path / "m" / "junk.onnx").write_bytes(b"\x0a\xff\xff\xff\xff\x0f")  # a field longer than the file
    with pytest.raises(ValueError, match="not a readable ONNX file"):
        Scorer(tmp_path / "m" / "junk.onnx")


# -- 5. outputs never collide, never mix runs ---------------------------------------------------------


@pytest.fixture
def predict_ws(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model_workspace(tmp_path, ["a"], {"a": {"image_threshold": 0.5, "pixel_threshold": 0.5}})
    return tmp_path


def test_same_stem_and_same_name_in_two_folders_get_their_own_overlays(predict_ws) -> None:
    _image(predict_ws / "new/a/x.png", seed=1)
    Image.open(_image(predict_ws / "tmp.png", seed=2)).save(predict_ws / "new/a/x.jpg")
    _image(predict_ws / "two/a/x.png", seed=3)
    assert _cli("predict", "new", "two", "--out", "out", "--save-maps") == 0
    rows = list(csv.DictReader((predict_ws / "out/predictions.csv").open()))
    overlays = {r["overlay"] for r in rows}
    assert len(rows) == 3 and len(overlays) == 3 and all(Path(o).is_file() for o in overlays)
    assert sorted(Path(o).name for o in overlays) == ["x.jpg.png", "x.png.png", "x.png.png"]
    assert len(list((predict_ws / "out/maps").rglob("*.npy"))) == 3


def test_a_second_predict_into_the_same_out_fails_naming_the_holder(predict_ws, capsys) -> None:
    from components.files import exclusive_lock

    _image(predict_ws / "new/a/x.png")
    (predict_ws / "out").mkdir()
    with exclusive_lock(predict_ws / "out/.lock", "out"):
        assert _cli("predict", "new", "--out", "out") == 1
    assert f"in use by pid {os.getpid()}" in capsys.readouterr().err
    assert _cli("predict", "new", "--out", "out") == 0


def test_a_full_disk_during_predict_leaves_the_earlier_out_intact(predict_ws, monkeypatch, capsys) -> None:
    for i in range(3):
        _image(predict_ws / f"new/a/{i}.png", seed=i)
    assert _cli("predict", "new", "--out", "out") == 0
    before = {p.relative_to(predict_ws / "out"): p.read_bytes() for p in (predict_ws / "out").rglob("*") if p.is_file()}
    for i in range(3, 6):
        _image(predict_ws / f"more/a/{i}.png", seed=i)
    from pipelines.serve import predict

    real, calls = predict.overlay_for, []

    def disk_fills(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(predict, "overlay_for", disk_fills)
    assert _cli("predict", "more", "--out", "out") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no space left writing out" in err[0] and "MiB free" in err[0]
    after = {p.relative_to(predict_ws / "out"): p.read_bytes() for p in (predict_ws / "out").rglob("*") if p.is_file()}
    assert after == before  # nothing of the failed run, nothing of the earlier run lost


# -- 6. EXIF orientation ---------------------------------------------------------------------------------


def _rotated_jpeg(path: Path) -> Path:
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :10] = 255  # a white band on the left as stored
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = 6  # display rotated 90° clockwise
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, "JPEG", exif=exif, quality=95)
    return path


def test_exif_orientation_is_applied_to_images_not_masks(tmp_path) -> None:
    from components.data.io import decode_rgb, read_mask, read_rgb

    jpeg = _rotated_jpeg(tmp_path / "phone.jpg")
    shown = read_rgb(jpeg)
    assert shown.size == (20, 40)  # width and height swapped, as a viewer shows it
    top = np.asarray(shown)[:8].mean()
    assert top > 200  # the band is now at the top
    assert decode_rgb(jpeg.read_bytes()).size == (20, 40)
    assert read_mask(jpeg).size == (40, 20)  # masks as stored


def test_predict_scores_and_draws_a_phone_jpeg_upright(predict_ws) -> None:
    _rotated_jpeg(predict_ws / "new/a/phone.jpg")
    assert _cli("predict", "new", "--out", "out") == 0
    (row,) = list(csv.DictReader((predict_ws / "out/predictions.csv").open()))
    assert Image.open(row["overlay"]).size == (20, 40)


# -- 7. SIGTERM ------------------------------------------------------------------------------------------


def test_sigterm_is_handled_like_ctrl_c(tmp_path, monkeypatch, capsys) -> None:
    """What Prefect, systemd and Kubernetes send: the MLflow run ends KILLED at once, exit 143."""
    from pipelines import stages
    from pipelines.tracking.runs import active_run_id, tracked_run

    monkeypatch.chdir(tmp_path)
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    seen = {}

    def train(p, progress, resume):
        with tracked_run(p, "train", "train-all") as mlflow:
            seen["run"] = active_run_id(mlflow)
            os.kill(os.getpid(), signal.SIGTERM)
            raise AssertionError("SIGTERM did not stop the stage")

    monkeypatch.setattr(stages, "train", train)
    previous = signal.getsignal(signal.SIGTERM)
    try:
        assert _cli("train") == 143
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert "terminated (SIGTERM); rerun `inpformer train` to resume" in capsys.readouterr().err
    assert seen["run"] and _client().get_run(seen["run"]).info.status == "KILLED"


@pytest.mark.slow
def test_sigterm_during_evaluate_ends_its_runs_and_leaves_no_temporary_folder(workspace, monkeypatch, capsys) -> None:
    import tempfile

    from pipelines.tracking import registry

    scratch = workspace / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    real = registry._save_pyfunc

    def terminated_while_registering(*args, **kwargs):
        real(*args, **kwargs)
        assert list(scratch.glob("inpformer-model-*"))  # the registered copy is being written
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(registry, "_save_pyfunc", terminated_while_registering)
    previous = signal.getsignal(signal.SIGTERM)
    try:
        assert _cli("evaluate", "--no-progress", *_sets()) == 143
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert "terminated (SIGTERM)" in capsys.readouterr().err
    assert list(scratch.iterdir()) == []  # no inpformer-model-*, no inpformer-log-*
    assert not (workspace / "artifacts/.eval-models.partial").exists()
    client = _client()
    runs = client.search_runs([client.get_experiment_by_name("inpformer").experiment_id])
    assert runs and all(r.info.status != "RUNNING" for r in runs)
    assert any(r.info.status == "KILLED" and r.data.tags.get("stage") == "evaluate" for r in runs)
    assert _versions() == []


def _gone_within(pid: int, seconds: float) -> bool:
    """Whether ``pid`` is dead (or a zombie) within ``seconds``: a signalled process exits asynchronously."""
    import time

    deadline = time.monotonic() + seconds
    while _alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in state


def test_stopping_sweep_workers_stops_what_they_started(tmp_path) -> None:
    from pipelines.sweep.command import stop_workers

    script = "import subprocess, sys; c = subprocess.Popen(['sleep', '600']); print(c.pid, flush=True); c.wait()"
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, process_group=0)
    child = int(proc.stdout.readline())
    assert _alive(child)
    stop_workers([proc], grace_s=30)
    assert proc.returncode is not None and _gone_within(child, 10)


# -- 8. params validated before DVC removes outputs -------------------------------------------------------


def test_every_stage_waits_for_the_params_check() -> None:
    import yaml

    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert list(stages)[0] == "check" and "params.yaml" in stages["check"]["deps"]
    assert [o if isinstance(o, str) else next(iter(o)) for o in stages["check"]["outs"]] == ["artifacts/params.checked"]
    for name, stage in stages.items():
        if name != "check":
            assert "artifacts/params.checked" in stage["deps"], name


@pytest.mark.slow
def test_dvc_repro_with_bad_params_keeps_the_outputs(tmp_path) -> None:
    """`dvc exp run -S train.epochs=[1,2]` failed only after DVC had deleted the models."""
    copy_repository(tmp_path)
    text = (tmp_path / "params.yaml").read_text().replace("\n  epochs: 8", "\n  epochs: [1, 2]", 1)
    assert "[1, 2]" in text
    (tmp_path / "params.yaml").write_text(text)
    kept = [tmp_path / "artifacts/models/all/model.safetensors", tmp_path / "data/prepared/synthetic/manifest.csv"]
    for f in kept:
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text("an earlier run's output")
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    dvc = Path(sys.executable).parent / "dvc"
    out = subprocess.run([str(dvc), "repro"], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode != 0 and "train.epochs" in out.stdout + out.stderr
    assert all(f.read_text() == "an earlier run's output" for f in kept)


# -- 9. disk full and oversized work ---------------------------------------------------------------------


def test_a_full_disk_while_saving_a_model_is_one_line_and_leaves_nothing(tmp_path, monkeypatch) -> None:
    from components.engine import checkpoint
    from components.files import DiskFullError

    model = tiny_model(image_size=56)
    package = ModelPackage(model.config, 64, ("a",))
    old = save_model(tmp_path / "models" / "all", model, package)
    before = {f: (old / f).read_bytes() for f in (*MODEL_FILES, DIGEST_FILE)}

    def full(*args, **kwargs):
        Path(args[1]).write_bytes(b"half")
        raise RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })")  # safetensors

    monkeypatch.setattr(checkpoint, "save_file", full)
    with pytest.raises(DiskFullError, match=r"no space left writing .*models/all \(.* MiB free"):
        save_model(tmp_path / "models" / "all", model, package)
    assert {f: (old / f).read_bytes() for f in before} == before
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["all"]  # no temporary folder left


def test_a_full_disk_during_export_leaves_no_partial_file(tmp_path, monkeypatch) -> None:
    import torch

    from components.files import DiskFullError
    from components.scoring import export
    from components.scoring.inference import ScoringConfig

    def full(module, path, **kwargs):
        Path(path).write_bytes(b"")  # what the exporter had begun
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch.jit, "save", full)
    target = tmp_path / "model.pt"
    with pytest.raises(DiskFullError, match="model.pt"):
        export.export_model(tiny_model(image_size=56), ScoringConfig(), {}, target, torch.rand(1, 3, 56, 56))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_a_full_disk_during_evaluate_is_one_line_and_leaves_no_staging(workspace, monkeypatch, capsys) -> None:
    from pipelines.stages import evaluation

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", "artifacts/.eval.partial/metrics_per_category.csv")

    monkeypatch.setattr(evaluation, "_write_reports", full)
    assert _cli("evaluate", "--no-progress", *_sets()) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no space left writing artifacts/.eval.partial/metrics_per_category.csv" in err[0]
    assert not (workspace / "artifacts/.eval.partial").exists()
    assert not (workspace / "artifacts/.eval-models.partial").exists()
    assert not (workspace / "metrics/metrics.json").exists() and _versions() == []


def test_sizes_that_cannot_fit_are_refused_before_allocating() -> None:
    from pipelines.builders import MemoryEstimateError, check_memory

    p = load_params(ROOT / "params.yaml")
    big = tiny_model(image_size=4480)  # building the model allocates no activation
    with pytest.raises(MemoryEstimateError, match="data.crop_size and data.image_size .* train.batch_size"):
        check_memory(p, big, 16, "cpu", "train.batch_size", training=True)
    tokens = (4480 // 14) ** 2 + 5
    assert big.peak_memory_bytes(1) >= 2 * 4 * tokens * tokens  # at least one attention matrix per head
    check_memory(p, tiny_model(image_size=56), 16, "cpu", "train.batch_size", training=True)  # the demo fits


# -- 10. small ones ----------------------------------------------------------------------------------------


def test_predict_finds_the_category_anywhere_in_the_path(tmp_path, monkeypatch) -> None:
    """`predict data/raw/synthetic/brick/test` said "no category in its path"."""
    monkeypatch.chdir(tmp_path)
    thresholds = {
        "a": {"image_threshold": 0.5, "pixel_threshold": 0.5},
        "b": {"image_threshold": 0.5, "pixel_threshold": 0.5},
    }
    model_workspace(tmp_path, ["a", "b"], thresholds)
    _image(tmp_path / "data/raw/x/b/test/good/000.png")
    assert _cli("predict", "data/raw/x/b/test", "--out", "out") == 0
    (row,) = list(csv.DictReader((tmp_path / "out/predictions.csv").open()))
    assert row["category"] == "b"


def test_prefect_server_analytics_off_when_do_not_track() -> None:
    code = (
        "import pipelines, prefect.settings as s; "
        "print(s.get_current_settings().server.analytics_enabled, s.Settings().server.analytics_enabled)"
    )
    env = dict(os.environ, DO_NOT_TRACK="1", PREFECT_SERVER_ANALYTICS_ENABLED="true")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
