"""Losses of INP-Former (conference code) and INP-Former++ (paper).

* :class:`HardCoherenceLoss` — L_c, mean nearest-INP cosine distance (spec §4.1).
* :class:`SoftCoherenceLoss` — L_sc, soft INP reconstruction of F_Q (spec §13.1).
* :class:`SoftMiningLoss` — per-sample global cosine loss whose gradient is re-weighted per
  position by (d / mean d)^γ (spec §8), plus the ++ MSE branch with its own weights (§13.2).
* :class:`DiceLoss` — segmentation-head loss on pseudo anomalies (§13.5).
* :class:`NormalPatternLoss` — L_npm = L_sm + λ·L_coh (§8, §13.2).

The re-weighting acts on the gradient only: the loss *value* is the plain cosine loss. It is done
with an identity whose backward multiplies the incoming gradient (:func:`scale_grad`) so that the
cosine and MSE branches scale separate gradient paths (spec §13.2).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from components.constants import COHERENCE_KINDS, MSE_REDUCTIONS, check_choice
from components.engine.distributed import global_count, global_mean, global_sum, world_size

__all__ = [
    "COHERENCE_KINDS",
    "MSE_REDUCTIONS",
    "DiceLoss",
    "HardCoherenceLoss",
    "NormalPatternLoss",
    "SoftCoherenceLoss",
    "SoftMiningLoss",
    "inp_distance",
    "scale_grad",
]


class _ScaleGrad(torch.autograd.Function):
    """Identity in the forward pass; multiplies the gradient by ``weight`` (broadcast) backwards."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(weight)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        (weight,) = ctx.saved_tensors
        return grad * weight, None


