"""Reusable blocks, one paper per file; models import from ``scsonet.layers`` only."""
from .ema import EMA
from .helpers import LayerType, get_act_layer, largest_divisor_at_most
from .odconv import BatchNormAnyBatch, ODConv2d, ODConvAttention
from .pconv import PConv
from .sc_att_bridge import CAB_RESIDUALS, ChannelAttentionBridge, SCAttentionBridge, SpatialAttentionBridge
from .scconv import CRU, GATES, SCConv, SRU
from .scf import MIXERS, SCFBlock
from .unet import DecoderStage, EncoderStage, Upsample2x, pad_to_multiple, run_stages

__all__ = [
    "EMA", "LayerType", "get_act_layer", "largest_divisor_at_most", "BatchNormAnyBatch", "ODConv2d", "ODConvAttention", "PConv",
    "ChannelAttentionBridge", "SCAttentionBridge", "SpatialAttentionBridge", "CRU", "GATES", "SCConv",
    "SRU", "SCFBlock", "CAB_RESIDUALS", "MIXERS", "DecoderStage", "EncoderStage", "Upsample2x", "pad_to_multiple",
    "run_stages",
]
