"""The one place that maps validated params to constructor arguments of ``components``."""

from __future__ import annotations

from typing import Any

import torch

from components.data.synthesis import PseudoAnomalySynthesizer, TextureBank
from components.data.transforms import ImageTransform
from components.engine import TrainConfig
from components.losses import DiceLoss, NormalPatternLoss
from components.model import InpFormer
from pipelines.config import Params

__all__ = [
    "build_loss",
    "build_model",
    "build_synthesizer",
    "build_train_config",
    "build_transform",
    "map_kind",
    "model_kwargs",
    "resolve_device",
]


def resolve_device(name: str) -> str:
    """``auto`` → ``cuda`` when available, else ``cpu``."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        msg = f"train.device={name} but no CUDA device is available; use auto or cpu."
        raise RuntimeError(msg)
    return name


def model_kwargs(p: Params) -> dict[str, Any]:
    """JSON-able keyword arguments of :class:`~components.model.InpFormer`."""
    m = p.model
    return {
        "encoder_name": m.encoder,
        "image_size": p.data.crop_size,
        "num_prototypes": m.num_prototypes,
        "pretrained": m.pretrained,
        "weights": m.weights or None,
        "weights_dir": m.weights_dir,
        "taps": m.taps,
        "encoder_groups": m.encoder_groups,
        "decoder_groups": m.decoder_groups,
        "decoder_depth": m.decoder_depth,
        "extractor_depth": m.extractor_depth,
        "mlp_ratio": m.mlp_ratio,
        "norm_eps": m.norm_eps,
        "bottleneck_dropout": m.bottleneck_dropout,
        "init_std": m.init_std,
        "init_bound": m.init_bound,
        "pos_embed_interp": m.pos_embed_interp,
        "encoder_fused_attn": m.encoder_fused_attn,
        "download": m.download,
        "seg_head": None if m.seg_head == "none" else m.seg_head,
        "seg_head_channels": m.seg_head_channels,
        "encoder_overrides": dict(m.encoder_overrides) or None,
    }


def build_model(p: Params) -> InpFormer:
    """The model described by ``p.model`` at ``p.data.crop_size``."""
    return InpFormer(**model_kwargs(p))


def build_loss(p: Params) -> tuple[NormalPatternLoss, DiceLoss]:
    """L_npm and the Dice loss of the head."""
    lp = p.loss
    npm = NormalPatternLoss(
        gamma=lp.gamma,
        lam=lp.lam,
        coherence=lp.coherence,
        soft_temperature=lp.soft_temperature,
        mse_weight=lp.mse_weight,
        mse_gamma=lp.mse_gamma,
        mse_reduction=lp.mse_reduction,
    )
    return npm, DiceLoss(eps=lp.dice_eps, only_anomalous=lp.dice_only_anomalous)


def build_train_config(p: Params, progress: bool = True) -> TrainConfig:
    """Engine settings from ``p.train`` (+ the seed, batch size, workers and seg weight)."""
    t = p.train
    residual = t.residual_mode if (p.model.seg_head != "none" and p.synthesis.enabled) else "off"
    return TrainConfig(
        epochs=t.epochs,
        batch_size=t.batch_size,
        lr=t.lr,
        final_lr=t.final_lr,
        warmup_iters=t.warmup_iters,
        betas=tuple(t.betas),
        eps=t.eps,
        weight_decay=t.weight_decay,
        amsgrad=t.amsgrad,
        clip_threshold=t.clip_threshold,
        grad_clip=t.grad_clip,
        head_grad_clip=t.head_grad_clip,
        head_lr_scale=t.head_lr_scale,
        seg_weight=p.loss.seg_weight,
        residual_mode=residual,
        head_epochs=t.head_epochs,
        seed=p.seed,
        device=resolve_device(t.device),
        amp=t.amp,
        num_workers=p.data.num_workers,
        checkpoint_every=t.checkpoint_every,
        progress=progress,
    )


def build_transform(p: Params) -> ImageTransform:
    """Resize → crop → normalise with the params' sizes."""
    return ImageTransform(resize=p.data.image_size, crop=p.data.crop_size)


def build_synthesizer(p: Params) -> PseudoAnomalySynthesizer | None:
    """The DRAEM-style generator, or None when synthesis is off."""
    s = p.synthesis
    if not s.enabled:
        return None
    return PseudoAnomalySynthesizer(
        textures=TextureBank(s.texture_dir or None, procedural_size=max(p.data.crop_size, 64)),
        empty_prob=s.empty_prob,
        beta_max=s.beta_max,
        num_augmenters=s.num_augmenters,
        max_perlin_exponent=s.max_perlin_exponent,
        threshold=s.threshold,
        rotate_prob=s.rotate_prob,
    )


def map_kind(p: Params, has_head: bool) -> str:
    """The evaluation map: zero-shot → INP distance; with a head → fused; else reconstruction."""
    if p.eval.map != "auto":
        return p.eval.map
    if p.setting.kind == "zero_shot":
        return "inp_distance"
    return "fused" if has_head else "reconstruction"
