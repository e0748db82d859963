"""Training settings and state: what :func:`components.engine.training.train` is told and what it saves."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from components.constants import AMP_MODES, RESIDUAL_MODES, check_choice
from components.engine.distributed import DistContext
from components.scoring.package import ModelPackage

__all__ = [
    "AMP_MODES",
    "RESIDUAL_MODES",
    "CheckpointSpec",
    "TrainConfig",
    "TrainResult",
    "TrainState",
    "seed_everything",
]


def seed_everything(seed: int, deterministic: bool = True) -> None:
    """Seed torch (CPU, CUDA), numpy and Python ``random`` (the official ``setup_seed``)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic


@dataclass
class TrainConfig:
    """Training settings (defaults: the official code, spec §9; the pipeline's ``TrainParams``)."""

    epochs: int = 200
    batch_size: int = 16
    lr: float = 1e-3
    final_lr: float = 1e-4
    warmup_iters: int = 100
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-10
    weight_decay: float = 1e-4
    amsgrad: bool = True
    clip_threshold: float = 1.0
    grad_clip: float = 0.1
    head_grad_clip: float = 0.1
    head_lr_scale: float = 1.0
    seg_weight: float = 1.0
    residual_mode: str = "joint"
    head_epochs: int = 100
    seed: int = 1
    device: str = "cpu"
    amp: str = "none"
    tf32: bool = False  # TF32 matmuls / convolutions on Ampere and newer GPUs
    compile: bool = False  # torch.compile the trainable part; eager again if compiling fails
    parallel: DistContext = field(default_factory=DistContext)  # this process's rank (DDP), or alone
    num_workers: int = 0
    drop_last: bool = True
    checkpoint_every: int = 1000
    log_every: int = 1  # iterations between loss logs and NaN checks (each one a host sync on GPU)
    progress: bool = True

    def __post_init__(self) -> None:
        check_choice("residual_mode", self.residual_mode, RESIDUAL_MODES)
        check_choice("amp", self.amp, AMP_MODES)
        if self.epochs < 1 or self.batch_size < 1:
            msg = f"epochs and batch_size must be >= 1, got {self.epochs}, {self.batch_size}."
            raise ValueError(msg)


@dataclass
class TrainState:
    """Where training is; saved in every checkpoint (``train_state.json``: ``progress``)."""

    phase: int = 0
    epoch: int = 0
    batch: int = 0  # batches done in the current epoch
    global_iteration: int = 0
    phase_iteration: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)  # per-epoch mean losses


@dataclass
class CheckpointSpec:
    """Where checkpoints go, the model package stored with them (None: the bare architecture), and
    whether to resume from them."""

    folder: Path
    package: ModelPackage | None = None
    resume: bool = True
    keep: int = 2  # checkpoints kept: a damaged newest one falls back to the one before


@dataclass(frozen=True)
class TrainResult:
    """What :func:`~components.engine.training.train` reports."""

    history: list[dict[str, Any]]  # per-epoch mean losses (and phase, epoch, lr)
    iterations: int  # optimiser steps over all phases
    iterations_per_epoch: int
    seconds: float  # wall time of this call (not of an earlier, interrupted one)
    resumed: bool  # whether it resumed from a checkpoint
    final_lr: float | None
