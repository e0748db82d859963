"""Optimiser and learning-rate schedule of the official INP-Former code (method spec §9).

StableAdamW here is the authors' variant (not optimi's nor pytorch_optimizer's): decoupled decay
with the current lr, AMSGrad second moment, and an update clipped per tensor by the RMS of
g / denom computed from the *current* gradient (spec §9.1).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.optim import Optimizer

if TYPE_CHECKING:
    from components.engine.train_config import TrainConfig
    from components.model import InpFormer

__all__ = ["StableAdamW", "WarmCosineSchedule", "clip_grad_norm", "phase_optimizer"]


class StableAdamW(Optimizer):
    """StableAdamW, spec §9.1. Per tensor and step t:

    1. p ← p·(1 − lr·wd)
    2. m ← β1 m + (1−β1) g;  v ← β2 v + (1−β2) g²;  v̂ ← max(v̂, v) (AMSGrad)
    3. denom = sqrt(v̂)/sqrt(1 − β2^t) + eps
    4. r = RMS(g / denom)
    5. p ← p − lr / (1 − β1^t) / max(1, r / clip_threshold) · m / denom
    """

    def __init__(
        self,
        params: Iterable[torch.nn.Parameter] | Iterable[dict],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-10,
        weight_decay: float = 1e-4,
        amsgrad: bool = True,
        clip_threshold: float = 1.0,
    ) -> None:
        self.sync_free: bool | None = None  # None: on CUDA; True/False force the branch (tests)
        if lr < 0 or eps < 0 or weight_decay < 0 or clip_threshold <= 0:
            msg = f"invalid StableAdamW settings lr={lr} eps={eps} wd={weight_decay} clip={clip_threshold}"
            raise ValueError(msg)
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            msg = f"betas must be in [0, 1), got {betas}."
            raise ValueError(msg)
        defaults = {
            "lr": lr,
            "betas": tuple(betas),
            "eps": eps,
            "weight_decay": weight_decay,
            "amsgrad": amsgrad,
            "clip_threshold": clip_threshold,
        }
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        """Perform one optimisation step."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, eps = group["lr"], group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if grad.is_sparse:
                    raise RuntimeError("StableAdamW does not support sparse gradients.")
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                    if group["amsgrad"]:
                        state["max_exp_avg_sq"] = torch.zeros_like(p)
                p.mul_(1.0 - lr * group["weight_decay"])
                state["step"] += 1
                t = state["step"]
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
                second = exp_avg_sq
                if group["amsgrad"]:
                    torch.maximum(state["max_exp_avg_sq"], exp_avg_sq, out=state["max_exp_avg_sq"])
                    second = state["max_exp_avg_sq"]
                denom = (second.sqrt() / math.sqrt(1.0 - beta2**t)).add_(eps)
                if grad.is_cuda if self.sync_free is None else self.sync_free:  # no host sync per parameter
                    rms_t = (grad / denom).norm(2) / math.sqrt(grad.numel())
                    scale = (rms_t / group["clip_threshold"]).clamp_min(1.0)
                    p.addcdiv_(exp_avg * (-lr / (1.0 - beta1**t) / scale), denom)
                    continue
                rms = float((grad / denom).norm(2)) / math.sqrt(grad.numel())
                step_size = lr / (1.0 - beta1**t) / max(1.0, rms / group["clip_threshold"])
                p.addcdiv_(exp_avg, denom, value=-step_size)
        return loss


class WarmCosineSchedule:
    """Per-iteration warmup + cosine schedule (spec §9.2), set on every param group.

    Iterations 0..W−1 ramp linearly (numpy linspace) from ``start_warmup`` to ``base``; iteration
    W + j uses final + ½(base − final)(1 + cos(π j / (T − W))); iterations ≥ T use ``final``.
    Call :meth:`step` once after every optimiser step. The lr for iteration 0 is set at construction.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        base: float,
        final: float,
        total_iters: int,
        warmup_iters: int = 100,
        start_warmup: float = 0.0,
    ) -> None:
        if total_iters < 1 or warmup_iters < 0:
            msg = f"total_iters must be >= 1 and warmup_iters >= 0, got {total_iters}, {warmup_iters}."
            raise ValueError(msg)
        self.optimizer = optimizer
        self.base, self.final = base, final
        self.total_iters, self.warmup_iters = total_iters, warmup_iters
        warm = np.linspace(start_warmup, base, warmup_iters)
        iters = np.arange(max(total_iters - warmup_iters, 0))
        cosine = final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / max(len(iters), 1)))
        self.schedule = np.concatenate((warm, cosine))
        self.iteration = 0
        self._apply()

    def lr_at(self, iteration: int) -> float:
        """Learning rate of a given iteration."""
        if iteration >= len(self.schedule):
            return float(self.final)
        return float(self.schedule[iteration])

    def _apply(self) -> None:
        lr = self.lr_at(self.iteration)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)

    def step(self) -> None:
        """Advance one iteration."""
        self.iteration += 1
        self._apply()

    def state_dict(self) -> dict:
        """Resumable state."""
        return {"iteration": self.iteration}

    def load_state_dict(self, state: dict) -> None:
        """Restore the iteration counter."""
        self.iteration = int(state["iteration"])
        self._apply()


def clip_grad_norm(params: Iterable[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """Global L2 gradient clipping (spec §9.3); returns the pre-clip norm (a tensor: no host sync)."""
    params = [p for p in params if p.grad is not None]
    if not params or max_norm <= 0:
        return torch.zeros(())
    return torch.nn.utils.clip_grad_norm_(params, max_norm)


def phase_optimizer(
    model: InpFormer, cfg: TrainConfig, name: str, total_iters: int
) -> tuple[StableAdamW, WarmCosineSchedule]:
    """Freeze what phase ``name`` (``main`` or ``head``) does not train; the optimiser and schedule of the rest."""
    trunk, head = model.trunk_parameters(), model.head_parameters()
    train_head = name == "head" or cfg.residual_mode == "joint"
    for p in trunk:
        p.requires_grad_(name == "main")
    for p in head:
        p.requires_grad_(train_head)
    groups = [{"params": trunk, "name": "trunk"}] if name == "main" else []
    if train_head:
        groups.append({"params": head, "name": "head", "lr_scale": cfg.head_lr_scale})
    optimizer = StableAdamW(
        groups,
        lr=cfg.lr,
        betas=cfg.betas,
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        amsgrad=cfg.amsgrad,
        clip_threshold=cfg.clip_threshold,
    )
    schedule = WarmCosineSchedule(optimizer, cfg.lr, cfg.final_lr, total_iters, min(cfg.warmup_iters, total_iters))
    return optimizer, schedule
