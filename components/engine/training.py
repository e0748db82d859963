"""Device-agnostic, resumable training (method spec §8–§9, §13.3, §13.9).

Training = normal-pattern modelling (L_npm on normal images) plus, for INP-Former++, residual
learning: the segmentation head learns from the *detached* residual of a pseudo-anomalous copy
(Dice loss). ``TrainConfig.residual_mode`` (decided once, by the caller's builder):

* ``joint`` — both in every iteration; the stop-gradient isolates the head (§13.9).
* ``two_stage`` — ``epochs`` of normal-pattern modelling, then ``head_epochs`` for the head alone
  with everything else frozen (§13.9).
* ``off`` — conference INP-Former.

Resumable: a checkpoint (model, optimiser, RNG, schedule, :class:`TrainState`) is written every
``checkpoint_every`` iterations and at each epoch end. Each epoch's sample order comes from a
generator seeded with (seed, epoch) and the dataset is told the epoch (``set_epoch``), so a resumed
run draws exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from components.data import batch as keys
from components.engine.acceleration import compile_with_fallback, set_tf32
from components.engine.checkpoint import latest_checkpoint, load_train_state, read_progress, save_train_checkpoint
from components.engine.distributed import DistContext, convert_batchnorm, rank_mean, wrap_ddp
from components.engine.losses import DiceLoss, NormalPatternLoss
from components.engine.optim import StableAdamW, WarmCosineSchedule, clip_grad_norm, phase_optimizer
from components.engine.sampling import EpochIndexed, EpochSampler
from components.engine.train_config import (
    AMP_MODES,
    RESIDUAL_MODES,
    CheckpointSpec,
    TrainConfig,
    TrainResult,
    TrainState,
    seed_everything,
)
from components.model import InpFormer
from components.scoring.package import ModelPackage

logger = logging.getLogger(__name__)

__all__ = [
    "AMP_MODES",
    "RESIDUAL_MODES",
    "CheckpointSpec",
    "TrainConfig",
    "TrainResult",
    "TrainState",
    "phase_optimizer",
    "seed_everything",
    "train",
]

PHASE_EPOCH_STRIDE = 10_000  # set_epoch(epoch + stride · phase): each phase draws its own stream


@dataclass
class _Phase:
    """One phase's fixed parts: what trains, with which optimiser and losses."""

    name: str  # "main" (L_npm [+ joint seg]) or "head" (two-stage head training)
    index: int
    epochs: int
    model: InpFormer
    dataset: Dataset
    cfg: TrainConfig
    loss_fn: NormalPatternLoss
    dice: DiceLoss
    optimizer: StableAdamW
    schedule: WarmCosineSchedule
    trunk_params: list[torch.nn.Parameter]
    head_params: list[torch.nn.Parameter]
    device: torch.device
    ctx: DistContext = field(default_factory=DistContext)
    step: Any = None  # the DDP-wrapped loss module under DDP (None: step_losses directly)
    sampler: EpochSampler | None = None  # one sampler and loader per phase (persistent workers)
    loader: DataLoader | None = None
    total_iterations: int = 0  # of all phases (progress and ETA)

    @property
    def joint(self) -> bool:
        """Normal-pattern modelling and the head's Dice loss in the same step."""
        return self.name == "main" and self.cfg.residual_mode == "joint"

    @property
    def head_only(self) -> bool:
        """The second stage of two-stage training."""
        return self.name == "head"


def _phase_names(cfg: TrainConfig) -> list[tuple[str, int]]:
    phases = [("main", cfg.epochs)]
    if cfg.residual_mode == "two_stage" and cfg.head_epochs > 0:
        phases.append(("head", cfg.head_epochs))
    return phases


