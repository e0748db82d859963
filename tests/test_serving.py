"""The registered pyfunc: base64 files and pixel arrays in, per-category decisions out; served over HTTP."""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import bare_package, tiny_model
from PIL import Image

from components.engine.checkpoint import save_model
from components.scoring.decision import CategoryThresholds
from components.scoring.inference import ScoringConfig
from components.scoring.package import read_package

ROOT = Path(__file__).resolve().parents[1]
SERVE_DEADLINE_S = 180  # mlflow models serve: import + model load on a slow CI machine


def _png64(img: Image.Image) -> str:
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


@pytest.fixture(scope="module")
def pyfunc_dir(tmp_path_factory) -> Path:
    """A pyfunc model folder, saved as the registry saves it, of a tiny model of categories a and b."""
    import mlflow

    from pipelines.tracking.registry import _save_pyfunc

    tmp = tmp_path_factory.mktemp("pyfunc")
    torch.manual_seed(0)
    model = tiny_model(image_size=56)
    folder = save_model(tmp / "models" / "all", model, bare_package(model, 64, ("a", "b")))
    thresholds = {
        "a": CategoryThresholds(image_threshold=-1e9, pixel_threshold=0.5, rule="f1"),
        "b": CategoryThresholds(image_threshold=1e9, pixel_threshold=0.5, rule="f1"),
    }
    package = read_package(folder).calibrate(ScoringConfig(map_kind="fused", resize=64), thresholds)
    _save_pyfunc(mlflow, folder, package, tmp / "pyfunc", 64)
    return tmp / "pyfunc"


def _images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (70, 90, 3), dtype=np.uint8)) for _ in range(2)]


def test_pyfunc_decides_per_category_from_files_and_pixels(pyfunc_dir) -> None:
    import mlflow

    model = mlflow.pyfunc.load_model(str(pyfunc_dir))
    assert model.metadata.signature is not None and (pyfunc_dir / "input_example.json").is_file()
    a, b = _images()
    rows = pd.DataFrame(
        [
            {"image": _png64(a), "category": "a"},
            {"image": _png64(a), "category": "b"},  # same image, other category: other decision
        ]
    )
    out = model.predict(rows, params={"maps": "png"})
    assert list(out["decision"]) == ["anomalous", "normal"]  # a: threshold -1e9, b: 1e9
    assert list(out["threshold"]) == [-1e9, 1e9]
    assert out["score"][0] == pytest.approx(out["score"][1])
    pixels = model.predict(pd.DataFrame([{"pixels": np.asarray(a).astype(np.int64).tolist(), "category": "a"}]))
    assert pixels["score"][0] == pytest.approx(out["score"][0], rel=1e-6)  # lossless PNG: the same image
    small = Image.open(io.BytesIO(base64.b64decode(out["map_png"][0])))
    assert small.size == (64, 50) and np.asarray(small).dtype == np.uint16  # 90×70 frame, longer side 64
    assert float(small.text["scale"]) == pytest.approx(out["map_scale"][0])
    assert len(json.dumps(out.to_dict("records"))) < 20_000  # compact: not a JSON float grid
    # the same image as uint8 / int64 arrays (Python callers, past the signature), category from the param
    for dtype in (np.uint8, np.int64, np.int32):
        arr = np.stack([np.asarray(a)] * 2).astype(dtype)
        got = model.unwrap_python_model().predict(None, arr, params={"category": "a"})
        assert got["score"][0] == pytest.approx(out["score"][0], rel=1e-6)
    with pytest.raises(Exception, match="not the model's"):
        model.predict(pd.DataFrame([{"image": _png64(a), "category": "zzz"}]))
    with pytest.raises(Exception, match="base64"):
        model.predict(pd.DataFrame([{"image": "bm90IGFuIGltYWdl", "category": "a"}]))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(port: int, body: dict) -> bytes:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/invocations",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        return response.read()


@pytest.mark.slow
def test_mlflow_models_serve_takes_images(pyfunc_dir, tmp_path) -> None:
    """`mlflow models serve --env-manager local` on 127.0.0.1; POST base64 PNGs and pixel arrays."""
    port = _free_port()
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "PYTHONUNBUFFERED": "1",
        "PATH": f"{mlflow_bin.parent}{os.pathsep}{os.environ.get('PATH', '')}",  # its uvicorn
    }
    cmd = [str(mlflow_bin), "models", "serve", "-m", str(pyfunc_dir), "--env-manager", "local"]
    proc = subprocess.Popen(
        [*cmd, "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    ready = threading.Event()
    log: list[str] = []

    def watch() -> None:
        for line in proc.stdout:
            log.append(line)
            # printed once the socket listens (uvicorn; gunicorn on older MLflow): connections queue
            # from then on. "Application startup complete" can come before the bind: not a signal.
            if "Uvicorn running on" in line or "Listening at" in line:
                ready.set()
        ready.set()  # the server exited: stop waiting

    threading.Thread(target=watch, daemon=True).start()
    try:
        started = ready.wait(SERVE_DEADLINE_S) and proc.poll() is None
        assert started, "server did not start:\n" + "".join(log[-30:])
        a, b = _images()
        records = [{"image": _png64(a), "category": "a"}, {"image": _png64(b), "category": "b"}]
        raw = _post(port, {"dataframe_records": records, "params": {"maps": "png"}})
        preds = json.loads(raw)["predictions"]
        assert [p["decision"] for p in preds] == ["anomalous", "normal"]
        assert [p["category"] for p in preds] == ["a", "b"]
        assert Image.open(io.BytesIO(base64.b64decode(preds[0]["map_png"]))).size == (64, 50)
        assert len(raw) < 20_000  # 2 images with maps
        pixels = [{"pixels": np.asarray(a).tolist(), "category": "a"}]  # JSON integers: int64
        again = json.loads(_post(port, {"dataframe_records": pixels}))["predictions"]
        assert again[0]["score"] == pytest.approx(preds[0]["score"], rel=1e-6)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
