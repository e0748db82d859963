"""Anomaly maps, post-processing and image scores (spec §11, §12, §13.8, §17 anchors)."""

from __future__ import annotations

import math

import pytest
import torch

from components.scoring.anomaly_map import (
    fused_map,
    gaussian_blur,
    gaussian_kernel,
    image_score,
    inp_distance_map,
    postprocess,
    reconstruction_map,
)


def test_gaussian_kernel_anchors() -> None:
    k = gaussian_kernel(5, 4.0)
    one_d = k.sum(dim=1)
    assert torch.allclose(one_d, torch.tensor([0.18763, 0.20607, 0.21261, 0.20607, 0.18763]), atol=1e-5)
    assert float(k[2, 2]) == pytest.approx(0.0452, abs=1e-4)
    assert float(k[0, 0]) == pytest.approx(0.0352, abs=1e-4)
    assert float(k.sum()) == pytest.approx(1.0, abs=1e-6)


def test_blur_zero_padding_loses_mass_at_borders() -> None:
    ones = torch.ones(1, 1, 8, 8)
    out = gaussian_blur(ones)
    assert float(out[0, 0, 4, 4]) == pytest.approx(1.0, abs=1e-6)
    corner = float(gaussian_kernel()[2:, 2:].sum())  # only a quarter-and-a-bit of the kernel sees data
    assert float(out[0, 0, 0, 0]) == pytest.approx(corner, abs=1e-6)


def test_top_one_percent_score() -> None:
    m = torch.zeros(1, 1, 256, 256)
    flat = m.view(-1)
    flat[:655] = 2.0  # ⌊0.01 · 65536⌋ = 655 pixels (spec §17)
    flat[655:700] = 1.0
    assert float(image_score(m, 0.01)) == pytest.approx(2.0)
    flat[0] = 657.0
    assert float(image_score(m, 0.01)) == pytest.approx((654 * 2 + 657) / 655)
    assert float(image_score(m, 0.0)) == 657.0  # ratio 0 → max


def test_reconstruction_map_closed_form() -> None:
    e = torch.zeros(1, 2, 2, 2)
    e[:, 0] = 1.0
    d = e.clone()
    d[0, :, 0, 0] = torch.tensor([0.0, 1.0])  # orthogonal at one position → distance 1
    m = reconstruction_map([e, e], [d, e], (2, 2))
    # group 0: distance 1 at (0, 0), group 1: zeros → mean 0.5 at (0, 0)
    assert torch.allclose(m[0, 0], torch.tensor([[0.5, 0.0], [0.0, 0.0]]))
    big = reconstruction_map([e], [d], (3, 3))
    assert float(big[0, 0, 0, 0]) == pytest.approx(1.0)  # align_corners=True keeps the corner value
    assert float(big[0, 0, 0, 1]) == pytest.approx(0.5)


def test_fused_map_formula() -> None:
    e = torch.zeros(1, 4, 1, 1)
    e[0, :, 0, 0] = torch.tensor([3.0, 0, 0, 0])
    d = torch.zeros(1, 4, 1, 1)
    d[0, :, 0, 0] = torch.tensor([0.0, 4.0, 0, 0])
    seg = torch.full((1, 1, 1, 1), 0.2)
    # ½[(1 − 0) + ‖(3, −4)‖ = 5] = 3 ; fused = (3 + 0.2) / 2
    assert float(fused_map([e], [d], seg, (1, 1))) == pytest.approx(1.6)
    assert float(fused_map([e], [d], None, (1, 1))) == pytest.approx(3.0)
    assert float(fused_map([e], [d], None, (1, 1), "channel_rms")) == pytest.approx(0.5 * (1 + 5 / 2))
    assert float(fused_map([e], [d], None, (1, 1), "relative")) == pytest.approx(0.5 * (1 + 5 / 3))
    with pytest.raises(ValueError, match="l2_norm"):
        fused_map([e], [d], None, (1, 1), "bogus")


def test_inp_distance_map() -> None:
    f = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]]])
    p = torch.tensor([[[1.0, 0.0]]])
    m = inp_distance_map(f, p, (2, 2), (2, 2))
    want = torch.tensor([[0.0, 1.0], [1 - 1 / math.sqrt(2), 2.0]])
    assert torch.allclose(m[0, 0], want, atol=1e-6)


def test_postprocess_resizes_and_blurs() -> None:
    m = torch.rand(2, 1, 392, 392)
    out = postprocess(m, 256, 5, 4.0)
    assert out.shape == (2, 1, 256, 256)
    assert postprocess(m, None, 0).shape == m.shape and torch.equal(postprocess(m, None, 0), m)
