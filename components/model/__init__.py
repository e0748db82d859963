"""INP-Former++ model: frozen DINOv2-reg encoder, INP extractor, bottleneck, INP-guided decoder, seg head."""

from components.model.config import InpFormerConfig
from components.model.encoder import FrozenDinoEncoder
from components.model.inp_former import InpFormer, InpFormerOutput
from components.model.layers import AggregationBlock, Mlp, PrototypeBlock
from components.model.seg_head import SEG_HEAD_LAYOUTS, SegmentationHead
from components.model.weights import (
    ENCODER_VARIANTS,
    EncoderWeightsError,
    convert_meta_dinov2_state_dict,
    load_pretrained,
    resolve_encoder_name,
)

__all__ = [
    "ENCODER_VARIANTS",
    "SEG_HEAD_LAYOUTS",
    "AggregationBlock",
    "EncoderWeightsError",
    "FrozenDinoEncoder",
    "InpFormer",
    "InpFormerConfig",
    "InpFormerOutput",
    "Mlp",
    "PrototypeBlock",
    "SegmentationHead",
    "convert_meta_dinov2_state_dict",
    "load_pretrained",
    "resolve_encoder_name",
]
