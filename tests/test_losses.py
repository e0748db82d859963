"""Losses against closed-form values on hand-made tensors."""

from __future__ import annotations

import math

import pytest
import torch

from components.engine.losses import (
    DiceLoss,
    HardCoherenceLoss,
    NormalPatternLoss,
    SoftCoherenceLoss,
    SoftMiningLoss,
    scale_grad,
)


def test_hard_coherence_closed_form() -> None:
    # tokens e1, e2, (e1+e2); one INP = e1 → distances 0, 1, 1 − 1/√2
    f = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]])
    p = torch.tensor([[[2.0, 0.0]]])
    want = (0 + 1 + (1 - 1 / math.sqrt(2))) / 3
    assert float(HardCoherenceLoss()(f, p)) == pytest.approx(want, abs=1e-7)
    # a second INP along e2 picks the nearest: distances 0, 0, 1 − 1/√2
    p2 = torch.tensor([[[2.0, 0.0], [0.0, 3.0]]])
    assert float(HardCoherenceLoss()(f, p2)) == pytest.approx((1 - 1 / math.sqrt(2)) / 3, abs=1e-7)


def test_soft_coherence_closed_form() -> None:
    f = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    p = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    # weights: softmax([1, 0]) = [e/(e+1), 1/(e+1)] → F̂ rows (a, b) and (b, a)
    a, b = math.e / (math.e + 1), 1 / (math.e + 1)
    recon = torch.tensor([a, b, b, a])
    cos = float(torch.dot(torch.tensor([1.0, 0, 0, 1]), recon) / (math.sqrt(2) * recon.norm()))
    assert float(SoftCoherenceLoss()(f, p)) == pytest.approx(1 - cos, abs=1e-7)
    with pytest.raises(ValueError, match="temperature"):
        SoftCoherenceLoss(temperature=0)


def test_soft_mining_value_is_global_cosine_per_sample() -> None:
    # sample 0: D = E → cos 1; sample 1: D ⟂ E → cos 0. Mean loss per group = 0.5
    e = torch.zeros(2, 2, 1, 2)
    e[:, 0] = 1.0
    d = torch.zeros(2, 2, 1, 2)
    d[0, 0] = 1.0
    d[1, 1] = 1.0
    loss = SoftMiningLoss(gamma=3.0)([e, e], [d, d])
    assert float(loss) == pytest.approx(0.5, abs=1e-7)


def test_gradient_reweighting_equals_w_times_unweighted() -> None:
    torch.manual_seed(0)
    e = torch.randn(2, 5, 3, 4)
    d0 = torch.randn(2, 5, 3, 4)
    d_plain = d0.clone().requires_grad_(True)
    SoftMiningLoss(gamma=0.0)([e], [d_plain]).backward()
    d_w = d0.clone().requires_grad_(True)
    SoftMiningLoss(gamma=3.0)([e], [d_w]).backward()
    # independent weights: per-position cosine distance over channels, normalised by its mean, cubed
    en, dn = e / e.norm(dim=1, keepdim=True), d0 / d0.norm(dim=1, keepdim=True)
    dist = 1 - (en * dn).sum(dim=1, keepdim=True)
    w = (dist / dist.mean()) ** 3
    assert torch.allclose(d_w.grad, w * d_plain.grad, rtol=1e-5, atol=1e-9)
    assert not torch.allclose(d_w.grad, d_plain.grad)


def test_scale_grad_identity_forward() -> None:
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    y = scale_grad(x, torch.tensor([3.0, 0.5]))
    assert torch.equal(y, x)
    (y * torch.tensor([1.0, 1.0])).sum().backward()
    assert torch.equal(x.grad, torch.tensor([3.0, 0.5]))


