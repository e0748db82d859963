"""The allowed values of the components' string options, in one import-light module.

Each component validates its arguments against these, and the pipeline's params schema takes its
``Literal`` types from them, so a value is spelled in one place only.
"""

from __future__ import annotations

__all__ = [
    "AMP_MODES",
    "CACHE_VERIFY_MODES",
    "COHERENCE_KINDS",
    "DATASET_KINDS",
    "FUSED_L2_NORMS",
    "MAP_KINDS",
    "MSE_REDUCTIONS",
    "PATCH_SIZE",
    "POS_EMBED_INTERPOLATIONS",
    "RESIDUAL_MODES",
    "SEG_HEAD_LAYOUTS",
    "check_choice",
]

PATCH_SIZE = 14  # DINOv2 ViT-*/14
ATTENTION_MODES = ("explicit", "sdpa", "auto")  # softmax attention: explicit (official), SDPA, SDPA on CUDA only
ENCODER_DTYPES = ("fp32", "bf16")  # the frozen encoder's weights and activations
POS_EMBED_INTERPOLATIONS = ("official", "timm")  # encoder position-table resizing (spec §3)
SEG_HEAD_LAYOUTS = ("onenip", "plain")  # INP-Former++ segmentation head (spec §13.4)
COHERENCE_KINDS = ("hard", "soft")  # L_c (conference) or L_sc (++) (spec §8, §13.1)
MSE_REDUCTIONS = ("mean", "sum")  # channel reduction of the ++ MSE branch
MAP_KINDS = ("reconstruction", "fused", "inp_distance")  # anomaly maps (spec §11–§13.8)
FUSED_L2_NORMS = ("none", "channel_rms", "relative")  # scaling of the fused map's L2 term
RESIDUAL_MODES = ("joint", "two_stage", "off")  # residual learning of the head (spec §13.9)
AMP_MODES = ("none", "bf16")
CACHE_VERIFY_MODES = ("full", "size")  # feature cache: digest on the first open in a process, or size + header
# The dataset kinds `inpformer prepare` understands (`dtd` textures are prepared separately).
DATASET_KINDS = ("synthetic", "folder", "flat", "mvtec", "visa", "realiad", "mpdd", "btad")


def check_choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    """Raise ``ValueError`` naming the argument and its allowed values unless ``value`` is one of them."""
    if value not in allowed:
        msg = f"{name} must be one of {allowed}, got {value!r}."
        raise ValueError(msg)


MAX_TILE_OVERLAP = 0.9  # tile geometry: beyond it the tile count explodes (1 / (1 - overlap)² per tile area)
