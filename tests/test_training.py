"""Training: resumable, deterministic checkpoints without pickle; two-stage head training; bf16; lr scale."""

from __future__ import annotations

import json
import struct
import zipfile

import pytest
import torch
from conftest import bare_package, tiny_model
from safetensors import safe_open
from torch.utils.data import Dataset

from components.engine.checkpoint import latest_checkpoint, load_model, save_model
from components.engine.losses import DiceLoss, NormalPatternLoss
from components.engine.training import CheckpointSpec, TrainConfig, phase_optimizer, seed_everything, train
from components.files import file_digest
from components.scoring.inference import ScoringConfig, predict


class _Toy(Dataset):
    """Deterministic images with a pseudo anomaly square that depends on (epoch, index)."""

    def __init__(self, n: int = 8, size: int = 56) -> None:
        g = torch.Generator().manual_seed(0)
        self.images = torch.randn(n, 3, size, size, generator=g)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        img = self.images[i]
        mask = torch.zeros(1, *img.shape[-2:])
        y = (3 * self.epoch + i) % 40
        mask[:, y : y + 12, y : y + 12] = 1
        return {
            "image": img,
            "anomaly_image": img + 2 * mask,
            "anomaly_mask": mask,
            "label": 0,
            "mask": mask * 0,
        }


def _cfg(**kw) -> TrainConfig:
    base = dict(epochs=3, batch_size=4, warmup_iters=2, progress=False, seed=1, checkpoint_every=1)
    base.update(kw)
    return TrainConfig(**base)


def _run(tmp_path, cfg, stop_after=None, resume=True):
    seed_everything(1)
    model = tiny_model()
    losses: list[float] = []

    def on_it(m: dict) -> None:
        losses.append(m["total"])
        if stop_after is not None and m["iteration"] == stop_after:
            raise KeyboardInterrupt("simulated kill")

    try:
        ckpt = CheckpointSpec(tmp_path / "ckpt", None, resume)
        train(model, _Toy(), cfg, NormalPatternLoss(), DiceLoss(), ckpt, on_iteration=on_it)
    except KeyboardInterrupt:
        pass
    return model, losses


def test_resume_after_interrupt_equals_uninterrupted(tmp_path) -> None:
    full, full_losses = _run(tmp_path / "a", _cfg())
    _, first = _run(tmp_path / "b", _cfg(), stop_after=3)  # killed mid-epoch 2 (2 it/epoch)
    assert len(first) == 3
    ck = latest_checkpoint(tmp_path / "b" / "ckpt")
    done = json.loads((ck / "train_state.json").read_text())["progress"]["global_iteration"]
    assert done == 2  # the kill came before iteration 3's checkpoint: it is redone
    resumed, rest = _run(tmp_path / "b", _cfg())
    assert len(rest) == len(full_losses) - done
    assert rest == pytest.approx(full_losses[done:], rel=1e-5, abs=1e-7)
    for (n, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.allclose(a, b, atol=1e-6), n


def test_checkpoints_are_safetensors_and_json(tmp_path) -> None:
    _run(tmp_path, _cfg(epochs=1))
    ck = latest_checkpoint(tmp_path / "ckpt")
    files = sorted(p.name for p in ck.iterdir())
    assert files == ["digest.json", "model.safetensors", "package.json", "train_state.json", "train_state.safetensors"]
    state = json.loads((ck / "train_state.json").read_text())
    assert state["progress"]["epoch"] == 1 and state["progress"]["global_iteration"] == 2
    for f in ck.glob("*.safetensors"):  # safetensors: u64 header length, JSON header, raw tensors
        raw = f.read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8 : 8 + n])
        assert all("dtype" in v for k, v in header.items() if k != "__metadata__")
        assert not zipfile.is_zipfile(f) and raw[:1] != b"\x80"  # neither torch.save's zip nor a raw pickle
        with safe_open(str(f), "pt") as fh:
            assert len(list(fh.keys())) == len(header) - ("__metadata__" in header)
    for f in ck.glob("*.json"):
        json.loads(f.read_text())


def test_incomplete_checkpoint_is_not_trusted(tmp_path) -> None:
    _run(tmp_path, _cfg(epochs=1))
    ck = latest_checkpoint(tmp_path / "ckpt")
    (ck / "train_state.safetensors").unlink()  # a crash mid-write
    older = latest_checkpoint(tmp_path / "ckpt")  # the one before (train.keep_checkpoints = 2)
    assert older is not None and older.name < ck.name
    (older / "train_state.safetensors").unlink()
    assert latest_checkpoint(tmp_path / "ckpt") is None


def test_two_stage_trains_head_after_trunk(tmp_path) -> None:
    seed_everything(1)
    model = tiny_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    snapshots = {}

    def on_it(m: dict) -> None:
        if m["phase"] == "head" and "trunk" not in snapshots:
            snapshots["trunk"] = model.decoder[0].mlp.fc1.weight.detach().clone()

    cfg = _cfg(epochs=1, head_epochs=1, residual_mode="two_stage", checkpoint_every=0)
    out = train(model, _Toy(), cfg, NormalPatternLoss(), DiceLoss(), on_iteration=on_it)
    phases = [h["phase"] for h in out.history]
    assert phases == ["main", "head"]
    assert "seg" not in out.history[0] and "seg" in out.history[1]
    assert torch.equal(snapshots["trunk"], model.decoder[0].mlp.fc1.weight)  # trunk frozen in stage 2
    assert not torch.equal(before["seg_head.predictor.weight"], model.seg_head.predictor.weight)


