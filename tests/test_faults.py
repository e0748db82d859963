"""Faults, one section per point of the reliability issue: each test damages, kills or feeds bad input
and checks that nothing is lost and nothing is silently wrong.

1 names that become paths · 2 registry and empty splits · 3 damaged checkpoints · 4 damaged feature
caches · 5 killed sweep workers · 6 MLflow after crashes · 7 bad inputs, archives, SIGINT, params ·
8 the registered model and file permissions.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_PIPELINE, bare_package, tiny_model
from PIL import Image

from pipelines.config import ConfigError, load_params

ROOT = Path(__file__).resolve().parents[1]
TINY = [*TINY_PIPELINE, "data.synthetic.n_train=8", "train.epochs=2"]


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """An empty workspace with the demo params."""
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path


def _cli(*args: str) -> int:
    from pipelines.cli import main

    return main(list(args))


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


# 1. Names that become paths -------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["../x", "../../../x", "/tmp/x", "a/b", ".."])
def test_path_names_rejected_before_any_change(workspace, bad) -> None:
    before = _tree(workspace.parent)
    assert _cli("synthesize", "--set", f"data.name={bad}") == 2
    assert _cli("prepare", "--name", bad) != 0
    assert _tree(workspace.parent) == before


def test_links_out_of_the_workspace_are_never_deleted_through(workspace, tmp_path_factory) -> None:
    from pipelines.paths import confined, remove_tree, synth_dir

    outside = tmp_path_factory.mktemp("outside")
    (outside / "keep.txt").write_text("precious")
    (workspace / "data" / "synth").mkdir(parents=True)
    (workspace / "data" / "synth" / "demo").symlink_to(outside, target_is_directory=True)
    with pytest.raises(ValueError, match="outside data/"):
        synth_dir("demo")
    with pytest.raises(ValueError):
        remove_tree(Path("data/synth/demo"))
    with pytest.raises(ValueError, match="inside the workspace"):
        confined(outside)
    assert (outside / "keep.txt").read_text() == "precious"


# 2. Registry and empty splits -----------------------------------------------------------------


def test_nan_metric_never_becomes_champion() -> None:
    from pipelines.tracking.registry import should_promote

    scope = {"dataset": "d", "setting": "multi_class", "group": "all"}
    assert not should_promote(None, scope, float("nan"))
    assert should_promote({**scope, "mad": "nan"}, scope, 0.1)  # a NaN champion is replaced


def test_a_test_split_without_anomalies_is_refused(workspace) -> None:
    from components.data.datasets import Record
    from pipelines.stages.evaluation import check_test_split

    p = load_params("params.yaml")
    good = [Record("a.png", "c", "test", 0), Record("b.png", "c", "train", 0)]
    with pytest.raises(ValueError, match="no anomalous image"):
        check_test_split(p, [r for r in good if r.split == "test"])
    with pytest.raises(ValueError, match="is empty"):
        check_test_split(p, [])


# 3. Damaged checkpoints -----------------------------------------------------------------------


def _toy_data(n: int = 8, size: int = 56) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [{"image": torch.randn(3, size, size, generator=g), "label": 0} for _ in range(n)]


class _Toy(torch.utils.data.Dataset):
    def __init__(self) -> None:
        self.items = _toy_data()

    def set_epoch(self, epoch: int) -> None:
        pass

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


def _train(folder: Path, stop_after: int | None = None) -> torch.nn.Module:
    from components.engine.losses import DiceLoss, NormalPatternLoss
    from components.engine.training import CheckpointSpec, TrainConfig, seed_everything, train

    seed_everything(1)
    model = tiny_model(seg_head=None)
    cfg = TrainConfig(epochs=3, batch_size=4, warmup_iters=2, progress=False, checkpoint_every=1, residual_mode="off")

    def on_it(m: dict) -> None:
        if stop_after is not None and m["iteration"] == stop_after:
            raise KeyboardInterrupt("simulated kill")

    try:
        train(
            model,
            _Toy(),
            cfg,
            NormalPatternLoss(),
            DiceLoss(),
            CheckpointSpec(folder, None),
            on_iteration=on_it,
        )
    except KeyboardInterrupt:
        pass
    return model


@pytest.mark.parametrize("victim", ["model.safetensors", "train_state.safetensors", "train_state.json", "package.json"])
def test_damaged_latest_checkpoint_falls_back_and_ends_identical(tmp_path, victim, caplog) -> None:
    reference = _train(tmp_path / "ref")
    _train(tmp_path / "run", stop_after=4)
    latest = tmp_path / "run" / (tmp_path / "run" / "LATEST").read_text().strip()
    data = (latest / victim).read_bytes()
    (latest / victim).write_bytes(data[: len(data) // 2])  # truncated
    with caplog.at_level(logging.WARNING):
        resumed = _train(tmp_path / "run")
    assert any(victim in r.getMessage() and "damaged" in r.getMessage() for r in caplog.records)
    for (name, a), (_, b) in zip(reference.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name


def test_damaged_model_folder_names_the_file(tmp_path) -> None:
    from components.engine.checkpoint import load_model, save_model

    model = tiny_model(seg_head=None)
    save_model(tmp_path / "m", model, bare_package(model))
    weights = tmp_path / "m" / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-10:] = b"\0" * 10  # same size, different bytes
    weights.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"model\.safetensors.*SHA-256"):
        load_model(tmp_path / "m")


# 4. Damaged feature caches --------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["truncate", "zero", "random"])
def test_damaged_feature_cache_is_rebuilt_identically(tmp_path, damage, caplog) -> None:
    from components.engine import feature_cache
    from components.engine.feature_cache import FeatureCache

    images = _toy_data(6)
    paths = []
    for i, item in enumerate(images):
        path = tmp_path / f"{i}.png"
        Image.fromarray((item["image"].permute(1, 2, 0).clamp(-1, 1).numpy() * 100 + 128).astype(np.uint8)).save(path)
        paths.append(str(path))

    def load(path: str) -> torch.Tensor:
        return torch.from_numpy(np.asarray(Image.open(path), dtype=np.float32) / 255.0).permute(2, 0, 1)

    torch.manual_seed(0)
    model = tiny_model(image_size=56)
    first = FeatureCache(tmp_path / "cache", model, paths, load, "k")
    reference = np.array(first.array)
    file = first.dir / "features.npy"
    del first
    raw = bytearray(file.read_bytes())
    body = slice(len(raw) - 4096, len(raw))  # past the .npy header
    if damage == "truncate":
        raw = raw[: len(raw) - 4096]
    elif damage == "zero":
        raw[body] = bytes(4096)
    else:
        raw[body] = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    file.write_bytes(bytes(raw))
    feature_cache.reset_verified()  # a new run
    with caplog.at_level(logging.WARNING):
        again = FeatureCache(tmp_path / "cache", model, paths, load, "k")
    assert again.built and any("rebuilding" in r.getMessage() for r in caplog.records)
    np.testing.assert_array_equal(np.array(again.array), reference)


def test_damaged_image_cache_entry_is_recomputed(tmp_path) -> None:
    from components.data.cache import ImageCache

    src = tmp_path / "a.png"
    Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(src)
    cache = ImageCache(tmp_path / "c")
    value = torch.full((3, 8, 8), 0.5)
    cache.get(src, None, lambda: value)
    (entry,) = (tmp_path / "c").rglob("*.npy")
    raw = bytearray(entry.read_bytes())
    raw[-40:-20] = bytes(20)  # zeroed pixels, same size
    entry.write_bytes(bytes(raw))
    out = cache.get(src, None, lambda: value)
    assert cache.misses == 2 and torch.allclose(out, value, atol=1 / 255)


# 5. Killed sweep workers (slow) ---------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("heartbeat", ["default", "short", "postgresql"])  # short: Optuna's heartbeat may fail it first
def test_killed_sweep_worker_trials_are_failed_and_rerun(workspace, monkeypatch, heartbeat) -> None:
    with contextlib.ExitStack() as stack:
        storage = []
        if heartbeat == "postgresql":  # the same recovery on a real PostgreSQL server
            from postgres_server import postgres_server

            storage = [f"sweep.storage={stack.enter_context(postgres_server())}"]
        _killed_worker_run(monkeypatch, heartbeat, storage)


KILLER = """
import os
if os.environ.get({env!r}) == {worker!r}:  # this worker process dies (SIGKILL) in its first trial
    import signal

    import pipelines.sweep.objective as objective

    def build_objective(*args, **kwargs):
        def killed(trial):
            os.kill(os.getpid(), signal.SIGKILL)  # a stand-in for kill -9 / OOM mid-trial

        return killed

    objective.build_objective = build_objective
