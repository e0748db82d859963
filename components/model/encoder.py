"""Frozen DINOv2-with-registers ViT encoder (timm modules, our own forward).

Method spec §3: the encoder is a DINOv2 ViT with 4 register tokens built for 518 px (a 37×37
position table). For another input size the patch position table is resized the way the official
INP-Former code does it: bicubic interpolation driven by the *scale factor* (grid + 0.1) / 37,
without antialiasing. Registers get no position embedding. Blocks after the last tap never run and
the taps are raw block outputs (no final norm) with the 1 + 4 prefix tokens removed.

timm provides the blocks; we own the token preparation so the official numerics are kept
(timm resizes position tables by target size with antialiasing, which differs slightly).
"""

from __future__ import annotations

import logging
import os
import re
import socket
import warnings
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

__all__ = [
    "ENCODER_VARIANTS",
    "EncoderWeightsError",
    "FrozenDinoEncoder",
    "convert_meta_dinov2_state_dict",
    "load_encoder_state_dict",
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

PATCH_SIZE = 14
NUM_REGISTERS = 4
PRETRAIN_GRID = 37  # 518 / 14
POS_INTERP_OFFSET = 0.1  # DINOv2's interpolate_offset (spec §3)


class EncoderWeightsError(RuntimeError):
    """Pretrained encoder weights were required but could not be loaded."""


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


def _read_weight_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

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


def _hub_reachable(host: str, timeout_s: float) -> str | None:
    """Return None when ``host:443`` accepts a TCP connection in time, else the reason."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return "HF_HUB_OFFLINE is set"
    try:
        with socket.create_connection((host, 443), timeout=timeout_s):
            return None
    except OSError as err:
        return f"{host} is unreachable ({err.__class__.__name__}: {err})"


class FrozenDinoEncoder(nn.Module):
    """Frozen DINOv2-reg4 ViT returning the patch tokens of the tapped blocks.

    Args:
        name: encoder name (``dinov2reg_vit_base_14``, ``vit_base_patch14_reg4_dinov2`` or ``base``).
        taps: 0-indexed block indices whose outputs are returned (default: the variant's, spec §3).
        pretrained: ``True`` (weights required), ``False`` (random init) or ``"auto"`` (weights when
            they can be had, else random init with a loud warning).
        weights: local weight file (Meta ``.pth`` or timm/HF ``.safetensors``).
        weights_dir: folder searched for the standard file names when ``weights`` is not given.
        pos_embed_interp: ``"official"`` (bicubic, scale factor (g+0.1)/37, no antialias) or
            ``"timm"`` (timm's resize by target size, antialiased).
        fused_attn: use PyTorch's fused SDPA in the encoder blocks (faster; the explicit softmax
            path, the default, reproduces the official numerics most closely).
        download: try the Hugging Face hub when no local file is found.
        download_timeout_s: connection probe timeout before a download is attempted.
        overrides: extra keyword arguments for ``timm.create_model`` (tiny test encoders:
            ``{"embed_dim": 32, "num_heads": 2}``).
    """

    def __init__(
        self,
        name: str = "dinov2reg_vit_base_14",
        taps: tuple[int, ...] | None = None,
        pretrained: bool | str = "auto",
        weights: str | os.PathLike | None = None,
        weights_dir: str | os.PathLike = "weights",
        pos_embed_interp: str = "official",
        fused_attn: bool = False,
        download: bool = True,
        download_timeout_s: float = 3.0,
        overrides: dict | None = None,
    ) -> None:
        super().__init__()
        self.variant_key = resolve_encoder_name(name)
        self.variant = ENCODER_VARIANTS[self.variant_key]
        if pos_embed_interp not in ("official", "timm"):
            msg = f"pos_embed_interp must be 'official' or 'timm', got {pos_embed_interp!r}."
            raise ValueError(msg)
        if pretrained not in (True, False, "auto", "true", "false"):
            msg = f"pretrained must be true, false or 'auto', got {pretrained!r}."
            raise ValueError(msg)
        pretrained = {"true": True, "false": False}.get(pretrained, pretrained)  # type: ignore[arg-type]
        overrides = dict(overrides or {})
        self.vit = timm.create_model(
            self.variant.timm_name,
            pretrained=False,
            img_size=PATCH_SIZE * PRETRAIN_GRID,
            num_classes=0,
            drop_path_rate=0.0,
            **overrides,
        )
        self.embed_dim = int(self.vit.embed_dim)
        self.num_heads = int(self.vit.blocks[0].attn.num_heads)
        self.depth = len(self.vit.blocks)
        self.patch_size = PATCH_SIZE
        self.num_prefix_tokens = 1 + NUM_REGISTERS
        self.taps = tuple(int(t) for t in (taps if taps is not None else self.variant.taps))
        if not self.taps:
            raise ValueError("taps must name at least one encoder block.")
        bad = [t for t in self.taps if t < 0 or t >= self.depth]
        if bad:
            msg = f"taps {bad} are outside the encoder depth {self.depth} (valid: 0..{self.depth - 1})."
            raise ValueError(msg)
        if list(self.taps) != sorted(set(self.taps)):
            msg = f"taps must be strictly increasing, got {list(self.taps)}."
            raise ValueError(msg)
        self.pos_embed_interp = pos_embed_interp
        for blk in self.vit.blocks:
            if hasattr(blk.attn, "fused_attn"):
                blk.attn.fused_attn = bool(fused_attn)

        self.pretrained_loaded = False
        self.weights_source = "random-init"
        if pretrained is not False:
            self._load_weights(pretrained, weights, weights_dir, download, download_timeout_s)

        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    # -- weights ---------------------------------------------------------------------------------
    def _load_weights(
        self,
        mode: bool | str,
        weights: str | os.PathLike | None,
        weights_dir: str | os.PathLike,
        download: bool,
        timeout_s: float,
    ) -> None:
        v = self.variant
        try:
            if weights:
                path = Path(weights)
                if not path.is_file():
                    msg = f"Encoder weight file {path} does not exist."
                    raise EncoderWeightsError(msg)
                self._load_file(path)
                return
            for candidate in (
                Path(weights_dir) / v.meta_file,
                Path(weights_dir) / f"{v.timm_name}.safetensors",
                Path(weights_dir) / v.timm_name / "model.safetensors",
            ):
                if candidate.is_file():
                    self._load_file(candidate)
                    return
            if not download:
                msg = "downloads are disabled"
                raise EncoderWeightsError(msg)
            reason = _hub_reachable("huggingface.co", timeout_s)
            if reason is not None:
                raise EncoderWeightsError(reason)
            from huggingface_hub import hf_hub_download

            file = hf_hub_download(f"timm/{v.timm_name}.lvd142m", "model.safetensors")
            self._load_file(Path(file))
        except EncoderWeightsError as err:
            advice = (
                f"No pretrained DINOv2 weights for '{v.timm_name}' ({err}). Copy {v.meta_file} "
                f"(from {v.meta_url}) into {Path(weights_dir)}/, or set model.encoder.weights: <file> "
                "(Meta .pth or timm .safetensors)."
            )
            if mode is True:
                raise EncoderWeightsError(advice + " Or set model.encoder.pretrained: auto|false.") from err
            banner = "RANDOM-INIT ENCODER: " + advice + " Results will not be comparable to the paper."
            warnings.warn(banner, stacklevel=3)
            logger.warning(banner)

    def _load_file(self, path: Path) -> None:
        load_encoder_state_dict(self.vit, _read_weight_file(path), str(path))
        self.pretrained_loaded = True
        self.weights_source = str(path)
        logger.info("Loaded encoder weights from %s", path)

    # -- forward ---------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> FrozenDinoEncoder:
        """Stay in eval mode: the encoder is frozen (spec §3)."""
        return super().train(False)

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        """Token grid of an input image."""
        return height // self.patch_size, width // self.patch_size

    def patch_pos_embed(self, grid: tuple[int, int]) -> torch.Tensor:
        """Position table for the patch tokens of a ``grid``: 1×(h·w)×C."""
        pos = self.vit.pos_embed  # 1×(37·37)×C, patches only (timm no_embed_class layout)
        n, c = pos.shape[1], pos.shape[2]
        side = int(round(n**0.5))
        h, w = grid
        if (h, w) == (side, side):
            return pos
        table = pos.reshape(1, side, side, c).permute(0, 3, 1, 2)
        if self.pos_embed_interp == "official":
            scale = ((h + POS_INTERP_OFFSET) / side, (w + POS_INTERP_OFFSET) / side)
            table = F.interpolate(table.float(), scale_factor=scale, mode="bicubic", antialias=False)
        else:
            table = F.interpolate(table.float(), size=(h, w), mode="bicubic", antialias=True)
        if table.shape[-2:] != (h, w):
            msg = f"position table resized to {tuple(table.shape[-2:])}, expected {(h, w)}"
            raise RuntimeError(msg)
        return table.to(pos.dtype).permute(0, 2, 3, 1).reshape(1, h * w, c)

    def prepare_tokens(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Images B×3×H×W → tokens B×(1+4+h·w)×C ordered [cls, reg1..reg4, patches]."""
        x = self.vit.patch_embed.proj(images)  # B×C×h×w
        grid = (x.shape[-2], x.shape[-1])
        x = x.flatten(2).transpose(1, 2)
        x = self.vit.patch_embed.norm(x)
        x = x + self.patch_pos_embed(grid)
        b = x.shape[0]
        cls = self.vit.cls_token.expand(b, -1, -1)  # cls position already folded in
        reg = self.vit.reg_token.expand(b, -1, -1)  # registers get no position embedding
        return torch.cat([cls, reg, x], dim=1), grid

    def forward(self, images: torch.Tensor) -> tuple[list[torch.Tensor], tuple[int, int]]:
        """Return the tapped patch tokens (list of B×N×C) and the token grid (h, w)."""
        with torch.no_grad():
            x, grid = self.prepare_tokens(images)
            taps: list[torch.Tensor] = []
            last = self.taps[-1]
            for i, blk in enumerate(self.vit.blocks):
                if i > last:
                    break
                x = blk(x)
                if i in self.taps:
                    taps.append(x[:, self.num_prefix_tokens :, :])
        return taps, grid
