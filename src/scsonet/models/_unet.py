"""The U-Net that MALUNet introduced and SCSONet keeps, as a base class for both.

`MALUNet: A Multi-Attention and Light-weight UNet for Skin Lesion Segmentation`
(Ruan, Xiang, Xie, Liu, Fu; BIBM 2022), https://arxiv.org/abs/2211.01784
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn as nn

from ..layers import (DecoderStage, EncoderStage, LayerType, ODConv2d, SCAttentionBridge, Upsample2x, get_act_layer,
                      pad_to_multiple, run_stages)

__all__ = ["SCBridgeUNet", "conv_stem_block"]


def conv_stem_block(in_chs: int, out_chs: int, use_odconv: bool, kernel_num: int = 1) -> nn.Module:
    """The block of E2 and D5: SCSONet's ConvStem ODConv, or MALUNet's plain 3x3 conv."""
    if use_odconv:
        return ODConv2d(in_chs, out_chs, 3, kernel_num=kernel_num)
    return nn.Conv2d(in_chs, out_chs, 3, padding=1)


class SCBridgeUNet(nn.Module):
    """Six encoder stages, the spatial-channel attention bridge over t1..t5, five decoder stages
    with additive skips, and a 1x1 head upsampled x2 to the input size. Returns logits.

    E1-E3 and D4-D5 are the ConvStem (3x3 convs; E2 and D5 ODConv with ``use_odconv``); the
    subclass's ``block_layer`` gives E4-E6 and D1-D3. ``EncoderStage`` wraps each encoder block
    (GroupNorm, max-pool, act; the deepest none of the first two), ``DecoderStage`` each decoder
    block (GroupNorm, bilinear x2, act; the deepest no upsampling). Sides that are not multiples
    of 32 are replicate-padded inside and the logits cropped back, so the output always matches
    the input.

    Args:
        block_layer: builds the blocks of E4-E6 and D1-D3 as ``block_layer(in_chs, out_chs, decoder=...)``.
        num_classes: output channels of the head (1).
        in_chans: input channels (3).
        act_layer: activation class or name of the stages (``'gelu'``).
        embed_dims: channels c0..c5 of the six stages ((8, 16, 24, 32, 48, 64)).
        use_odconv: ODConv in E2 and D5, else plain 3x3 convs (False).
        kernel_num: ODConv candidate kernels n (1).
        bridge_residual: residual of the bridge's channel attention, see ``SCAttentionBridge`` (``'sab'``).
        device: device of the parameters (None).
        dtype: dtype of the parameters (None).

    Shape:
        (B, in_chans, H, W) -> (B, num_classes, H, W)
    """

    pad_multiple = 32
    # Layer names for the model card (timm's first_conv / classifier): loading adapts them.
    first_conv_name = "encoder.0.block"
    classifier_name = "segmentation_head"

    def __init__(
        self,
        block_layer: Callable[..., nn.Module],
        num_classes: int = 1,
        in_chans: int = 3,
        act_layer: LayerType = "gelu",
        embed_dims: Sequence[int] = (8, 16, 24, 32, 48, 64),
        use_odconv: bool = False,
        kernel_num: int = 1,
        bridge_residual: str = "sab",
        device=None,
        dtype=None,
    ):
        super().__init__()
        if len(embed_dims) != 6:
            raise ValueError(f"embed_dims needs 6 channel counts, got {len(embed_dims)}")
        act = get_act_layer(act_layer)
        c = list(embed_dims)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.embed_dims = tuple(c)
        self.encoder = nn.ModuleList([
            EncoderStage(nn.Conv2d(in_chans, c[0], 3, padding=1), c[0], act),
            EncoderStage(conv_stem_block(c[0], c[1], use_odconv, kernel_num), c[1], act),
            EncoderStage(nn.Conv2d(c[1], c[2], 3, padding=1), c[2], act),
            EncoderStage(block_layer(c[2], c[3], decoder=False), c[3], act),
            EncoderStage(block_layer(c[3], c[4], decoder=False), c[4], act),
            EncoderStage(block_layer(c[4], c[5], decoder=False), c[5], act, downsample=False),
        ])
        self.bridge = SCAttentionBridge(c[:5], cab_residual=bridge_residual)
        self.decoder = nn.ModuleList([
            DecoderStage(block_layer(c[5], c[4], decoder=True), c[4], act, upsample=False),
            DecoderStage(block_layer(c[4], c[3], decoder=True), c[3], act),
            DecoderStage(block_layer(c[3], c[2], decoder=True), c[2], act),
            DecoderStage(nn.Conv2d(c[2], c[1], 3, padding=1), c[1], act),
            DecoderStage(conv_stem_block(c[1], c[0], use_odconv, kernel_num), c[0], act),
        ])
        self.segmentation_head = nn.Conv2d(c[0], num_classes, 1)
        self.head_upsample = Upsample2x()
        if device is not None or dtype is not None:
            self.to(device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        x = pad_to_multiple(x, self.pad_multiple)
        feats = run_stages(self.encoder, x)
        x = feats[-1]
        skips = self.bridge(feats[:-1])
        for stage, skip in zip(self.decoder, reversed(skips)):
            x = stage(x, skip)
        return self.head_upsample(self.segmentation_head(x))[..., :h, :w]
