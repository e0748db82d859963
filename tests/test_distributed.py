"""DDP on CPU (gloo, 2 processes): 2 ranks × 4 images give the losses and weights of 1 × 8, and a run
whose rank 1 dies mid-epoch resumes to the weights of an uninterrupted 2-rank run."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from conftest import TINY_DEPTH, reorder_tolerance, tiny_model
from safetensors.torch import load_file, save_file
from test_training import _Toy

from components.engine.checkpoint import latest_checkpoint
from components.engine.distributed import DistContext, init_from_env
from components.engine.losses import DiceLoss, NormalPatternLoss
from components.engine.training import CheckpointSpec, TrainConfig, seed_everything, train

pytestmark = pytest.mark.slow  # spawns processes
KILL_AT = 4  # rank 1 dies after this global iteration


class _Parts(_Toy):
    """24 deterministic images; pseudo anomalies on two of every three (so ranks hold different counts)."""

    def __init__(self) -> None:
        super().__init__(n=24)

    def __getitem__(self, i: int) -> dict:
        img, mask = self.images[i], torch.zeros(1, 56, 56)
        if (i + self.epoch) % 3:
            y = (5 * self.epoch + 3 * i) % 40
            mask[:, y : y + 12, y : y + 12] = 1
        return {"image": img, "anomaly_image": img + 2 * mask, "anomaly_mask": mask, "label": 0, "mask": mask * 0}


def _cfg(epochs: int, ctx: DistContext | None) -> TrainConfig:
    return TrainConfig(
        epochs=epochs, batch_size=8, warmup_iters=2, progress=False, seed=1, checkpoint_every=1,
        parallel=ctx or DistContext(),
    )  # fmt: skip


def _train(out: Path, epochs: int, ctx: DistContext | None, kill: bool = False) -> None:
    seed_everything(1)
    model = tiny_model()
    losses: list[dict] = []

    def on_iteration(m: dict) -> None:
        losses.append({k: m[k] for k in ("total", "cos", "seg")})
        if kill and ctx is not None and ctx.rank == 1 and m["iteration"] == KILL_AT:
            os._exit(1)  # a crashed rank: no clean-up of any kind

    ckpt = CheckpointSpec(out / "ckpt", None, resume=True)
    train(model, _Parts(), _cfg(epochs, ctx), NormalPatternLoss(), DiceLoss(), ckpt, on_iteration=on_iteration)
    if ctx is None or ctx.main:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "weights.safetensors"))
        (out / "losses.json").write_text(json.dumps(losses))


def _worker(rank: int, world: int, port: int, out: str, epochs: int, kill: bool) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    ctx = init_from_env("cpu")
    try:
        _train(Path(out), epochs, ctx, kill)
    finally:
        torch.distributed.destroy_process_group()


def _disagreeing(rank: int, world: int, port: int) -> None:
    from components.engine.distributed import check_same_config

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    ctx = init_from_env("cpu")
    try:
        check_same_config(ctx, "gamma=3" if rank == 0 else "gamma=2")
    finally:
        torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp(out: Path, epochs: int, kill: bool = False) -> None:
    out.mkdir(parents=True, exist_ok=True)
    mp.spawn(_worker, args=(2, _free_port(), str(out), epochs, kill), nprocs=2, join=True)


# DDP splits each step's sums (over 8 images x 56 x 56 pixels in the seg head) between two ranks
# and an all-reduce: the same sums reordered, over forward and backward of the tiny model in 3 steps.
DDP_TOLERANCE = reorder_tolerance(8 * 56 * 56, 2 * TINY_DEPTH * 3)


def _close(a: dict, b: dict, rel: float = DDP_TOLERANCE) -> None:
    for name, x in a.items():
        y = b[name]
        assert torch.allclose(x, y, rtol=rel, atol=rel * max(1.0, float(y.abs().max()))), name


def test_two_ranks_equal_one_process_with_the_whole_batch(tmp_path) -> None:
    _train(tmp_path / "one", 1, None)  # 24 images / 8 = 3 steps
    _ddp(tmp_path / "two", 1)
    one = json.loads((tmp_path / "one" / "losses.json").read_text())
    two = json.loads((tmp_path / "two" / "losses.json").read_text())
    assert len(one) == len(two) == 3
    for a, b in zip(one, two):
        for k in a:
            assert b[k] == pytest.approx(a[k], rel=DDP_TOLERANCE, abs=DDP_TOLERANCE), (k, a, b)
    _close(load_file(tmp_path / "two" / "weights.safetensors"), load_file(tmp_path / "one" / "weights.safetensors"))


def test_killed_rank_resumes_to_the_uninterrupted_weights(tmp_path) -> None:
    _ddp(tmp_path / "full", 2)  # 6 steps
    with pytest.raises((mp.ProcessRaisedException, mp.ProcessExitedException)):
        _ddp(tmp_path / "cut", 2, kill=True)
    assert not (tmp_path / "cut" / "weights.safetensors").exists()
    ckpt = latest_checkpoint(tmp_path / "cut" / "ckpt")
    done = json.loads((ckpt / "train_state.json").read_text())["progress"]["global_iteration"]
    assert KILL_AT - 1 <= done <= KILL_AT  # rank 0 got to write step 3's or step 4's checkpoint
    _ddp(tmp_path / "cut", 2)  # the rerun resumes from the last checkpoint
    assert len(json.loads((tmp_path / "cut" / "losses.json").read_text())) == 6 - done  # resumed, not restarted
    _close(load_file(tmp_path / "cut" / "weights.safetensors"), load_file(tmp_path / "full" / "weights.safetensors"))


def test_inpformer_train_nproc_2_matches_one_process(tmp_path, monkeypatch) -> None:
    """`inpformer train --nproc 2` (torchrun, gloo) through the real stage: feature cache built by
    rank 0, rank 0 alone writes the model; the weights equal one process's."""
    import shutil
    import subprocess
    import sys

    from conftest import TINY_PIPELINE

    from pipelines import stages
    from pipelines.config import load_params

    root = Path(__file__).resolve().parents[1]
    shutil.copy(root / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    over = [*TINY_PIPELINE, "data.synthetic.n_train=8", "train.epochs=1", "tracking.enabled=false", "train.device=cpu"]
    p = load_params("params.yaml", over)
    stages.prepare(p)
    stages.synthesize(p, False)
    stages.train(p, progress=False)
    one = load_file(tmp_path / "artifacts" / "models" / "all" / "model.safetensors")
    shutil.rmtree(tmp_path / "artifacts" / "models")
    sets = [x for o in over for x in ("--set", o)]
    cli = [sys.executable, "-m", "pipelines.cli", "train", "--nproc", "2", "--no-progress", *sets]
    done = subprocess.run(cli, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "on 2 ranks" in done.stdout
    two = load_file(tmp_path / "artifacts" / "models" / "all" / "model.safetensors")
    assert set(one) == set(two)  # the global-statistics batch norm saves under the same names
    _close(two, one)


def test_ranks_with_other_params_stop_with_a_clear_error() -> None:
    with pytest.raises(mp.ProcessRaisedException, match=r"ranks \[1\] were started with other params"):
        mp.spawn(_disagreeing, args=(2, _free_port()), nprocs=2, join=True)


def test_a_two_rank_checkpoint_resumes_on_one_process(tmp_path) -> None:
    """The checkpoint counts global batches: a 2-rank run killed mid-epoch resumes with 1 process."""
    _ddp(tmp_path / "full", 2)
    with pytest.raises((mp.ProcessRaisedException, mp.ProcessExitedException)):
        _ddp(tmp_path / "cut", 2, kill=True)
    done = json.loads((latest_checkpoint(tmp_path / "cut" / "ckpt") / "train_state.json").read_text())
    _train(tmp_path / "cut", 2, None)  # one process, batch 8 = the same global batches
    assert len(json.loads((tmp_path / "cut" / "losses.json").read_text())) == 6 - done["progress"]["global_iteration"]
    _close(load_file(tmp_path / "cut" / "weights.safetensors"), load_file(tmp_path / "full" / "weights.safetensors"))
