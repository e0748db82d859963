"""The one place that maps validated params to constructor arguments of ``components``.

Decisions that depend on several sections are made here once: whether residual learning is on
(a head and synthesis are both needed), which map scores a model, which device runs.
"""

from __future__ import annotations

import logging
import os
import platform
import warnings
from dataclasses import fields

import torch

from components.data.synthesis import PseudoAnomalySynthesizer, TextureBank
from components.engine.losses import DiceLoss, NormalPatternLoss
from components.engine.train_config import TrainConfig
from components.model import EncoderWeightsError, InpFormer, InpFormerConfig, load_pretrained
from components.scoring.inference import ScoringConfig
from components.scoring.operating import OperatingPoint
from pipelines import CPU_KERNEL_PINS, CPUINFO, has_avx2
from pipelines.config import Params
from pipelines.view import build_transform, geometry

logger = logging.getLogger(__name__)

__all__ = [
    "WEIGHT_KEYS",
    "apply_cpu_policy",
    "build_loss",
    "build_model",
    "build_scoring",
    "build_synthesizer",
    "build_train_config",
    "build_transform",
    "cpu_runtime",
    "geometry",
    "model_config",
    "operating_point",
    "residual_mode",
    "resolve_device",
]

MODEL_RENAMES = {"encoder": "encoder_name"}  # model params key → InpFormerConfig field
# The params keys behind load_pretrained's arguments (named in its errors by the pipeline).
WEIGHT_KEYS = ("model.pretrained", "model.weights", "model.weights_dir", "model.download")


def apply_cpu_policy(p: Params, threads: bool = True) -> None:
    """The CPU arithmetic of train, evaluate and noise: ``train.num_threads`` threads (0: torch's
    default; the bits depend on it) unless ``threads`` is false (a sweep worker sets its own share),
    and, with the kernels pinned (:func:`pipelines.pin_cpu_kernels`), oneDNN off: measured, its
    convolutions round by the CPU's ISA (and their blocking by its caches) while ATen's own
    convolution through MKL's pinned GEMM does not, and is no slower at these sizes. Except under
    ``train.amp: bf16``: CPU bf16 matrix products need oneDNN (without it a step of ViT-S@224 took 14x
    the fp32 step, bench/train_step.py), and bf16 bits are not pinned across CPUs anyway."""
    if threads and p.train.num_threads:
        torch.set_num_threads(p.train.num_threads)
    if kernels_pinned():
        torch.backends.mkldnn.enabled = p.train.amp == "bf16"


def kernels_pinned() -> bool:
    """Whether this process runs the pinned CPU kernels (``INPFORMER_CPU_KERNELS`` is not ``native``)."""
    return os.environ.get("MKL_CBWR", "") == CPU_KERNEL_PINS["MKL_CBWR"] and has_avx2()


def cpu_runtime() -> dict[str, str]:
    """What decides the CPU arithmetic of this process (MLflow tags, never committed files): the
    ATen kernels, MKL's code path, the thread count and the CPU."""
    cpu = platform.processor() or platform.machine()
    try:
        with open(CPUINFO) as fh:
            cpu = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "cpu_kernels": torch.backends.cpu.get_cpu_capability(),
        "mkl_cbwr": os.environ.get("MKL_CBWR", "unset"),
        "onednn": str(torch.backends.mkldnn.enabled),
        "num_threads": str(torch.get_num_threads()),
        "cpu": cpu,
    }


def resolve_device(name: str, key: str = "train.device") -> str:
    """``auto`` → ``cuda`` when available, else ``cpu`` (``key`` names the param in errors)."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        msg = f"{key}={name} but no CUDA device is available; use auto or cpu."
        raise ValueError(msg)
    return name


def model_config(p: Params) -> InpFormerConfig:
    """The architecture described by ``p.model`` at ``p.data.crop_size``: every ``model`` key that
    :class:`InpFormerConfig` has (by name; ``encoder`` is ``encoder_name``), the crop as input size."""
    known = {f.name for f in fields(InpFormerConfig)}
    values = {MODEL_RENAMES.get(k, k): v for k, v in p.model.model_dump().items()}
    shared = {k: v for k, v in values.items() if k in known}
    shared.update(image_size=p.data.crop_size, seg_head=None if p.model.seg_head == "none" else p.model.seg_head)
    return InpFormerConfig(**shared)


def build_model(p: Params) -> InpFormer:
    """The model of ``p.model``, its encoder loaded with DINOv2 weights as ``model.pretrained`` says.

    Raises:
        EncoderWeightsError: ``model.pretrained: true`` and no weights; the message names the keys.
    """
    model = InpFormer(model_config(p))
    m = p.model
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loaded = load_pretrained(model.encoder, m.pretrained, m.weights or None, m.weights_dir, m.download)
    except EncoderWeightsError as err:
        msg = f"{err} In params: {', '.join(WEIGHT_KEYS)}."
        raise EncoderWeightsError(msg) from err
    for w in caught:  # one line for the random-init banner (with the params to set), others as they were
        if not loaded and "RANDOM-INIT" in str(w.message):
            logger.warning("%s In params: set model.weights or put the file into model.weights_dir.", w.message)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return model


GIB = 2**30
MEMINFO = "/proc/meminfo"


class MemoryEstimateError(ValueError):
    """The work cannot fit in this machine's free memory; the message names the sizes to lower."""