def test_too_few_images_for_a_batch(tmp_path) -> None:
    with pytest.raises(ValueError, match="no full batch of 4"):
        train(tiny_model(), _Toy(n=3), _cfg(batch_size=4), NormalPatternLoss())


def test_save_load_model_roundtrip_and_predict(tmp_path) -> None:
    seed_everything(0)
    model = tiny_model()
    save_model(tmp_path / "m", model, bare_package(model, 64, ("brick",)))
    loaded, package = load_model(tmp_path / "m")
    assert package.model == model.config and package.categories == ("brick",) and not package.encoder_pretrained
    assert package.provenance.weights_sha256 == file_digest(tmp_path / "m" / "model.safetensors")
    x = _Toy(4)
    for kind in ("reconstruction", "fused", "inp_distance"):
        scoring = ScoringConfig(map_kind=kind, resize=64)
        a = predict(model, x, scoring, batch_size=2, progress=False)
        b = predict(loaded, x, scoring, batch_size=2, progress=False)
        assert a.maps.shape == (4, 64, 64) and a.scores.shape == (4,)
        assert torch.allclose(torch.from_numpy(a.maps), torch.from_numpy(b.maps), atol=1e-6)
    with pytest.raises(FileNotFoundError, match="package.json"):
        load_model(tmp_path / "missing")


def test_residual_learning_needs_a_head() -> None:
    with pytest.raises(ValueError, match="segmentation head"):
        train(tiny_model(seg_head=None), _Toy(), _cfg(epochs=1), NormalPatternLoss())
    out = train(tiny_model(seg_head=None), _Toy(), _cfg(epochs=1, residual_mode="off"), NormalPatternLoss())
    assert "seg" not in out.history[0]


@pytest.mark.parametrize("scale", [0.25, 3.0])
def test_head_lr_scale(scale: float) -> None:
    model = tiny_model()
    cfg = _cfg(head_lr_scale=scale, lr=1e-3, warmup_iters=0)
    optimizer, schedule = phase_optimizer(model, cfg, "main", 10)
    names = [g["name"] for g in optimizer.param_groups]
    assert names == ["trunk", "head"]
    trunk, head = optimizer.param_groups
    assert head["lr"] == pytest.approx(scale * trunk["lr"]) and trunk["lr"] == pytest.approx(1e-3)
    for _ in range(4):
        schedule.step()
    assert head["lr"] == pytest.approx(scale * trunk["lr"]) and trunk["lr"] < 1e-3  # cosine decay keeps the ratio
    assert {id(p) for p in head["params"]} == {id(p) for p in model.head_parameters()}
    stage2, _ = phase_optimizer(model, _cfg(head_lr_scale=scale, residual_mode="two_stage"), "head", 10)
    assert [g["name"] for g in stage2.param_groups] == ["head"]
    assert not any(p.requires_grad for p in model.trunk_parameters())
    assert all(p.requires_grad for p in model.head_parameters())


def _collect(losses: list[float]):
    return lambda m: losses.append(m["total"])


def test_bf16_autocast_trains_close_to_fp32() -> None:
    """bf16 autocast (CPU here, CUDA in production): finite, and the first loss within bf16 precision."""
    results = {}
    for amp in ("none", "bf16"):
        seed_everything(1)
        model = tiny_model()
        losses: list[float] = []
        cfg = _cfg(epochs=1, amp=amp, checkpoint_every=0)
        out = train(model, _Toy(), cfg, NormalPatternLoss(), DiceLoss(), on_iteration=_collect(losses))
        results[amp] = losses
        assert all(torch.isfinite(torch.tensor(losses))) and out.iterations == 2
    assert results["bf16"][0] == pytest.approx(results["none"][0], rel=2e-2)
    assert results["bf16"] != results["none"]  # autocast really ran in bf16


def test_compile_failure_falls_back_to_eager(tmp_path, monkeypatch, caplog) -> None:
    def broken(fn, *a, **k):
        def run(*args, **kwargs):
            raise RuntimeError("no compiler here")

        return run

    monkeypatch.setattr(torch, "compile", broken)
    eager, eager_losses = _run(tmp_path / "eager", _cfg(epochs=1))
    with caplog.at_level("WARNING"):
        compiled, losses = _run(tmp_path / "compiled", _cfg(epochs=1, compile=True))
    assert "torch.compile failed" in caplog.text and "training continues eagerly" in caplog.text
    assert losses == eager_losses  # the same training, eagerly


def test_persistent_loader_workers_draw_each_epochs_anomalies(tmp_path) -> None:
    """Two persistent loader workers give the losses of the main-process loader over 3 epochs: the
    epoch reaches the workers' dataset copies (the pseudo anomalies move every epoch)."""
    _, main_losses = _run(tmp_path / "main", _cfg(epochs=3))
    _, worker_losses = _run(tmp_path / "workers", _cfg(epochs=3, num_workers=2))
    assert worker_losses == main_losses


def test_epoch_history_holds_mean_losses_and_lr(tmp_path) -> None:
    seed_everything(1)
    out = train(tiny_model(), _Toy(), _cfg(epochs=2, checkpoint_every=0), NormalPatternLoss(), DiceLoss())
    first = out.history[0]
    assert {"total", "cos", "coherence", "seg", "lr", "epoch", "phase"} <= set(first)
    assert 0 < first["lr"] <= 1e-3 and isinstance(first["total"], float)