def scale_grad(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Return ``x`` unchanged; its gradient is multiplied by ``weight`` (no grad to ``weight``)."""
    return _ScaleGrad.apply(x, weight.detach())


def _cosine_sim_matrix(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Cosine similarity of every row pair: a B×N×C, b B×M×C → B×N×M."""
    an = a / a.norm(dim=-1, keepdim=True).clamp_min(eps)
    bn = b / b.norm(dim=-1, keepdim=True).clamp_min(eps)
    return an @ bn.transpose(-2, -1)


def inp_distance(fused_features: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """Nearest-INP cosine distance d_i = min_m (1 − cos(F_Q(i), p_m)): B×N (zero-shot map, §11)."""
    return (1.0 - _cosine_sim_matrix(fused_features, prototypes)).min(dim=-1).values


class HardCoherenceLoss(nn.Module):
    """L_c = mean over batch and tokens of the nearest-INP cosine distance (spec §4.1)."""

    def forward(self, fused_features: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
        """fused_features: B×N×C (F_Q), prototypes: B×M×C → scalar."""
        return inp_distance(fused_features, prototypes).mean()


class SoftCoherenceLoss(nn.Module):
    """L_sc = mean_b [1 − cos(vec F_Q, vec F̂_Q)], F̂_Q(i) = Σ_m softmax_m(S(F_Q(i), p_m)/τ) p_m (§13.1).

    Args:
        temperature: τ; the paper gives none, so 1 (raw cosine logits) is the default [INFER].
    """

    def __init__(self, temperature: float = 1.0) -> None:
        super().__init__()
        if temperature <= 0:
            msg = f"temperature must be > 0, got {temperature}."
            raise ValueError(msg)
        self.temperature = temperature

    def forward(self, fused_features: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
        """fused_features: B×N×C, prototypes: B×M×C → scalar."""
        weights = (_cosine_sim_matrix(fused_features, prototypes) / self.temperature).softmax(dim=-1)
        recon = weights @ prototypes  # B×N×C
        b = fused_features.shape[0]
        cos = F.cosine_similarity(fused_features.reshape(b, -1), recon.reshape(b, -1), dim=1)
        return (1.0 - cos).mean()


class SoftMiningLoss(nn.Module):
    """Soft-mining reconstruction loss (spec §8, official ``global_cosine_hm_adaptive``).

    For each group g with encoder map E_g (detached) and decoder map D_g (B×C×h×w):
    value ℓ_g = mean_b [1 − cos(vec E_g[b], vec D_g[b])]; the gradient reaching D_g is multiplied
    per position by w = (d / mean d)^γ with d = 1 − cos over channels. L = mean_g ℓ_g.

    The ++ MSE branch (``mse_weight > 0``, spec §13.2) adds
    ``mse_weight · mean_g mean_{b,positions} red_c (E − D)²`` with its own gradient weights
    (M / mean M)^γ_mse, M the per-position squared error reduced over channels by ``mse_reduction``.

    Args:
        gamma: γ of the cosine branch (3).
        mse_weight: weight of the MSE branch (0 = conference loss).
        mse_gamma: γ of the MSE branch (default: ``gamma``).
        mse_reduction: ``mean`` or ``sum`` over channels [INFER: the paper does not say].
    """

    def __init__(
        self,
        gamma: float = 3.0,
        mse_weight: float = 0.0,
        mse_gamma: float | None = None,
        mse_reduction: str = "mean",
    ) -> None:
        super().__init__()
        if gamma < 0:
            msg = f"gamma must be >= 0, got {gamma}."
            raise ValueError(msg)
        check_choice("mse_reduction", mse_reduction, MSE_REDUCTIONS)
        self.gamma = float(gamma)
        self.mse_weight = float(mse_weight)
        self.mse_gamma = float(gamma if mse_gamma is None else mse_gamma)
        self.mse_reduction = mse_reduction

    def terms(self, encoder_groups: list[torch.Tensor], decoder_groups: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Return ``{"cos": ..., "mse": ...}`` (mse is 0 when the branch is off)."""
        cos_terms, mse_terms = [], []
        for enc, dec in zip(encoder_groups, decoder_groups):
            enc = enc.detach()
            b = enc.shape[0]
            with torch.no_grad():
                dist = 1.0 - F.cosine_similarity(enc, dec, dim=1).unsqueeze(1)  # B×1×h×w
                w_cos = (dist / global_mean(dist)) ** self.gamma  # all ranks' positions under DDP
            d_cos = scale_grad(dec, w_cos)
            cos = F.cosine_similarity(enc.reshape(b, -1), d_cos.reshape(b, -1), dim=1)
            cos_terms.append((1.0 - cos).mean())
            if self.mse_weight > 0:
                with torch.no_grad():
                    err = self._reduce((enc - dec) ** 2)
                    w_mse = (err / global_mean(err).clamp_min(1e-12)) ** self.mse_gamma
                d_mse = scale_grad(dec, w_mse)
                mse_terms.append(self._reduce((enc - d_mse) ** 2).mean())
        out = {"cos": torch.stack(cos_terms).mean()}
        zero = out["cos"].new_zeros(())
        out["mse"] = torch.stack(mse_terms).mean() * self.mse_weight if mse_terms else zero
        return out

    def _reduce(self, sq: torch.Tensor) -> torch.Tensor:
        return sq.sum(dim=1, keepdim=True) if self.mse_reduction == "sum" else sq.mean(dim=1, keepdim=True)

    def forward(self, encoder_groups: list[torch.Tensor], decoder_groups: list[torch.Tensor]) -> torch.Tensor:
        """Scalar L_sm = cosine branch (+ weighted MSE branch)."""
        t = self.terms(encoder_groups, decoder_groups)
        return t["cos"] + t["mse"]


class DiceLoss(nn.Module):
    """L_seg = 1 − 2Σpg / (Σp² + Σg² + ε) per image, averaged over the batch (spec §13.5).

    Args:
        eps: ε in the denominator [INFER].
        only_anomalous: average only over images whose target has a positive pixel (the author's
            statement in ISSUE #39); returns 0 (with a gradient path) when there is none.
    """

    def __init__(self, eps: float = 1e-6, only_anomalous: bool = True) -> None:
        super().__init__()
        self.eps = eps
        self.only_anomalous = only_anomalous
        self.sync_free: bool | None = None  # None: on CUDA; True/False force the branch (tests)

    def forward(self, probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """probs: B×1×H×W in [0, 1] (sigmoid of the head), target: B×1×H×W in {0, 1} → scalar."""
        if probs.shape != target.shape:
            msg = f"dice: prediction {tuple(probs.shape)} and target {tuple(target.shape)} differ."
            raise ValueError(msg)
        p, g = probs.flatten(1), target.flatten(1).to(probs.dtype)
        per_image = 1.0 - 2.0 * (p * g).sum(1) / ((p * p).sum(1) + (g * g).sum(1) + self.eps)
        sync_free = probs.is_cuda if self.sync_free is None else self.sync_free
        if self.only_anomalous and sync_free:  # the same mean without a host sync (GPU)
            keep = (g.sum(1) > 0).to(per_image.dtype)
            total, world = global_sum(keep.sum()), world_size()
            return (per_image * keep).sum() * (world / total.clamp_min(1.0))
        if self.only_anomalous:
            keep = g.sum(1) > 0
            total, world = global_count(keep)  # anomalous images on all ranks (DDP), and the ranks
            if total == 0:
                return probs.sum() * 0.0
            if world > 1:  # DDP averages gradients over ranks: this rank's share of the global mean
                return per_image[keep].sum() * (world / total)
            per_image = per_image[keep]
        return per_image.mean()


class NormalPatternLoss(nn.Module):
    """L_npm = L_sm + λ·L_coh with hard (L_c, conference) or soft (L_sc, ++) coherence (§8, §13.1).

    Args:
        gamma: soft-mining γ.
        lam: λ, the coherence weight (0.2).
        coherence: ``hard`` or ``soft``.
        soft_temperature: τ of the soft coherence.
        mse_weight, mse_gamma, mse_reduction: the ++ MSE branch (see :class:`SoftMiningLoss`).
    """

    def __init__(
        self,
        gamma: float = 3.0,
        lam: float = 0.2,
        coherence: str = "hard",
        soft_temperature: float = 1.0,
        mse_weight: float = 0.0,
        mse_gamma: float | None = None,
        mse_reduction: str = "mean",
    ) -> None:
        super().__init__()
        check_choice("coherence", coherence, COHERENCE_KINDS)
        self.lam = float(lam)
        self.mining = SoftMiningLoss(gamma, mse_weight, mse_gamma, mse_reduction)
        self.coherence = HardCoherenceLoss() if coherence == "hard" else SoftCoherenceLoss(soft_temperature)

    def forward(self, out) -> dict[str, torch.Tensor]:
        """Return ``{"total", "cos", "mse", "coherence"}`` for a model output."""
        t = self.mining.terms(out.encoder_groups, out.decoder_groups)
        coh = self.coherence(out.fused_features, out.prototypes)
        return {
            "total": t["cos"] + t["mse"] + self.lam * coh,
            "cos": t["cos"],
            "mse": t["mse"],
            "coherence": coh,
        }
