"""Frozen DINOv2-with-registers ViT encoder (timm modules, our own forward).

Method spec §3: the encoder is a DINOv2 ViT with 4 register tokens built for 518 px (a 37×37
position table). For another input size the patch position table is resized the way the official
INP-Former code does it: bicubic interpolation driven by the *scale factor* (grid + 0.1) / 37,
without antialiasing. Registers get no position embedding. Blocks after the last tap never run and
the taps are raw block outputs (no final norm) with the 1 + 4 prefix tokens removed.

timm provides the blocks; we own the token preparation so the official numerics are kept
(timm resizes position tables by target size with antialiasing, which differs slightly). Building
the encoder gives random weights and touches neither disk nor network; pretrained weights are an
explicit step (:func:`components.model.weights.load_pretrained`).
"""

from __future__ import annotations

import math

import timm
import torch
import torch.nn.functional as F
from torch import nn

from components.constants import PATCH_SIZE, POS_EMBED_INTERPOLATIONS, check_choice
from components.model.weights import ENCODER_VARIANTS, resolve_encoder_name

__all__ = ["PATCH_SIZE", "FrozenDinoEncoder"]

NUM_REGISTERS = 4
PRETRAIN_GRID = 37  # 518 / 14
POS_INTERP_OFFSET = 0.1  # DINOv2's interpolate_offset (spec §3)


class FrozenDinoEncoder(nn.Module):
    """Frozen DINOv2-reg4 ViT returning the patch tokens of the tapped blocks.

    Args:
        name: encoder name (``dinov2reg_vit_base_14``, ``vit_base_patch14_reg4_dinov2`` or ``base``).
        taps: 0-indexed block indices whose outputs are returned (default: the variant's, spec §3).
        pos_embed_interp: ``"official"`` (bicubic, scale factor (g+0.1)/37, no antialias) or
            ``"timm"`` (timm's resize by target size, antialiased).
        fused_attn: use PyTorch's fused SDPA in the encoder blocks (faster; the explicit softmax
            path, the default, reproduces the official numerics most closely).
        overrides: extra keyword arguments for ``timm.create_model`` (tiny test encoders:
            ``{"embed_dim": 32, "num_heads": 2}``).
    """

    def __init__(
        self,
        name: str = "dinov2reg_vit_base_14",
        taps: tuple[int, ...] | None = None,
        pos_embed_interp: str = "official",
        fused_attn: bool = False,
        overrides: dict | None = None,
    ) -> None:
        super().__init__()
        self.variant_key = resolve_encoder_name(name)
        self.variant = ENCODER_VARIANTS[self.variant_key]
        check_choice("pos_embed_interp", pos_embed_interp, POS_EMBED_INTERPOLATIONS)
        self.vit = timm.create_model(
            self.variant.timm_name,
            pretrained=False,
            img_size=PATCH_SIZE * PRETRAIN_GRID,
            num_classes=0,
            drop_path_rate=0.0,
            **dict(overrides or {}),
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
        self.pretrained_loaded = False  # set by components.model.weights.load_pretrained
        self.weights_source = "random-init"
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    # -- forward ---------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> FrozenDinoEncoder:
        """Stay in eval mode: the encoder is frozen (spec §3)."""
        return super().train(False)

    def set_fused_attn(self, fused: bool) -> None:
        """Use PyTorch's SDPA (True) or the explicit softmax (False) in every ViT block."""
        for blk in self.vit.blocks:
            if hasattr(blk.attn, "fused_attn"):
                blk.attn.fused_attn = bool(fused)

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        """Token grid of an input image."""
        return height // self.patch_size, width // self.patch_size

    def patch_pos_embed(self, grid: tuple[int, int]) -> torch.Tensor:
        """Position table for the patch tokens of a ``grid``: 1×(h·w)×C."""
        pos = self.vit.pos_embed  # 1×(37·37)×C, patches only (timm no_embed_class layout)
        n, c = pos.shape[1], pos.shape[2]
        side = math.isqrt(int(n))
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
        grid = (int(x.shape[-2]), int(x.shape[-1]))  # constants when traced (export: fixed size)
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
