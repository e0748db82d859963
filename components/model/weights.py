"""DINOv2-reg4 encoder weights: the variant table, weight files, format conversion and download.

Separate from the network (``encoder.py``) so that building a model never touches the disk or the
network: :func:`load_pretrained` is the explicit step that does. Accepted files are Meta's
``dinov2_vit*14_reg4_pretrain.pth`` (read with ``torch.load(weights_only=True)``) and timm /
Hugging Face ``model.safetensors``. Error messages name this module's arguments; the pipeline adds
the params keys.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from components.errors import EncoderWeightsError

logger = logging.getLogger(__name__)

__all__ = [
    "ENCODER_VARIANTS",
    "EncoderVariant",
    "EncoderWeightsError",
    "convert_meta_dinov2_state_dict",
    "hub_reachable",
    "load_encoder_state_dict",
    "load_pretrained",
    "read_weight_file",
    "resolve_encoder_name",
]


@dataclass(frozen=True)
class EncoderVariant:
    """Static facts about one DINOv2-reg4 variant (method spec §3 table)."""

    timm_name: str
    meta_file: str
    meta_url: str
    embed_dim: int
    num_heads: int
    depth: int
    taps: tuple[int, ...]


_META_BASE = "https://dl.fbaipublicfiles.com/dinov2"

ENCODER_VARIANTS: dict[str, EncoderVariant] = {
    "small": EncoderVariant(
        "vit_small_patch14_reg4_dinov2",
        "dinov2_vits14_reg4_pretrain.pth",
        f"{_META_BASE}/dinov2_vits14/dinov2_vits14_reg4_pretrain.pth",
        384,
        6,
        12,
        (2, 3, 4, 5, 6, 7, 8, 9),
    ),
    "base": EncoderVariant(
        "vit_base_patch14_reg4_dinov2",
        "dinov2_vitb14_reg4_pretrain.pth",
        f"{_META_BASE}/dinov2_vitb14/dinov2_vitb14_reg4_pretrain.pth",
        768,
        12,
        12,
        (2, 3, 4, 5, 6, 7, 8, 9),
    ),
    "large": EncoderVariant(
        "vit_large_patch14_reg4_dinov2",
        "dinov2_vitl14_reg4_pretrain.pth",
        f"{_META_BASE}/dinov2_vitl14/dinov2_vitl14_reg4_pretrain.pth",
        1024,
        16,
        24,
        (4, 6, 8, 10, 12, 14, 16, 18),
    ),
}

# Accepted spellings: the official script names, timm names and the short variant names.
_ALIASES: dict[str, str] = {}
for _variant, _spec in ENCODER_VARIANTS.items():
    _ALIASES[_variant] = _variant
    _ALIASES[_spec.timm_name] = _variant
    _ALIASES[f"dinov2reg_vit_{_variant}_14"] = _variant


def resolve_encoder_name(name: str) -> str:
    """Map any accepted encoder spelling to its variant key (``small``/``base``/``large``).

    Raises:
        ValueError: naming the unknown value and the accepted ones.
    """
    key = _ALIASES.get(str(name).strip().lower())
    if key is None:
        allowed = ", ".join(sorted(_ALIASES))
        msg = f"Unknown encoder {name!r}. Accepted names: {allowed}."
        raise ValueError(msg)
    return key


def convert_meta_dinov2_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Convert Meta's DINOv2-reg checkpoint naming to timm's VisionTransformer naming.

    Meta adds the cls position vector at run time (``pos_embed`` holds 1 + 37² rows); timm's
    ``no_embed_class`` layout stores it pre-added to ``cls_token``. Adding it once here gives the
    same fp32 sum the official forward computes.
    """
    out: dict[str, torch.Tensor] = {}
    pos = state["pos_embed"]
    for key, value in state.items():
        if key in ("mask_token", "pos_embed"):
            continue
        if key == "register_tokens":
            out["reg_token"] = value
        elif key == "cls_token":
            out["cls_token"] = value + pos[:, :1]
        else:
            # Chunked checkpoints (block_chunks > 0) name blocks "blocks.<chunk>.<i>.".
            out[re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", key)] = value
    out["pos_embed"] = pos[:, 1:]
    return out


def read_weight_file(path: Path) -> dict[str, torch.Tensor]:
    """A state dict of tensors from a ``.safetensors`` or ``.pth`` file (no pickle)."""
    if path.suffix == ".safetensors":
        state = load_file(str(path))
    else:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    for nested in ("model", "state_dict", "teacher"):
        if isinstance(state, dict) and nested in state and isinstance(state[nested], dict):
            state = state[nested]
    if not isinstance(state, dict):
        msg = f"{path}: expected a state dict of tensors, got {type(state).__name__}."
        raise EncoderWeightsError(msg)
    return state


def load_encoder_state_dict(vit: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load Meta- or timm-format DINOv2-reg weights into a timm ViT (strict).

    Raises:
        EncoderWeightsError: the keys or shapes do not fit, naming ``source``.
    """
    state = {k.removeprefix("backbone."): v for k, v in state.items()}
    if "register_tokens" in state or "mask_token" in state:
        state = convert_meta_dinov2_state_dict(state)
    elif "reg_token" not in state:
        sample = ", ".join(list(state)[:5])
        msg = (
            f"{source}: not a DINOv2-with-registers checkpoint in Meta or timm naming "
            f"(first keys: {sample}). Use Meta's dinov2_vit*14_reg4_pretrain.pth or timm's "
            "vit_*_patch14_reg4_dinov2 model.safetensors."
        )
        raise EncoderWeightsError(msg)
    own = vit.state_dict()
    state = {k: v for k, v in state.items() if not k.startswith("head.")}
    missing = sorted(set(own) - set(state))
    bad_shape = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or bad_shape:
        detail = f"missing {missing[:4]}" if missing else ""
        if bad_shape:
            k = bad_shape[0]
            detail += f" shape of {k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        msg = f"{source}: weights do not fit the encoder ({detail.strip()}). Is it the right variant?"
        raise EncoderWeightsError(msg)
    vit.load_state_dict({k: state[k] for k in own}, strict=True)


def hub_reachable(host: str, timeout_s: float) -> str | None:
    """Return None when ``host:443`` accepts a TCP connection in time, else the reason."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return "HF_HUB_OFFLINE is set"
    try:
        with socket.create_connection((host, 443), timeout=timeout_s):
            return None
    except OSError as err:
        return f"{host} is unreachable ({err.__class__.__name__}: {err})"


def _candidates(variant: EncoderVariant, weights_dir: Path) -> tuple[Path, ...]:
    return (
        weights_dir / variant.meta_file,
        weights_dir / f"{variant.timm_name}.safetensors",
        weights_dir / variant.timm_name / "model.safetensors",
    )


def _hub_file(variant: EncoderVariant, download: bool, timeout_s: float) -> Path:
    if not download:
        raise EncoderWeightsError("downloads are disabled")
    reason = hub_reachable("huggingface.co", timeout_s)
    if reason is not None:
        raise EncoderWeightsError(reason)
    from huggingface_hub import hf_hub_download  # optional: only reached online

    return Path(hf_hub_download(f"timm/{variant.timm_name}.lvd142m", "model.safetensors"))


def load_pretrained(
    encoder: nn.Module,
    pretrained: bool | str = "auto",
    weights: str | os.PathLike | None = None,
    weights_dir: str | os.PathLike = "weights",
    download: bool = True,
    timeout_s: float = 3.0,
) -> bool:
    """Load DINOv2-reg4 weights into ``encoder`` (a :class:`FrozenDinoEncoder`); return whether it did.

    Lookup order: ``weights`` (a file), the standard file names in ``weights_dir``, then the
    Hugging Face hub when ``download`` and the hub answers within ``timeout_s``.

    Args:
        pretrained: ``True`` (weights required), ``False`` (keep random init) or ``"auto"``
            (weights when they can be had, else random init with a loud warning).

    Raises:
        EncoderWeightsError: ``pretrained=True`` and no weights could be loaded.
    """
    if pretrained not in (True, False, "auto", "true", "false"):
        msg = f"pretrained must be true, false or 'auto', got {pretrained!r}."
        raise ValueError(msg)
    mode = {"true": True, "false": False}.get(pretrained, pretrained)  # type: ignore[arg-type]
    if mode is False:
        return False
    variant: EncoderVariant = encoder.variant  # type: ignore[assignment]
    try:
        if weights:
            path = Path(weights)
            if not path.is_file():
                msg = f"Encoder weight file {path} does not exist."
                raise EncoderWeightsError(msg)
        else:
            found = [c for c in _candidates(variant, Path(weights_dir)) if c.is_file()]
            path = found[0] if found else _hub_file(variant, download, timeout_s)
        load_encoder_state_dict(encoder.vit, read_weight_file(path), str(path))
    except EncoderWeightsError as err:
        advice = (
            f"No pretrained DINOv2 weights for '{variant.timm_name}' ({err}). Copy {variant.meta_file} "
            f"(from {variant.meta_url}) into {Path(weights_dir)}/ (weights_dir), or pass weights=<file> "
            "(Meta .pth or timm .safetensors)."
        )
        if mode is True:
            raise EncoderWeightsError(advice + " Or pass pretrained='auto' or False.") from err
        banner = "RANDOM-INIT ENCODER: " + advice + " Results will not be comparable to the paper."
        warnings.warn(banner, stacklevel=2)  # once: the pipeline turns it into one log line with its params
        return False
    encoder.pretrained_loaded = True
    encoder.weights_source = str(path)
    logger.info("Loaded encoder weights from %s", path)
    return True