"""


def _kill_worker_in_first_trial(monkeypatch, worker: str, env: str) -> None:
    """Worker ``worker``'s process kills itself in its first trial (a ``sitecustomize`` on its path)."""
    hook = Path.cwd() / "kill-hook"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(KILLER.format(env=env, worker=worker))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH", "")])))


def _killed_worker_run(monkeypatch, heartbeat: str, storage: list[str]) -> None:
    import mlflow
    import optuna

    from pipelines import stages
    from pipelines.sweep.study import WORKER_ENV, run_sweep

    over = [*TINY, "train.epochs=1", "sweep.pruner=none", *storage]
    if heartbeat == "short":
        over += ["sweep.heartbeat_s=1", "sweep.grace_s=2"]
    p = load_params("params.yaml", over)
    stages.prepare(p)
    stages.synthesize(p, progress=False)
    _kill_worker_in_first_trial(monkeypatch, worker="1", env=WORKER_ENV)
    summary = run_sweep(p, "params.yaml", over, n_trials=4, workers=2)
    study = optuna.load_study(study_name=p.sweep.study, storage=p.sweep.storage)
    states = [t.state.name for t in study.trials]
    assert states.count("COMPLETE") == 4 and "RUNNING" not in states, states
    assert states.count("FAIL") == 1 and summary["states"]["COMPLETE"] == 4
    mlflow.set_tracking_uri(f"sqlite:///{Path.cwd() / 'mlruns' / 'mlflow.db'}")  # absolute: MLflow caches stores by URI
    runs = mlflow.search_runs(experiment_names=[p.tracking.experiment], filter_string="tags.stage = 'sweep-trial'")
    assert sorted(runs["status"]) == ["FAILED", "FINISHED", "FINISHED", "FINISHED", "FINISHED"]
    params = [tuple(sorted(t.params.items())) for t in study.trials if t.state.name == "COMPLETE"]
    assert len(set(params)) == 4  # the re-run samples new points