def train(
    model: InpFormer,
    dataset: Dataset,
    cfg: TrainConfig,
    loss_fn: NormalPatternLoss,
    dice: DiceLoss | None = None,
    checkpoints: CheckpointSpec | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    on_iteration: Callable[[dict[str, Any]], None] | None = None,
) -> TrainResult:
    """Train ``model`` (an :class:`~components.model.InpFormer`) on ``dataset``.

    Under DDP (``cfg.parallel`` with more than one rank, :mod:`components.engine.distributed`) every rank
    runs this with the same arguments; rank 0 alone writes checkpoints and calls ``on_epoch``.

    The dataset yields :mod:`components.data.batch` dicts: ``image`` (3×H×W, normalised) or
    ``features``, and for residual learning ``anomaly_image``/``anomaly_features`` and
    ``anomaly_mask`` (1×H×W in {0, 1}); it may define ``set_epoch(epoch)``.

    Returns per-epoch mean losses, iterations run, wall time and whether it resumed.
    """
    if cfg.residual_mode != "off" and model.seg_head is None:
        msg = f"residual_mode={cfg.residual_mode!r} needs a model with a segmentation head (or residual_mode='off')."
        raise ValueError(msg)
    ctx = cfg.parallel
    if ctx.active and (cfg.batch_size % ctx.world or not cfg.drop_last):
        msg = f"batch_size={cfg.batch_size} must be a multiple of the {ctx.world} ranks (the global batch is split)."
        raise ValueError(msg)
    device = torch.device(cfg.device)
    model.to(device)
    set_tf32(device, cfg.tf32)
    if cfg.compile:
        compile_with_fallback(model)
    if ctx.active:  # batch statistics over the global batch, as one process computes them (seg head)
        convert_batchnorm(model, device.type == "cuda")  # before the optimisers collect the parameters
    n = len(dataset)  # type: ignore[arg-type]
    per_epoch = n // cfg.batch_size if cfg.drop_last else math.ceil(n / cfg.batch_size)
    if per_epoch < 1:
        msg = f"{n} training images give no full batch of {cfg.batch_size}: lower the batch size or add images."
        raise ValueError(msg)
    ckpt = latest_checkpoint(checkpoints.folder) if (checkpoints and checkpoints.resume) else None
    state = TrainState(phase=int(read_progress(ckpt)["phase"])) if ckpt is not None else TrainState()
    resumed, schedule = False, None
    start_time = time.time()
    phases = _phase_names(cfg)
    while state.phase < len(phases):
        name, epochs = phases[state.phase]
        optimizer, schedule = phase_optimizer(model, cfg, name, epochs * per_epoch)
        if ckpt is not None:
            state = TrainState(**load_train_state(ckpt, model, optimizer, str(device)))
            schedule.load_state_dict({"iteration": state.phase_iteration})
            resumed = True
            logger.info("Resumed from %s (epoch %d, batch %d)", ckpt, state.epoch, state.batch)
            ckpt = None
        else:
            state.epoch, state.batch, state.phase_iteration = 0, 0, 0
        trunk_ids = {id(p) for p in model.trunk_parameters()}
        trainable = [p for g in optimizer.param_groups for p in g["params"]]
        phase = _Phase(
            name=name,
            index=state.phase,
            epochs=epochs,
            model=model,
            dataset=dataset,
            cfg=cfg,
            loss_fn=loss_fn,
            dice=dice or DiceLoss(),
            optimizer=optimizer,
            schedule=schedule,
            trunk_params=[p for p in trainable if id(p) in trunk_ids],
            head_params=[p for p in trainable if id(p) not in trunk_ids],
            device=device,
            ctx=ctx,
        )
        phase.total_iterations = sum(e for _, e in phases) * per_epoch  # all phases: what an ETA needs
        if ctx.active:
            phase.step = wrap_ddp(_StepLosses(phase), phase.device, ctx.local_rank)
        for epoch in range(state.epoch, epochs):
            run_epoch(phase, state, epoch, checkpoints, on_epoch, on_iteration)
        state.phase += 1
    return TrainResult(
        history=state.history,
        iterations=state.global_iteration,
        iterations_per_epoch=per_epoch,
        seconds=time.time() - start_time,
        resumed=resumed,
        final_lr=schedule.lr_at(schedule.iteration) if schedule else None,
    )


def run_epoch(
    phase: _Phase,
    state: TrainState,
    epoch: int,
    checkpoints: CheckpointSpec | None,
    on_epoch: Callable[[dict[str, Any]], None] | None,
    on_iteration: Callable[[dict[str, Any]], None] | None,
) -> dict[str, Any]:
    """One epoch of ``phase`` from batch ``state.batch``; updates ``state``; returns the mean losses."""
    cfg = phase.cfg
    if phase.loader is None:
        phase.sampler = EpochSampler(len(phase.dataset), cfg, phase.ctx)  # type: ignore[arg-type]
        phase.loader = DataLoader(
            EpochIndexed(phase.dataset),
            batch_sampler=phase.sampler,
            num_workers=cfg.num_workers,
            pin_memory=phase.device.type == "cuda",
            persistent_workers=cfg.num_workers > 0,
        )
    skipped = state.batch  # batches of this epoch done before a resume
    sampler, loader = phase.sampler, phase.loader
    sampler.set_epoch(epoch, skipped, epoch + PHASE_EPOCH_STRIDE * phase.index)
    sums: dict[str, torch.Tensor] = {}  # float64 on the device: no host sync per step
    count, lr_sum = 0, 0.0
    phase.model.train()
    desc = f"{phase.name} epoch {epoch + 1}/{phase.epochs}"
    bar = tqdm(loader, total=len(sampler), desc=desc, disable=not cfg.progress, leave=False)
    for batch in bar:
        values, lr = train_step(phase, batch)
        for k, v in values.items():
            sums[k] = sums[k] + v.double() if k in sums else v.double()
        lr_sum += lr
        count += 1
        state.batch += 1
        state.global_iteration += 1
        state.phase_iteration = phase.schedule.iteration
        if state.global_iteration % cfg.log_every == 0 or state.batch == len(sampler) + skipped:
            logs = {**dict(zip(values, rank_mean(phase.ctx, values))), "lr": lr}  # the one sync
            if not math.isfinite(logs["total"]):
                msg = f"loss became {logs['total']} at iteration {state.global_iteration}."
                raise FloatingPointError(msg)
            if on_iteration is not None:
                total = phase.total_iterations
                on_iteration({**logs, "iteration": state.global_iteration, "iterations": total, "phase": phase.name})
            bar.set_postfix(loss=f"{logs['total']:.4f}", lr=f"{logs['lr']:.2e}")
        if checkpoints and cfg.checkpoint_every and state.global_iteration % cfg.checkpoint_every == 0:
            _save(phase, state, checkpoints)
    means: dict[str, Any] = {k: v / max(count, 1) for k, v in zip(sums, rank_mean(phase.ctx, sums))}
    means["lr"] = lr_sum / max(count, 1)
    means.update(epoch=epoch + 1, phase=phase.name)
    state.history.append(means)
    state.epoch, state.batch = epoch + 1, 0
    if on_epoch is not None and phase.ctx.main:  # before the checkpoint: a crash in between re-logs this epoch
        on_epoch(means)
    if checkpoints:
        _save(phase, state, checkpoints)
    logger.info("%s epoch %d/%d: %s", phase.name, epoch + 1, phase.epochs, _fmt(means))
    return means


