"""Device-agnostic training and inference loops (method spec §8–§9, §12, §13.3, §13.9).

Training = normal-pattern modelling (L_npm on normal images) plus, for INP-Former++, residual
learning: the segmentation head learns from the *detached* residual of a pseudo-anomalous copy
(Dice loss). ``residual_mode``:

* ``joint`` — both in every iteration; the stop-gradient isolates the head (§13.9).
* ``two_stage`` — ``epochs`` of normal-pattern modelling, then ``head_epochs`` for the head alone
  with everything else frozen (§13.9).
* ``off`` — conference INP-Former.

Resumable: a checkpoint (model, optimiser, RNG, schedule, position inside the epoch) is written
every ``checkpoint_every`` iterations and at each epoch end. Each epoch's sample order comes from a
generator seeded with (seed, epoch) and the dataset is told the epoch (``set_epoch``), so a resumed
run draws exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from components.anomaly_map import fused_map, image_score, inp_distance_map, postprocess, reconstruction_map
from components.checkpoint import latest_checkpoint, load_train_state, save_train_checkpoint
from components.losses import DiceLoss, NormalPatternLoss
from components.optim import StableAdamW, WarmCosineSchedule, clip_grad_norm

logger = logging.getLogger(__name__)

__all__ = ["MAP_KINDS", "InferenceResult", "TrainConfig", "predict", "score_batch", "seed_everything", "train"]


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
    """Training settings (defaults: the official code, spec §9)."""

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
    num_workers: int = 0
    drop_last: bool = True
    checkpoint_every: int = 0
    log_every: int = 10
    progress: bool = True

    def __post_init__(self) -> None:
        if self.residual_mode not in ("joint", "two_stage", "off"):
            msg = f"residual_mode must be joint, two_stage or off, got {self.residual_mode!r}."
            raise ValueError(msg)
        if self.amp not in ("none", "bf16"):
            msg = f"amp must be 'none' or 'bf16', got {self.amp!r}."
            raise ValueError(msg)
        if self.epochs < 1 or self.batch_size < 1:
            msg = f"epochs and batch_size must be >= 1, got {self.epochs}, {self.batch_size}."
            raise ValueError(msg)


class _EpochSampler(Sampler[list[int]]):
    """Batches of one epoch from a (seed, epoch)-seeded permutation, starting at batch ``skip``."""

    def __init__(self, n: int, batch_size: int, drop_last: bool, seed: int, epoch: int, skip: int) -> None:
        g = torch.Generator().manual_seed(seed * 100_003 + epoch)
        order = torch.randperm(n, generator=g).tolist()
        stop = (n // batch_size) * batch_size if drop_last else n
        self.batches = [order[i : i + batch_size] for i in range(0, stop, batch_size)][skip:]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


@dataclass
class _Phase:
    name: str  # "main" (L_npm [+ joint seg]) or "head" (two-stage head training)
    epochs: int


def _phases(cfg: TrainConfig, has_head: bool) -> list[_Phase]:
    phases = [_Phase("main", cfg.epochs)]
    if cfg.residual_mode == "two_stage" and has_head and cfg.head_epochs > 0:
        phases.append(_Phase("head", cfg.head_epochs))
    return phases


def _autocast(cfg: TrainConfig, device: torch.device):
    if cfg.amp == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


def _make_optimizer(cfg: TrainConfig, groups: list[dict]) -> StableAdamW:
    return StableAdamW(
        groups,
        lr=cfg.lr,
        betas=cfg.betas,
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        amsgrad=cfg.amsgrad,
        clip_threshold=cfg.clip_threshold,
    )


def train(
    model: Any,
    dataset: Dataset,
    cfg: TrainConfig,
    loss_fn: NormalPatternLoss,
    dice: DiceLoss | None = None,
    checkpoint_dir: str | Path | None = None,
    model_config: dict[str, Any] | None = None,
    resume: bool = True,
    on_iteration: Callable[[dict[str, float]], None] | None = None,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
) -> dict[str, Any]:
    """Train ``model`` (an :class:`~components.model.InpFormer`) on ``dataset``.

    The dataset yields dicts with ``image`` (3×H×W, normalised) and, for residual learning,
    ``anomaly_image`` (3×H×W) and ``anomaly_mask`` (1×H×W in {0, 1}); it may define
    ``set_epoch(epoch)`` for reproducible per-epoch synthesis.

    Returns a summary: per-epoch mean losses, iterations run, wall time, whether it resumed.
    """
    device = torch.device(cfg.device)
    model.to(device)
    dice = dice or DiceLoss()
    has_head = model.seg_head is not None and cfg.residual_mode != "off"
    phases = _phases(cfg, has_head)
    n = len(dataset)  # type: ignore[arg-type]
    per_epoch = n // cfg.batch_size if cfg.drop_last else math.ceil(n / cfg.batch_size)
    if per_epoch < 1:
        msg = f"{n} training images give no full batch of {cfg.batch_size}: lower train.batch_size or add images."
        raise ValueError(msg)
    model_config = model_config or {}
    history: list[dict[str, float]] = []
    progress: dict[str, Any] = {"phase": 0, "epoch": 0, "batch": 0, "global_iteration": 0, "history": history}
    resumed = False
    phase_idx = 0
    optimizer, schedule = None, None
    ckpt = latest_checkpoint(checkpoint_dir) if (checkpoint_dir and resume) else None
    if ckpt is not None:
        saved = json.loads((ckpt / "train_state.json").read_text())["progress"]
        phase_idx = int(saved["phase"])
    start_time = time.time()
    while phase_idx < len(phases):
        phase = phases[phase_idx]
        optimizer, schedule, trainable = _setup_phase(model, cfg, phase, per_epoch, has_head)
        if ckpt is not None:
            progress = load_train_state(ckpt, model, optimizer, str(device))
            history = progress["history"]
            schedule.load_state_dict({"iteration": progress["phase_iteration"]})
            resumed = True
            logger.info("Resumed from %s (epoch %d, batch %d)", ckpt, progress["epoch"], progress["batch"])
            ckpt = None
        else:
            progress.update(phase=phase_idx, epoch=0, batch=0, phase_iteration=0)
        _run_phase(
            model, dataset, cfg, phase, phase_idx, progress, history, optimizer, schedule, trainable,
            loss_fn, dice, has_head, device, checkpoint_dir, model_config, on_iteration, on_epoch,
        )  # fmt: skip
        phase_idx += 1
    return {
        "history": history,
        "iterations": progress["global_iteration"],
        "iterations_per_epoch": per_epoch,
        "seconds": time.time() - start_time,
        "resumed": resumed,
        "final_lr": schedule.lr_at(schedule.iteration) if schedule else None,
    }


def _setup_phase(model: Any, cfg: TrainConfig, phase: _Phase, per_epoch: int, has_head: bool):
    trunk, head = model.trunk_parameters(), model.head_parameters()
    if phase.name == "main":
        for p in trunk:
            p.requires_grad_(True)
        groups = [{"params": trunk, "name": "trunk"}]
        if has_head and cfg.residual_mode == "joint":
            groups.append({"params": head, "name": "head", "lr_scale": cfg.head_lr_scale})
        for p in head:
            p.requires_grad_(has_head and cfg.residual_mode == "joint")
    else:
        for p in trunk:
            p.requires_grad_(False)
        for p in head:
            p.requires_grad_(True)
        groups = [{"params": head, "name": "head", "lr_scale": cfg.head_lr_scale}]
    optimizer = _make_optimizer(cfg, groups)
    total = phase.epochs * per_epoch
    schedule = WarmCosineSchedule(optimizer, cfg.lr, cfg.final_lr, total, min(cfg.warmup_iters, total))
    trainable = [p for g in groups for p in g["params"]]
    return optimizer, schedule, trainable


def _run_phase(
    model, dataset, cfg, phase, phase_idx, progress, history, optimizer, schedule, trainable,
    loss_fn, dice, has_head, device, checkpoint_dir, model_config, on_iteration, on_epoch,
) -> None:  # fmt: skip
    from tqdm.auto import tqdm

    joint = phase.name == "main" and has_head and cfg.residual_mode == "joint"
    head_only = phase.name == "head"
    trunk_ids = {id(p) for p in model.trunk_parameters()}
    trunk_params = [p for p in trainable if id(p) in trunk_ids]
    head_params = [p for p in trainable if id(p) not in trunk_ids]
    for epoch in range(int(progress["epoch"]), phase.epochs):
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch + 10_000 * phase_idx)
        sampler = _EpochSampler(len(dataset), cfg.batch_size, cfg.drop_last, cfg.seed, epoch, progress["batch"])
        loader = DataLoader(
            dataset, batch_sampler=sampler, num_workers=cfg.num_workers, pin_memory=device.type == "cuda"
        )
        sums: dict[str, float] = {}
        count = 0
        model.train()
        bar = tqdm(
            loader,
            total=len(sampler),
            desc=f"{phase.name} epoch {epoch + 1}/{phase.epochs}",
            disable=not cfg.progress,
            leave=False,
        )
        for batch in bar:
            lr = optimizer.param_groups[0]["lr"]
            with _autocast(cfg, device):
                values = _step_losses(model, batch, loss_fn, dice, device, joint, head_only, cfg)
            optimizer.zero_grad(set_to_none=True)
            values["total"].backward()
            clip_grad_norm(trunk_params, cfg.grad_clip)
            clip_grad_norm(head_params, cfg.head_grad_clip)
            optimizer.step()
            schedule.step()
            logs = {k: float(v.detach()) for k, v in values.items()}
            logs["lr"] = lr
            for k, v in logs.items():
                sums[k] = sums.get(k, 0.0) + v
            count += 1
            progress["batch"] += 1
            progress["global_iteration"] += 1
            progress["phase_iteration"] = schedule.iteration
            if not math.isfinite(logs["total"]):
                msg = f"loss became {logs['total']} at iteration {progress['global_iteration']}."
                raise FloatingPointError(msg)
            if on_iteration is not None:
                on_iteration({**logs, "iteration": progress["global_iteration"], "phase": phase.name})
            bar.set_postfix(loss=f"{logs['total']:.4f}", lr=f"{lr:.2e}")
            if checkpoint_dir and cfg.checkpoint_every and progress["global_iteration"] % cfg.checkpoint_every == 0:
                save_train_checkpoint(checkpoint_dir, model, model_config, optimizer, progress)
        means = {k: v / max(count, 1) for k, v in sums.items()}
        means.update(epoch=epoch + 1, phase=phase.name)
        history.append(means)
        progress.update(epoch=epoch + 1, batch=0)
        if checkpoint_dir:
            save_train_checkpoint(checkpoint_dir, model, model_config, optimizer, progress)
        if on_epoch is not None:
            on_epoch(means)
        logger.info("%s epoch %d/%d: %s", phase.name, epoch + 1, phase.epochs, _fmt(means))


def _fmt(values: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:.4g}" for k, v in values.items() if isinstance(v, float))


def _step_losses(model, batch, loss_fn, dice, device, joint, head_only, cfg) -> dict[str, torch.Tensor]:
    values: dict[str, torch.Tensor] = {}
    if not head_only:
        if "features" in batch:  # cached encoder outputs (components.feature_cache)
            out = model.forward_cached(batch["features"].to(device, non_blocking=True))
        else:
            out = model(batch["image"].to(device, non_blocking=True))
        values = loss_fn(out)
    if joint or head_only:
        if "anomaly_image" not in batch and "anomaly_features" not in batch:
            msg = "residual learning needs 'anomaly_image'/'anomaly_mask' in the batch (enable synthesis)."
            raise KeyError(msg)
        mask = batch["anomaly_mask"].to(device, non_blocking=True)
        with torch.no_grad():  # the residual is detached (§13.3): no trunk graph is needed
            if "anomaly_features" in batch:
                out_a = model.forward_cached(batch["anomaly_features"].to(device, non_blocking=True))
            else:
                out_a = model(batch["anomaly_image"].to(device, non_blocking=True))
        probs = torch.sigmoid(model.segment(out_a, size=tuple(mask.shape[-2:])).float())
        seg = dice(probs, mask.float())
        values["seg"] = seg
        values["total"] = values["total"] + cfg.seg_weight * seg if "total" in values else cfg.seg_weight * seg
    return values


@dataclass
class InferenceResult:
    """Outputs of :func:`predict` for a whole dataset (numpy, post-processed)."""

    maps: np.ndarray  # N×R×R float32 anomaly maps after resize + blur
    scores: np.ndarray  # N image scores
    labels: np.ndarray  # N labels (0 normal, 1 anomalous; -1 when unknown)
    masks: np.ndarray | None  # N×R×R uint8 ground truth, binarised at 0.5 (None when absent)
    paths: list[str] = field(default_factory=list)
    categories: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """Plain dict (for logging)."""
        return asdict(self)


MAP_KINDS = ("reconstruction", "fused", "inp_distance")


def _check_map_kind(map_kind: str) -> None:
    if map_kind not in MAP_KINDS:
        msg = f"map_kind must be one of {MAP_KINDS}, got {map_kind!r}."
        raise ValueError(msg)


@torch.no_grad()
def score_batch(
    model: Any,
    images: torch.Tensor,
    map_kind: str = "reconstruction",
    resize: int | None = 256,
    blur_kernel: int = 5,
    blur_sigma: float = 4.0,
    top_ratio: float = 0.01,
    fused_l2_norm: str = "none",
) -> tuple[torch.Tensor, torch.Tensor]:
    """images B×3×H×W → (post-processed maps B×1×R×R, image scores B) (spec §11–§13.8)."""
    _check_map_kind(map_kind)
    size = tuple(images.shape[-2:])
    out = model(images)
    if map_kind == "reconstruction":
        amap = reconstruction_map(out.encoder_groups, out.decoder_groups, size)
    elif map_kind == "inp_distance":
        amap = inp_distance_map(out.fused_features, out.prototypes, out.grid, size)
    else:
        seg = torch.sigmoid(model.segment(out, size)) if model.seg_head is not None else None
        amap = fused_map(out.encoder_groups, out.decoder_groups, seg, size, fused_l2_norm)
    amap = postprocess(amap.float(), resize, blur_kernel, blur_sigma)
    return amap, image_score(amap, top_ratio)


@torch.no_grad()
def predict(
    model: Any,
    dataset: Dataset,
    map_kind: str = "reconstruction",
    batch_size: int = 16,
    device: str = "cpu",
    resize: int | None = 256,
    blur_kernel: int = 5,
    blur_sigma: float = 4.0,
    top_ratio: float = 0.01,
    fused_l2_norm: str = "none",
    num_workers: int = 0,
    progress: bool = True,
) -> InferenceResult:
    """Anomaly maps and image scores for every sample of ``dataset`` (spec §11–§13.8).

    Args:
        map_kind: ``reconstruction`` (conference, §12), ``fused`` (++ with the seg head, §13.8) or
            ``inp_distance`` (zero-shot, §11).
    """
    from tqdm.auto import tqdm

    _check_map_kind(map_kind)
    model.to(device).eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    maps, scores, labels, masks, paths, cats = [], [], [], [], [], []
    for batch in tqdm(loader, desc="predict", disable=not progress, leave=False):
        images = batch["image"].to(device)
        amap, score = score_batch(model, images, map_kind, resize, blur_kernel, blur_sigma, top_ratio, fused_l2_norm)
        scores.append(score.cpu())
        maps.append(amap[:, 0].cpu())
        labels.append(torch.as_tensor(batch.get("label", torch.full((len(images),), -1))).cpu())
        if "mask" in batch:
            gt = batch["mask"].float()
            if resize:
                gt = torch.nn.functional.interpolate(gt, size=(resize, resize), mode="nearest")
            if gt.shape[1] > 1:
                gt = gt.max(dim=1, keepdim=True).values
            masks.append((gt[:, 0] > 0.5).to(torch.uint8))
        paths.extend(batch.get("path", []))
        cats.extend(batch.get("category", []))
    return InferenceResult(
        maps=torch.cat(maps).numpy().astype(np.float32),
        scores=torch.cat(scores).numpy().astype(np.float64),
        labels=torch.cat(labels).numpy().astype(np.int64),
        masks=torch.cat(masks).numpy() if masks else None,
        paths=list(paths),
        categories=list(cats),
    )
