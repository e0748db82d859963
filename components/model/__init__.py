"""INP-Former++ model: frozen DINOv2-reg encoder, INP extractor, bottleneck, INP-guided decoder, seg head."""

from components.model.encoder import (
    ENCODER_VARIANTS,
    EncoderWeightsError,
    FrozenDinoEncoder,
    convert_meta_dinov2_state_dict,
    resolve_encoder_name,
)
from components.model.inp_former import InpFormer, InpFormerOutput
from components.model.layers import AggregationBlock, Mlp, PrototypeBlock
from components.model.seg_head import SegmentationHead

__all__ = [
    "ENCODER_VARIANTS",
    "AggregationBlock",
    "EncoderWeightsError",
    "FrozenDinoEncoder",
    "InpFormer",
    "InpFormerOutput",
    "Mlp",
    "PrototypeBlock",
    "SegmentationHead",
    "convert_meta_dinov2_state_dict",
    "resolve_encoder_name",
]
