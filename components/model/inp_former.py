"""INP-Former / INP-Former++ model (method spec §1, §4–§7, §13.3–§13.4).

Data flow for ViT-B at 392 px (28×28 = 784 tokens, C = 768, M = 6):
    images B×3×392×392 → frozen encoder taps 8 × B×784×C
    F_Q = mean of the taps                      B×784×C
    INPs P = extractor(prototype tokens, F_Q)    B×6×C
    decoder: x = bottleneck(F_Q); 8 × x = block(x, P); list reversed
    encoder / decoder groups: 2 × B×C×28×28
    (++) residual f_res (detached) → segmentation head → B×1×392×392 logits
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from components.constants import ATTENTION_MODES, ENCODER_DTYPES, check_choice
from components.model.config import InpFormerConfig
from components.model.encoder import PATCH_SIZE, FrozenDinoEncoder
from components.model.layers import AggregationBlock, Mlp, PrototypeBlock
from components.model.seg_head import SegmentationHead
from components.model.weights import convert_meta_dinov2_state_dict

__all__ = ["InpFormer", "InpFormerOutput"]


@dataclass
class InpFormerOutput:
    """Named model output. Shapes for batch B, C channels, h×w token grid, M INPs, N = h·w."""

    encoder_groups: list[torch.Tensor]  # G × B×C×h×w (detached: the encoder is frozen)
    decoder_groups: list[torch.Tensor]  # G × B×C×h×w
    prototypes: torch.Tensor  # B×M×C
    fused_features: torch.Tensor  # B×N×C, F_Q = mean of the encoder taps
    grid: tuple[int, int]  # (h, w)
    attention: list[torch.Tensor] = field(default_factory=list)  # per decoder block B×heads×N×M


def _fuse(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Element-wise mean of equally shaped tensors (stack then mean, as the official code)."""
    return torch.stack(list(tensors), dim=1).mean(dim=1)