def _package(model: InpFormer, checkpoints: CheckpointSpec) -> ModelPackage:
    """The package stored with a checkpoint: the spec's, else the bare architecture."""
    if checkpoints.package is not None:
        return checkpoints.package
    config = model.config
    crop = config.image_size if isinstance(config.image_size, int) else config.image_size[0]
    return ModelPackage(model=config, resize=int(crop))


def _save(phase: _Phase, state: TrainState, checkpoints: CheckpointSpec) -> None:
    """Rank 0 writes; the others wait for it (so no rank runs ahead of the last checkpoint)."""
    if phase.ctx.main:
        save_train_checkpoint(
            checkpoints.folder,
            phase.model,
            _package(phase.model, checkpoints),
            phase.optimizer,
            asdict(state),
            checkpoints.keep,
        )
    phase.ctx.barrier()


class _StepLosses(torch.nn.Module):
    """The losses of one step as a module, so that DDP can wrap them (the model is its submodule)."""

    def __init__(self, phase: _Phase) -> None:
        super().__init__()
        self.model = phase.model
        self._phase = [phase]  # a list: not registered as a submodule

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return step_losses(self._phase[0], batch)


def _autocast(amp: str, device: torch.device):
    if amp == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


def train_step(phase: _Phase, batch: dict[str, Any]) -> tuple[dict[str, torch.Tensor], float]:
    """Forward, backward, clip and step on one batch; the detached losses (on the device: no host
    sync) and the lr used."""
    lr = phase.optimizer.param_groups[0]["lr"]
    with _autocast(phase.cfg.amp, phase.device):
        values = phase.step(batch) if phase.step is not None else step_losses(phase, batch)
    phase.optimizer.zero_grad(set_to_none=True)
    values["total"].backward()
    clip_grad_norm(phase.trunk_params, phase.cfg.grad_clip)
    clip_grad_norm(phase.head_params, phase.cfg.head_grad_clip)
    phase.optimizer.step()
    phase.schedule.step()
    return {k: v.detach() for k, v in values.items()}, lr


def _forward(model: InpFormer, batch: dict[str, Any], image_key: str, features_key: str, device: torch.device):
    if features_key in batch:  # cached encoder outputs (components.engine.feature_cache)
        return model.forward_cached(batch[features_key].to(device, non_blocking=True))
    return model(batch[image_key].to(device, non_blocking=True))


def step_losses(phase: _Phase, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    """L_npm terms on the normal images and/or the head's Dice loss on the pseudo anomalies."""
    model, device = phase.model, phase.device
    values: dict[str, torch.Tensor] = {}
    if not phase.head_only:
        values = phase.loss_fn(_forward(model, batch, keys.IMAGE, keys.FEATURES, device))
    if phase.joint or phase.head_only:
        if keys.ANOMALY_IMAGE not in batch and keys.ANOMALY_FEATURES not in batch:
            msg = (
                f"residual learning needs '{keys.ANOMALY_IMAGE}'/'{keys.ANOMALY_MASK}' in the batch (enable synthesis)."
            )
            raise ValueError(msg)
        mask = batch[keys.ANOMALY_MASK].to(device, non_blocking=True)
        with torch.no_grad():  # the residual is detached (§13.3): no trunk graph is needed
            out_a = _forward(model, batch, keys.ANOMALY_IMAGE, keys.ANOMALY_FEATURES, device)
        probs = torch.sigmoid(model.segment(out_a, size=tuple(mask.shape[-2:])).float())
        seg = phase.dice(probs, mask.float())
        values["seg"] = seg
        weighted = phase.cfg.seg_weight * seg
        values["total"] = values["total"] + weighted if "total" in values else weighted
    return values


def _fmt(values: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:.4g}" for k, v in values.items() if isinstance(v, float))