def free_memory_bytes(device: str) -> int | None:
    """Free memory where ``device``'s tensors live: the GPU's free memory, else the OS's
    ``MemAvailable``; None where neither can be read (the check is then skipped)."""
    if device.startswith("cuda") and torch.cuda.is_available():
        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    try:
        with open(MEMINFO) as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def check_memory(p: Params, model: InpFormer, batch: int, device: str, batch_key: str, training: bool) -> None:
    """Refuse, before allocating, work whose estimated peak (:meth:`InpFormer.peak_memory_bytes`)
    exceeds ``limits.memory_fraction`` of the free memory.

    Raises:
        MemoryEstimateError: naming the estimate, the free memory and the keys to lower.
    """
    need = model.peak_memory_bytes(batch, training)
    free = free_memory_bytes(device)
    if free is None or need <= free * p.limits.memory_fraction:
        return
    side = model.image_size[0]
    msg = (
        f"an estimated {need / GIB:.1f} GiB for {batch} image(s) of {side}x{side} px ({model.grid[0] * model.grid[1]} "
        f"patches each, attention grows with their square) exceeds {p.limits.memory_fraction:.0%} of the "
        f"{free / GIB:.1f} GiB free on {device}. Lower data.crop_size and data.image_size (the model's input) or "
        f"{batch_key}, or use a larger machine (limits.memory_fraction sets the share)."
    )
    raise MemoryEstimateError(msg)


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


def residual_mode(p: Params) -> str:
    """``train.residual_mode``, or ``off`` without a head or without pseudo anomalies (decided here only)."""
    return p.train.residual_mode if (p.model.seg_head != "none" and p.synthesis.enabled) else "off"


def build_train_config(p: Params, progress: bool = True) -> TrainConfig:
    """Engine settings: every ``train`` key that :class:`TrainConfig` has, plus the cross-section ones."""
    known = {f.name for f in fields(TrainConfig)}
    shared = {k: v for k, v in p.train.model_dump().items() if k in known}
    shared.update(
        betas=tuple(p.train.betas),
        seg_weight=p.loss.seg_weight,
        residual_mode=residual_mode(p),
        seed=p.seed,
        device=resolve_device(p.train.device),
        num_workers=p.data.num_workers,
        progress=progress,
    )
    return TrainConfig(**shared)


def build_synthesizer(p: Params) -> PseudoAnomalySynthesizer | None:
    """The DRAEM-style generator, or None when synthesis is off."""
    s = p.synthesis
    if not s.enabled:
        return None
    try:
        textures = TextureBank(s.texture_dir or None, procedural_size=max(p.data.crop_size, 64))
    except FileNotFoundError as err:
        msg = f"{err} Set synthesis.texture_dir to a DTD images folder (inpformer prepare --dataset dtd), or ''."
        raise FileNotFoundError(msg) from err
    return PseudoAnomalySynthesizer(
        textures=textures,
        empty_prob=s.empty_prob,
        beta_max=s.beta_max,
        num_augmenters=s.num_augmenters,
        max_perlin_exponent=s.max_perlin_exponent,
        threshold=s.threshold,
        rotate_prob=s.rotate_prob,
    )


def build_scoring(p: Params, has_head: bool) -> ScoringConfig:
    """Scoring settings; ``eval.map: auto`` → zero-shot: INP distance, with a head: fused, else reconstruction."""
    e = p.eval
    kind = e.map
    if kind == "auto" and p.setting.kind == "zero_shot":
        kind = "inp_distance"
    elif kind == "auto":
        kind = "fused" if has_head else "reconstruction"
    return ScoringConfig(
        map_kind=kind,
        resize=e.resize,
        blur_kernel=e.blur_kernel,
        blur_sigma=e.blur_sigma,
        top_ratio=e.top_ratio,
        fused_l2_norm=e.fused_l2_norm,
    )


def operating_point(p: Params) -> OperatingPoint:
    """``eval.threshold``'s reject rule and review band as an :class:`OperatingPoint`."""
    t = p.eval.threshold
    targets = {"f1": 0.0, "none": 0.0, "max_fpr": t.max_fpr, "min_recall": t.min_recall}
    review = {"none": 0.0, "max_fpr": t.review_max_fpr, "min_recall": t.review_min_recall}
    return OperatingPoint(t.rule, targets[t.rule], t.review_rule, review[t.review_rule])
