# Copyright (c) kd_detr contributors.
from .build import TRANSFORMER_REGISTRY, build_transformer
from .deformable_transformer import DeformableTransformer
from .detr_transformer import (
    DETRTransformer,
    TransformerDecoder,
    TransformerDecoderLayer,
    TransformerEncoder,
    TransformerEncoderLayer,
)
from .dino_transformer import DINOTransformer
from .layers import (
    FFN,
    MLP,
    MultiheadAttention,
    build_activation,
    multi_head_attention,
    split_attention_maps,
    stack_attention_maps,
)
