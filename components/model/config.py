"""The architecture of an :class:`~components.model.InpFormer` as one JSON-able value.

``InpFormer(config)`` builds the network, ``InpFormer.config`` reports it, and model packages
store it (``package.json``: ``{"model": InpFormerConfig.to_dict(), ...}``). Encoder
weights are not part of it: loading them is a separate step (:mod:`components.model.weights`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

__all__ = ["LEGACY_WEIGHT_KEYS", "InpFormerConfig"]

# Keys that older model folders stored with the architecture; weights now load separately.
LEGACY_WEIGHT_KEYS = ("pretrained", "weights", "weights_dir", "download", "download_timeout_s")


def _groups(value: Any) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(int(i) for i in g) for g in value)


@dataclass(frozen=True)
class InpFormerConfig:
    """The architecture of an :class:`~components.model.InpFormer` (its one constructor argument).

    Args:
        encoder_name: DINOv2-reg4 encoder (``dinov2reg_vit_{small,base,large}_14`` or timm name).
        image_size: input side (int) or (height, width); a multiple of the patch size 14.
        num_prototypes: M, the number of INPs (spec §4; paper default 6).
        taps: encoder blocks to tap (default per variant, spec §3).
        encoder_groups: groups of tap indices averaged into encoder maps.
        decoder_groups: groups of (reversed) decoder-output indices averaged into decoder maps.
        decoder_depth: number of INP-guided decoder blocks (8).
        extractor_depth: number of INP extractor blocks (1).
        num_heads: attention heads of the trainable blocks (default: the encoder's).
        mlp_ratio: MLP hidden ratio (4).
        qkv_bias: bias of the q/kv projections (True).
        norm_eps: LayerNorm eps of the trainable blocks (1e-8).
        bottleneck_dropout: dropout in the bottleneck MLP (0; Dinomaly used 0.2).
        init_std: std of the truncated-normal Linear init (0.01).
        init_bound: absolute truncation bound of that init (0.03).
        pos_embed_interp: ``official`` or ``timm`` position-table resizing.
        encoder_fused_attn: fused SDPA in the encoder (faster, slightly different rounding).
        attention: encoder + extractor softmax attention: ``explicit`` (official), ``sdpa`` or ``auto``
            (SDPA on CUDA); the decoder's attention is a ReLU kernel (§5), always explicit.
        encoder_dtype: ``fp32`` or ``bf16`` frozen encoder (its features return to fp32).
        encoder_overrides: extra ``timm.create_model`` kwargs (tiny test encoders).
        seg_head: ``None`` (conference INP-Former), ``"onenip"`` or ``"plain"`` (INP-Former++).
        seg_head_channels: hidden width of the head (256).
    """

    encoder_name: str = "dinov2reg_vit_base_14"
    image_size: int | tuple[int, int] = 392
    num_prototypes: int = 6
    taps: tuple[int, ...] | None = None
    encoder_groups: tuple[tuple[int, ...], ...] = ((0, 1, 2, 3), (4, 5, 6, 7))
    decoder_groups: tuple[tuple[int, ...], ...] = ((0, 1, 2, 3), (4, 5, 6, 7))
    decoder_depth: int = 8
    extractor_depth: int = 1
    num_heads: int | None = None
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    norm_eps: float = 1e-8
    bottleneck_dropout: float = 0.0
    init_std: float = 0.01
    init_bound: float = 0.03
    pos_embed_interp: str = "official"
    encoder_fused_attn: bool = False
    attention: str = "explicit"
    encoder_dtype: str = "fp32"
    encoder_overrides: dict[str, Any] = field(default_factory=dict)
    seg_head: str | None = "onenip"
    seg_head_channels: int = 256

    def __post_init__(self) -> None:
        size = self.image_size
        object.__setattr__(self, "image_size", size if isinstance(size, int) else tuple(int(s) for s in size))
        object.__setattr__(self, "taps", None if self.taps is None else tuple(int(t) for t in self.taps))
        object.__setattr__(self, "encoder_groups", _groups(self.encoder_groups))
        object.__setattr__(self, "decoder_groups", _groups(self.decoder_groups))
        object.__setattr__(self, "encoder_overrides", dict(self.encoder_overrides or {}))

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (tuples become lists)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> InpFormerConfig:
        """Inverse of :meth:`to_dict`; accepts older model folders' weight keys and drops them.

        Raises:
            ValueError: naming keys that are not constructor arguments.
        """
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known - set(LEGACY_WEIGHT_KEYS))
        if unknown:
            msg = f"unknown InpFormer config keys {unknown} (known: {sorted(known)})."
            raise ValueError(msg)
        return cls(**{k: v for k, v in data.items() if k in known})
