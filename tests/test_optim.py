"""StableAdamW and the warm-cosine schedule against hand computations and the spec's anchors (§9, §17)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from components.engine.optim import StableAdamW, WarmCosineSchedule, clip_grad_norm


def _hand_steps(p0, grads, lr, betas=(0.9, 0.999), eps=1e-10, wd=1e-4, clip=1.0):
    """Spec §9.1 written out in numpy float64."""
    p = np.array(p0, dtype=np.float64)
    m = np.zeros_like(p)
    v = np.zeros_like(p)
    vmax = np.zeros_like(p)
    for t, g in enumerate(grads, start=1):
        g = np.asarray(g, dtype=np.float64)
        p = p * (1 - lr * wd)
        m = betas[0] * m + (1 - betas[0]) * g
        v = betas[1] * v + (1 - betas[1]) * g * g
        vmax = np.maximum(vmax, v)
        denom = np.sqrt(vmax) / math.sqrt(1 - betas[1] ** t) + eps
        r = math.sqrt(np.mean((g / denom) ** 2))
        step = lr / (1 - betas[0] ** t) / max(1.0, r / clip)
        p = p - step * m / denom
    return p


def test_stable_adamw_matches_hand_computation() -> None:
    p0 = [0.5, -1.0, 2.0, 0.25]
    grads = [[0.1, -0.2, 0.3, 0.0], [0.4, 0.1, -0.5, 0.2], [-0.3, 0.05, 0.1, 0.9]]
    param = torch.nn.Parameter(torch.tensor(p0, dtype=torch.float64))
    opt = StableAdamW([param], lr=1e-2)
    for g in grads:
        param.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
    assert np.allclose(param.detach().numpy(), _hand_steps(p0, grads, 1e-2), rtol=0, atol=1e-12)


def test_stable_adamw_update_clipping_engages() -> None:
    # one step: g/denom ≈ ±1/√(1−β2)·√(1−β2) → RMS ≈ 1 ... a single huge outlier pushes RMS > clip
    p0 = [0.0] * 4
    grads = [[1.0, 1.0, 1.0, 1.0]]
    out = _hand_steps(p0, grads, 0.1, clip=0.5)
    param = torch.nn.Parameter(torch.zeros(4, dtype=torch.float64))
    opt = StableAdamW([param], lr=0.1, clip_threshold=0.5)
    param.grad = torch.ones(4, dtype=torch.float64)
    opt.step()
    assert np.allclose(param.detach().numpy(), out, atol=1e-12)
    assert abs(out[0]) < 0.1 * 0.999  # clipped: less than the unclipped Adam step lr


def test_schedule_sanity_anchors() -> None:
    # MVTec multi-class: T = 200 epochs × 226 it = 45,200 (spec §17)
    opt = StableAdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    sched = WarmCosineSchedule(opt, base=1e-3, final=1e-4, total_iters=45_200, warmup_iters=100)
    assert opt.param_groups[0]["lr"] == 0.0  # iteration 0 runs with lr 0
    assert sched.lr_at(99) == pytest.approx(1e-3)
    assert sched.lr_at(100) == pytest.approx(1e-3)
    assert sched.lr_at(100 + 22_550) == pytest.approx(5.5e-4, rel=1e-9)
    assert sched.lr_at(45_199) == pytest.approx(1e-4, rel=1e-6)
    assert sched.lr_at(50_000) == 1e-4
    assert sched.lr_at(50) == pytest.approx(50 / 99 * 1e-3)
    for _ in range(100):
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3)
    state = sched.state_dict()
    sched2 = WarmCosineSchedule(opt, 1e-3, 1e-4, 45_200, 100)
    sched2.load_state_dict(state)
    assert opt.param_groups[0]["lr"] == pytest.approx(sched.lr_at(100))


def test_lr_scale_per_group() -> None:
    a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = StableAdamW([{"params": [a]}, {"params": [b], "lr_scale": 0.5}])
    sched = WarmCosineSchedule(opt, 1e-3, 1e-4, 10, 0)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3) and opt.param_groups[1]["lr"] == pytest.approx(5e-4)
    for _ in range(4):
        sched.step()
    want = 1e-4 + 0.5 * (1e-3 - 1e-4) * (1 + math.cos(math.pi * 4 / 10))  # closed-form cosine at j = 4 of 10
    assert opt.param_groups[0]["lr"] == pytest.approx(want)
    assert opt.param_groups[1]["lr"] == pytest.approx(0.5 * want)


def test_global_gradient_clipping() -> None:
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(1))
    a.grad, b.grad = torch.tensor([3.0, 0.0]), torch.tensor([4.0])
    norm = clip_grad_norm([a, b], 0.1)
    assert norm == pytest.approx(5.0)
    assert float(torch.cat([a.grad, b.grad]).norm()) == pytest.approx(0.1, rel=1e-5)


def test_bad_settings() -> None:
    with pytest.raises(ValueError):
        StableAdamW([torch.nn.Parameter(torch.zeros(1))], betas=(1.0, 0.9))
    with pytest.raises(ValueError):
        WarmCosineSchedule(StableAdamW([torch.nn.Parameter(torch.zeros(1))]), 1e-3, 1e-4, 0)


def test_sync_free_update_matches_the_official_one() -> None:
    """The GPU branch of StableAdamW (no host sync per parameter) against the official float path."""
    torch.manual_seed(0)
    weights = [torch.nn.Parameter(torch.randn(5, 7)), torch.nn.Parameter(torch.randn(3))]
    twins = [torch.nn.Parameter(w.detach().clone()) for w in weights]
    official, fused = StableAdamW(weights, lr=1e-2, clip_threshold=0.5), StableAdamW(twins, lr=1e-2, clip_threshold=0.5)
    fused.sync_free = True
    for step in range(4):
        grads = [torch.randn_like(w) * (10.0 if step == 1 else 1.0) for w in weights]  # step 1: clipped
        for w, t, g in zip(weights, twins, grads):
            w.grad, t.grad = g.clone(), g.clone()
        official.step()
        fused.step()
    for w, t in zip(weights, twins):
        assert torch.allclose(w, t, rtol=1e-6, atol=1e-7)