def test_mse_branch_value_and_separate_weights() -> None:
    e = torch.zeros(1, 2, 1, 2)
    d = torch.zeros(1, 2, 1, 2)
    d[0, :, 0, 0] = torch.tensor([1.0, 1.0])  # squared error 2 (sum) at position 0, 0 at position 1
    d[0, :, 0, 1] = torch.tensor([0.0, 0.0])
    e[0, :, 0, 1] = torch.tensor([3.0, 4.0])
    d[0, :, 0, 1] = torch.tensor([3.0, 4.0])
    e[0, :, 0, 0] = torch.tensor([1.0, 0.0])
    # position 0: (E − D)² = (0, 1) → sum 1, mean 0.5; position 1: 0
    lsum = SoftMiningLoss(gamma=1.0, mse_weight=2.0, mse_reduction="sum").terms([e], [d])["mse"]
    lmean = SoftMiningLoss(gamma=1.0, mse_weight=2.0, mse_reduction="mean").terms([e], [d])["mse"]
    assert float(lsum) == pytest.approx(2.0 * (1 + 0) / 2)
    assert float(lmean) == pytest.approx(2.0 * (0.5 + 0) / 2)
    # the MSE gradient is scaled by (M / mean M)^γ: position 0 weight 2, position 1 weight 0
    dd = d.clone().requires_grad_(True)
    SoftMiningLoss(gamma=0.0, mse_weight=1.0, mse_gamma=1.0, mse_reduction="sum").terms([e], [dd])["mse"].backward()
    plain = dd.clone().detach().requires_grad_(True)
    ((e - plain) ** 2).sum(dim=1).mean().backward()
    weights = torch.tensor([2.0, 0.0]).view(1, 1, 1, 2)
    assert torch.allclose(dd.grad, weights * plain.grad, atol=1e-6)
    assert not torch.allclose(dd.grad, plain.grad)


def test_dice_closed_form() -> None:
    g = torch.zeros(2, 1, 2, 2)
    g[0, 0, 0, 0] = 1
    g[1, 0, :, 0] = 1
    p = torch.full((2, 1, 2, 2), 0.5)
    # image 0: 1 − 2·0.5/(4·0.25 + 1) = 0.5 ; image 1: 1 − 2·1/(1 + 2) = 1/3
    assert float(DiceLoss(eps=0.0)(p, g)) == pytest.approx((0.5 + 1 / 3) / 2)
    assert float(DiceLoss(eps=0.0)(g, g)) == pytest.approx(0.0)
    # only anomalous images supervise the head (ISSUE #39): an empty target is ignored
    g2 = g.clone()
    g2[1] = 0
    assert float(DiceLoss(eps=0.0)(p, g2)) == pytest.approx(0.5)
    empty = DiceLoss()(p.requires_grad_(True), torch.zeros_like(g))
    assert float(empty) == 0.0
    empty.backward()
    with pytest.raises(ValueError, match="differ"):
        DiceLoss()(p, g[:, :, :1])


def test_normal_pattern_loss_combines_terms() -> None:
    class Out:
        encoder_groups = [torch.randn(2, 4, 2, 2)]
        decoder_groups = [torch.randn(2, 4, 2, 2)]
        fused_features = torch.randn(2, 4, 4)
        prototypes = torch.randn(2, 3, 4)

    o = Out()
    t = NormalPatternLoss(gamma=3, lam=0.2, coherence="hard")(o)
    assert float(t["total"]) == pytest.approx(float(t["cos"] + 0.2 * t["coherence"]), rel=1e-6)
    hc = HardCoherenceLoss()(o.fused_features, o.prototypes)
    assert float(t["coherence"]) == pytest.approx(float(hc))
    ts = NormalPatternLoss(lam=0.5, coherence="soft")(o)
    assert float(ts["coherence"]) == pytest.approx(float(SoftCoherenceLoss()(o.fused_features, o.prototypes)))
    with pytest.raises(ValueError, match="coherence"):
        NormalPatternLoss(coherence="medium")


def test_dice_sync_free_branch_matches() -> None:
    """The GPU branch of the Dice loss (no host sync) gives the same value and gradient."""
    torch.manual_seed(0)
    target = torch.zeros(4, 1, 8, 8)
    target[1, :, :4, :4] = 1
    target[3, :, 2:, 2:] = 1
    for t in (target, torch.zeros_like(target)):  # with anomalies, and none at all
        logits = torch.randn(4, 1, 8, 8, requires_grad=True)
        official, fused = DiceLoss(), DiceLoss()
        fused.sync_free = True
        a = official(torch.sigmoid(logits), t)
        (ga,) = torch.autograd.grad(a, logits)
        b = fused(torch.sigmoid(logits), t)
        (gb,) = torch.autograd.grad(b, logits)
        assert float(a) == pytest.approx(float(b), rel=1e-6, abs=1e-7)
        assert torch.allclose(ga, gb, rtol=1e-5, atol=1e-7)