def _to_map(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """B×N×C → B×C×h×w (channel-first permute, row-major reshape)."""
    b, _, c = tokens.shape
    return tokens.permute(0, 2, 1).reshape(b, c, grid[0], grid[1]).contiguous()


def _check_groups(groups: Sequence[Sequence[int]], size: int, what: str) -> tuple[tuple[int, ...], ...]:
    out = tuple(tuple(int(i) for i in g) for g in groups)
    if not out or any(not g for g in out):
        msg = f"{what} groups must be non-empty lists of indices, got {groups!r}."
        raise ValueError(msg)
    bad = sorted({i for g in out for i in g if i < 0 or i >= size})
    if bad:
        msg = f"{what} group indices {bad} are out of range 0..{size - 1}."
        raise ValueError(msg)
    return out


FLOAT_BYTES = 4
ATTENTION_COPIES = 2  # logits and softmax
ACTIVATIONS_PER_LAYER = 12  # q, k, v, attention output, MLP hidden (×4), norms and residuals, per token and channel
PARAM_COPIES_TRAINING = 4  # weights, gradients, two AdamW moments


class InpFormer(nn.Module):
    """INP-Former with the optional INP-Former++ segmentation head.

    Args:
        config: the architecture (:class:`~components.model.config.InpFormerConfig`, whose fields
            are documented there); default: the paper's ViT-B at 392 px.

    The encoder starts with random weights; load DINOv2 with
    :func:`components.model.weights.load_pretrained` (``model.encoder``). :attr:`config` reports the
    architecture, and ``InpFormer(net.config)`` rebuilds the same network.
    """

    def __init__(self, config: InpFormerConfig | None = None) -> None:
        super().__init__()
        c = config if config is not None else InpFormerConfig()
        num_prototypes, image_size = c.num_prototypes, c.image_size
        if isinstance(num_prototypes, bool) or int(num_prototypes) != num_prototypes or num_prototypes < 1:
            msg = f"num_prototypes (M) must be an integer >= 1, got {num_prototypes!r}."
            raise ValueError(msg)
        size = (image_size, image_size) if isinstance(image_size, int) else tuple(int(s) for s in image_size)
        if len(size) != 2 or any(s <= 0 or s % PATCH_SIZE for s in size):
            msg = f"image_size must be a positive multiple of the patch size 14, got {image_size!r}."
            raise ValueError(msg)
        if c.decoder_depth < 1 or c.extractor_depth < 1:
            msg = f"decoder_depth and extractor_depth must be >= 1, got {c.decoder_depth}, {c.extractor_depth}."
            raise ValueError(msg)
        self._config = c
        self.image_size = size
        self.encoder = FrozenDinoEncoder(
            c.encoder_name,
            taps=tuple(c.taps) if c.taps is not None else None,
            pos_embed_interp=c.pos_embed_interp,
            fused_attn=c.encoder_fused_attn or c.attention == "sdpa",
            overrides=c.encoder_overrides,
        )
        dim = self.encoder.embed_dim
        heads = int(c.num_heads or self.encoder.num_heads)
        if dim % heads:
            msg = f"num_heads={heads} does not divide the encoder width {dim}."
            raise ValueError(msg)
        self.encoder_groups_idx = _check_groups(c.encoder_groups, len(self.encoder.taps), "encoder")
        self.decoder_groups_idx = _check_groups(c.decoder_groups, c.decoder_depth, "decoder")
        if len(self.encoder_groups_idx) != len(self.decoder_groups_idx):
            msg = "encoder_groups and decoder_groups must have the same number of groups."
            raise ValueError(msg)
        self.num_prototypes = int(num_prototypes)
        self.grid = (size[0] // PATCH_SIZE, size[1] // PATCH_SIZE)

        # Names mirror the official state dict (spec §7) so released checkpoints load directly.
        self.bottleneck = nn.ModuleList([Mlp(dim, int(dim * c.mlp_ratio), c.bottleneck_dropout)])
        self.aggregation = nn.ModuleList(
            [AggregationBlock(dim, heads, c.mlp_ratio, c.qkv_bias, c.norm_eps) for _ in range(c.extractor_depth)]
        )
        self.decoder = nn.ModuleList(
            [PrototypeBlock(dim, heads, c.mlp_ratio, c.qkv_bias, c.norm_eps) for _ in range(c.decoder_depth)]
        )
        self.prototype_token = nn.Parameter(torch.randn(self.num_prototypes, dim))  # N(0, 1), spec §4
        self._init_trainable(c.init_std, c.init_bound)
        self.seg_head = SegmentationHead(dim, c.seg_head_channels, c.seg_head) if c.seg_head else None
        check_choice("attention", c.attention, ATTENTION_MODES)
        check_choice("encoder_dtype", c.encoder_dtype, ENCODER_DTYPES)
        self.attention = c.attention
        self.encoder_dtype = torch.bfloat16 if c.encoder_dtype == "bf16" else torch.float32
        self.encoder.to(self.encoder_dtype)  # frozen: its features return to fp32 in encode()
        for blk in self.aggregation:
            blk.attn.attention = c.attention

    @property
    def config(self) -> InpFormerConfig:
        """The architecture of this model."""
        return self._config

    def peak_memory_bytes(self, batch: int, training: bool = False) -> int:
        """A coarse upper estimate of the activation memory of one forward (and backward when
        ``training``) at ``batch`` images of this model's input size: attention matrices
        (B·H·N² per layer alive at once, twice with softmax), token activations of every layer, and
        the parameters. For refusing sizes that cannot fit before allocating, not for planning."""
        tokens = self.grid[0] * self.grid[1] + self.encoder.num_prefix_tokens
        dim, heads = self.encoder.embed_dim, self.encoder.num_heads
        layers = self.encoder.depth + len(self.decoder) + len(self.aggregation)
        attention = batch * heads * tokens * tokens * FLOAT_BYTES * ATTENTION_COPIES
        kept = layers if training else 1  # autograd keeps every layer's activations; inference one at a time
        activations = batch * tokens * dim * FLOAT_BYTES * ACTIVATIONS_PER_LAYER * kept
        params = sum(p.numel() for p in self.parameters()) * FLOAT_BYTES * (PARAM_COPIES_TRAINING if training else 1)
        return int(attention * kept + activations + params)

    # -- setup -----------------------------------------------------------------------------------
    def _init_trainable(self, std: float, bound: float) -> None:
        """Truncated normal (std, ±bound) Linear weights, zero biases, unit LayerNorms (spec §7)."""
        for module in [*self.bottleneck, *self.aggregation, *self.decoder]:
            for m in module.modules():
                if isinstance(m, nn.Linear):
                    nn.init.trunc_normal_(m.weight, std=std, a=-bound, b=bound)
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)
                elif isinstance(m, nn.LayerNorm):
                    nn.init.ones_(m.weight)
                    nn.init.zeros_(m.bias)

    @property
    def pretrained_loaded(self) -> bool:
        """Whether real encoder weights were loaded (record this with every run)."""
        return self.encoder.pretrained_loaded

    def trunk_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters of normal-pattern modelling (extractor, tokens, bottleneck, decoder)."""
        mods = [*self.aggregation, *self.bottleneck, *self.decoder]
        return [self.prototype_token] + [p for m in mods for p in m.parameters()]

    def head_parameters(self) -> list[nn.Parameter]:
        """Parameters of the segmentation head (empty without one)."""
        return list(self.seg_head.parameters()) if self.seg_head is not None else []

    def train(self, mode: bool = True) -> InpFormer:
        """Set train mode; the encoder stays in eval mode."""
        super().train(mode)
        self.encoder.eval()
        return self

    # -- forward ---------------------------------------------------------------------------------
    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], tuple[int, int]]:
        """Frozen-encoder part: images B×3×H×W → (F_Q B×N×C, group means G × B×N×C, grid).

        These are exactly what :meth:`forward_features` needs, so they can be cached (spec §1).
        """
        if images.ndim != 4 or images.shape[1] != 3:
            msg = f"expected images of shape B×3×H×W, got {tuple(images.shape)}."
            raise ValueError(msg)
        if self.attention == "auto":  # SDPA in the ViT blocks on CUDA, the explicit softmax elsewhere
            self.encoder.set_fused_attn(images.is_cuda or self.config.encoder_fused_attn)
        taps, grid = self.encoder(images.to(self.encoder_dtype))
        if self.encoder_dtype != torch.float32:
            taps = [t.float() for t in taps]
        fused = _fuse(taps)  # F_Q: B×N×C (mean, spec §1)
        groups = [_fuse([taps[i] for i in g]) for g in self.encoder_groups_idx]
        return fused, groups, grid

    def forward(self, images: torch.Tensor, return_attention: bool = False) -> InpFormerOutput:
        """images: B×3×H×W (ImageNet-normalised) → :class:`InpFormerOutput`."""
        fused, groups, grid = self.encode(images)
        return self.forward_features(fused, groups, grid, return_attention)

    def forward_features(
        self,
        fused: torch.Tensor,
        encoder_group_tokens: list[torch.Tensor],
        grid: tuple[int, int],
        return_attention: bool = False,
    ) -> InpFormerOutput:
        """Trainable part from (cached) encoder features: F_Q B×N×C and G group means B×N×C."""
        b = fused.shape[0]
        protos = self.prototype_token.unsqueeze(0).expand(b, -1, -1)
        for blk in self.aggregation:
            protos = blk(protos, fused)
        x = fused
        for blk in self.bottleneck:
            x = blk(x)
        decoded: list[torch.Tensor] = []
        attention: list[torch.Tensor] = []
        for blk in self.decoder:
            if return_attention:
                x, attn = blk(x, protos, return_attention=True)
                attention.append(attn)
            else:
                x = blk(x, protos)
            decoded.append(x)
        decoded = decoded[::-1]  # deepest first: group 0 pairs with the earliest encoder taps
        enc = [_to_map(t, grid) for t in encoder_group_tokens]
        dec = [_to_map(_fuse([decoded[i] for i in g]), grid) for g in self.decoder_groups_idx]
        return InpFormerOutput(enc, dec, protos, fused, grid, attention)

    def forward_cached(self, features: torch.Tensor) -> InpFormerOutput:
        """Forward from a cached stack B×(1+G)×N×C = [F_Q, group means...] (see ``FeatureCache``)."""
        feats = features.float()
        return self.forward_features(feats[:, 0], list(feats[:, 1:].unbind(1)), self.grid)

    @staticmethod
    def residual(out: InpFormerOutput) -> torch.Tensor:
        """++ residual f_res = mean_g[(1 − cos(E_g, D_g)) · |E_g − D_g|], detached: B×C×h×w (§13.3)."""
        res = []
        for e, d in zip(out.encoder_groups, out.decoder_groups):
            e, d = e.detach(), d.detach()
            cos_dist = 1.0 - F.cosine_similarity(e, d, dim=1).unsqueeze(1)
            res.append(cos_dist * (e - d).abs())
        return _fuse(res)

    def segment(self, out: InpFormerOutput, size: tuple[int, int] | None = None) -> torch.Tensor:
        """Segmentation logits B×1×H×W from the detached residual, upsampled bilinearly (§13.4)."""
        if self.seg_head is None:
            raise RuntimeError("this model has no segmentation head (seg_head=None).")
        logits = self.seg_head(self.residual(out))
        size = size or self.image_size
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)

    # -- interop ---------------------------------------------------------------------------------
    def load_official_state_dict(self, state_dict: dict[str, torch.Tensor], strict: bool = True) -> None:
        """Load an official INP-Former checkpoint (spec §7 names; encoder keys in Meta naming).

        Keys with a ``module.`` prefix (DataParallel) are accepted; ``prototype_token.0`` (the
        official ParameterList) maps to ``prototype_token``. The segmentation head, absent from
        conference checkpoints, keeps its current weights.
        """
        state = {k.removeprefix("module."): v for k, v in state_dict.items()}
        enc = {k[len("encoder.") :]: v for k, v in state.items() if k.startswith("encoder.")}
        rest = {k: v for k, v in state.items() if not k.startswith("encoder.")}
        if "prototype_token.0" in rest:
            rest["prototype_token"] = rest.pop("prototype_token.0")
        if enc:
            if "register_tokens" in enc or "mask_token" in enc:
                enc = convert_meta_dinov2_state_dict(enc)
            enc_own = self.encoder.vit.state_dict()
            enc = {k: v for k, v in enc.items() if k in enc_own}
            rest.update({f"encoder.vit.{k}": v for k, v in enc.items()})
        own = self.state_dict()
        head_keys = {k for k in own if k.startswith("seg_head.")}
        unexpected = sorted(set(rest) - set(own))
        missing = sorted(set(own) - set(rest) - head_keys)
        if strict and (unexpected or missing):
            msg = f"official state dict does not fit: missing {missing[:6]}, unexpected {unexpected[:6]}."
            raise KeyError(msg)
        for k, v in rest.items():
            if k in own and tuple(v.shape) != tuple(own[k].shape):
                msg = f"shape mismatch for {k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}."
                raise ValueError(msg)
        self.load_state_dict({k: v for k, v in rest.items() if k in own}, strict=False)
        if enc:
            self.encoder.pretrained_loaded = True
            self.encoder.weights_source = "official-checkpoint"