# 6. MLflow after crashes ----------------------------------------------------------------------


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.slow
def test_run_left_running_by_a_killed_process_is_closed(workspace) -> None:
    import mlflow
    from mlflow import MlflowClient

    from pipelines.tracking.guard import HOST_TAG, PID_TAG
    from pipelines.tracking.runs import tracked_run

    p = load_params("params.yaml")
    with tracked_run(p, "train", "first"):
        pass
    client = MlflowClient()
    exp = client.get_experiment_by_name(p.tracking.experiment).experiment_id
    import socket

    stale = client.create_run(exp, tags={HOST_TAG: socket.gethostname(), PID_TAG: str(_dead_pid())})
    alive = client.create_run(exp, tags={HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid())})
    other = client.create_run(exp, tags={HOST_TAG: "another-host", PID_TAG: "1"})
    with tracked_run(p, "train", "second"):
        pass
    status = {r: client.get_run(r.info.run_id).info.status for r in (stale, alive, other)}
    assert list(status.values()) == ["KILLED", "RUNNING", "RUNNING"]
    mlflow.end_run()


def test_resumed_training_continues_its_mlflow_run(workspace, monkeypatch) -> None:
    from mlflow import MlflowClient

    from pipelines import stages
    from pipelines.stages import training

    over = [*TINY, "train.epochs=3"]
    p = load_params("params.yaml", over)
    stages.prepare(p)
    stages.synthesize(p, progress=False)
    real = training.train_model

    def killed_after_two_epochs(model, dataset, cfg, npm, dice, checkpoints, on_epoch=None, on_iteration=None):
        def epoch(m: dict) -> None:
            on_epoch(m)
            if m["epoch"] == 2:
                raise KeyboardInterrupt

        return real(model, dataset, cfg, npm, dice, checkpoints, on_epoch=epoch, on_iteration=on_iteration)

    monkeypatch.setattr(training, "train_model", killed_after_two_epochs)
    with pytest.raises(KeyboardInterrupt):
        stages.train(p, progress=False)
    monkeypatch.setattr(training, "train_model", real)
    stages.train(p, progress=False)
    client = MlflowClient()
    exp = client.get_experiment_by_name(p.tracking.experiment).experiment_id
    runs = client.search_runs([exp], filter_string="tags.stage = 'train'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, "train_total")]
    assert sorted(set(steps)) == [1, 2, 3]  # the whole curve in one run


@pytest.mark.parametrize("fault", ["folder", "locked"])
def test_broken_tracking_store_does_not_stop_training(workspace, caplog, fault) -> None:
    import sqlite3

    from pipelines import stages

    db = workspace / "mlruns" / "mlflow.db"
    db.parent.mkdir()
    holder = None
    if fault == "folder":
        db.mkdir()  # a folder where the database should be
    else:
        holder = sqlite3.connect(db, isolation_level=None)
        holder.execute("CREATE TABLE t (x)")
        holder.execute("BEGIN EXCLUSIVE")  # another process holds the database
    over = [*TINY, "tracking.timeout_s=0.2"]
    p = load_params("params.yaml", over)
    stages.prepare(p)
    stages.synthesize(p, progress=False)
    with caplog.at_level(logging.WARNING):
        summary = stages.train(p, progress=False)
    assert summary["groups"]["all"]["iterations"] == 4
    assert (workspace / "artifacts" / "models" / "all" / "model.safetensors").is_file()
    assert sum("MLflow tracking failed" in r.getMessage() for r in caplog.records) == 1
    from pipelines.tracking.guard import TrackingUnavailable, reset_unavailable

    reset_unavailable()
    with pytest.raises(TrackingUnavailable):  # tracking.required makes it fatal
        stages.train(load_params("params.yaml", [*over, "tracking.required=true"]), progress=False)
    if holder is not None:
        holder.close()


# 7. Bad inputs, archives, interrupts, params ----------------------------------------------------


def _flat_dataset(root: Path) -> None:
    (root / "good").mkdir(parents=True)
    (root / "bad").mkdir()
    (root / "masks").mkdir()
    for i in range(4):
        Image.fromarray(np.full((16, 16, 3), 40 * i, np.uint8)).save(root / "good" / f"g{i}.png")
    Image.fromarray(np.full((16, 16, 3), 9, np.uint8)).save(root / "bad" / "b0.png")
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(root / "masks" / "b0.png")  # marks nothing


def test_bomb_image_is_a_named_error_and_honours_skip_bad(tmp_path, monkeypatch) -> None:
    from components.data.datasets import Record
    from components.data.scan import ScanReport, validate_records

    big = tmp_path / "big.png"
    Image.fromarray(np.zeros((100, 100, 3), np.uint8)).save(big)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 10 000 px > 2 × limit: PIL's bomb error
    rec = Record(str(big), "c", "train", 0)
    report = ScanReport()
    validate_records([rec], report, progress=False)
    assert len(report.problems) == 1 and "big.png" in report.problems[0] and "decompression" in report.problems[0]
    report = ScanReport()
    assert validate_records([rec], report, skip_bad=True, progress=False) == []
    assert len(report.skipped_bad) == 1


def test_links_and_empty_masks_are_reported(tmp_path) -> None:
    from components.data.readers import flat_records
    from components.data.scan import ScanReport, validate_records
    from pipelines.stages.reporting import count_table

    root = tmp_path / "ds"
    _flat_dataset(root)
    (root / "good" / "loop.png").symlink_to(root / "good" / "loop.png")
    (root / "good" / "dangling.png").symlink_to(tmp_path / "gone.png")
    outside = tmp_path / "outside.png"
    Image.fromarray(np.full((16, 16, 3), 7, np.uint8)).save(outside)
    (root / "good" / "out.png").symlink_to(outside)
    report = ScanReport()
    records = flat_records(root / "good", root / "bad", root / "masks", None, category="c", seed=0, report=report)
    records = validate_records(records, report, progress=False)
    assert len(report.broken_links) == 2 and len(report.outside_links) == 1
    assert len(records) == 6  # 4 good + the outside link + 1 bad
    assert len(report.empty_masks) == 1
    assert count_table(records, report.empty_masks)[-1]["empty_mask"] == 1


def _zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def test_archive_limits(tmp_path) -> None:
    from components.data.download import DownloadError, ExtractLimits, safe_extract

    bomb = _zip(tmp_path / "bomb.zip", {"zeros.bin": bytes(20_000_000)})
    with pytest.raises(DownloadError, match="compression ratio"):
        safe_extract(bomb, tmp_path / "out")
    many = _zip(tmp_path / "many.zip", {f"f{i}.txt": b"x" for i in range(50)})
    with pytest.raises(DownloadError, match="50 members"):
        safe_extract(many, tmp_path / "out", ExtractLimits(max_members=10, max_ratio=1e9))
    with pytest.raises(DownloadError, match="GiB extracted"):
        safe_extract(bomb, tmp_path / "out", ExtractLimits(max_bytes=1000, max_ratio=1e9))
    assert not (tmp_path / "out").exists()
    safe_extract(many, tmp_path / "ok", ExtractLimits(max_ratio=1e9))
    assert len(list((tmp_path / "ok").iterdir())) == 50


def test_interrupt_exits_cleanly(workspace, monkeypatch, capsys) -> None:
    from pipelines import stages

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(stages, "train", interrupted)
    assert _cli("train") == 130
    err = capsys.readouterr().err
    assert "interrupted; rerun" in err and "Traceback" not in err


def test_internal_errors_are_not_reported_as_user_errors(workspace, monkeypatch) -> None:
    from pipelines import stages

    def bug(*a, **k):
        raise KeyError("internal")

    monkeypatch.setattr(stages, "train", bug)
    with pytest.raises(KeyError):
        _cli("train")


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("seed=-1", "seed"),
        ("train.epochs=true", "train.epochs"),
        ("loss.gamma=.inf", "loss.gamma"),
        ("train.betas=[0.9, .nan]", "train.betas"),
    ],
)
def test_params_validators_name_the_key(override, key) -> None:
    with pytest.raises(ConfigError, match=rf"\n  {re.escape(key)}(\.\d+)?: "):
        load_params(ROOT / "params.yaml", [override])


def test_empty_params_file_is_an_error(tmp_path) -> None:
    (tmp_path / "params.yaml").write_text("")
    with pytest.raises(ConfigError, match="empty"):
        load_params(tmp_path / "params.yaml")


# 8. Written files -------------------------------------------------------------------------------


def test_written_files_get_normal_permissions(tmp_path) -> None:
    from components.engine.checkpoint import save_model
    from components.files import atomic_write_text

    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.json", "{}")
        model = tiny_model(seg_head=None)
        save_model(tmp_path / "m", model, bare_package(model))
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "m").stat().st_mode & 0o777 == 0o755
    assert json.loads((tmp_path / "a.json").read_text()) == {}
