"""SCSONet.

`SCSONet: spatial-channel synergistic optimization net for skin lesion segmentation`
(Chen et al.; Frontiers in Physics 2024), https://doi.org/10.3389/fphy.2024.1388364
Original code: https://github.com/Haoyu1Chen/SCSONet (not used here; ``Note:`` sections say where it differs).
"""
from __future__ import annotations

from functools import partial
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..layers import LayerType, ODConv2d, SCAttentionBridge, SCFBlock, get_act_layer
from ._registry import register_model
from ._builder import build_with_weights
from ._weights import SCSONet_Weights

__all__ = ["SCSONet", "pad_to_multiple"]


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Replicate-pad the bottom and right so both sides are multiples of ``multiple``."""
    h, w = x.shape[-2:]
    pad_h, pad_w = (-h) % multiple, (-w) % multiple
    # While tracing for export the sizes are symbolic: always pad, or the graph would keep the
    # example input's "no padding needed" and fail on other sizes.
    if pad_h == 0 and pad_w == 0 and not torch.jit.is_tracing():
        return x
    return F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")


def upsample2x(x: torch.Tensor) -> torch.Tensor:
    """Bilinear x2 with aligned corners: the decoder's and the head's upsampling."""
    return F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=True)


def _run_stages(stages: nn.ModuleList, x: torch.Tensor) -> list[torch.Tensor]:
    """The output of every stage, each stage fed the previous output (the last is the deepest)."""
    feats = []
    for stage in stages:
        x = stage(x)
        feats.append(x)
    return feats


class _EncoderStage(nn.Module):
    """block -> GroupNorm -> max-pool 2 -> act; the last stage has no norm and no pooling."""

    def __init__(self, block: nn.Module, out_chs: int, act_layer, downsample: bool = True, norm_groups: int = 4):
        super().__init__()
        self.block = block
        self.norm = nn.GroupNorm(norm_groups, out_chs) if downsample else nn.Identity()
        self.pool = nn.MaxPool2d(2) if downsample else nn.Identity()
        self.act = act_layer()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.pool(self.norm(self.block(x))))


class _DecoderStage(nn.Module):
    """block -> GroupNorm -> (bilinear x2) -> act, then add the bridged skip (if given)."""

    upsample2x = staticmethod(upsample2x)  # the fast path swaps in an exact, faster twin

    def __init__(self, block: nn.Module, out_chs: int, act_layer, upsample: bool = True, norm_groups: int = 4):
        super().__init__()
        self.block = block
        self.norm = nn.GroupNorm(norm_groups, out_chs)
        self.upsample = upsample
        self.act = act_layer()

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        x = self.norm(self.block(x))
        if self.upsample:
            x = self.upsample2x(x)
        return self.act(x) if skip is None else self.act(x) + skip


def _stem_block(in_chs: int, out_chs: int, use_odconv: bool, kernel_num: int) -> nn.Module:
    if use_odconv:
        return ODConv2d(in_chs, out_chs, 3, kernel_num=kernel_num)
    return nn.Conv2d(in_chs, out_chs, 3, padding=1)


class SCSONet(nn.Module):
    """U-shaped lesion segmenter: ConvStem (conv, ODConv, conv), SCF blocks, attention bridge.

    Six encoder stages (E1-E3 the ConvStem, E4-E6 SCF blocks), the spatial-channel attention
    bridge over t1..t5, five decoder stages (D1-D3 SCF blocks, D4 conv, D5 ODConv) with additive
    skips, and a 1x1 head upsampled to the input size. Returns logits.

    Inputs of any size are accepted: sides that are not multiples of 32 are replicate-padded
    inside the model and the logits cropped back, so the output always matches the input.

    Args:
        num_classes: output channels, one logit map per class (1: lesion vs background).
        in_chans: input channels (3).
        act_layer: activation class or name (``'gelu'``).
        embed_dims: channels c0..c5 of the six stages ((8, 16, 24, 32, 48, 64)).
        kernel_num: ODConv candidate kernels n (1, as published; > 1 enables the kernel attention).
        gate: SCConv SRU gate, ``'soft'`` (SCConv paper) or ``'hard'`` (published code) (``'soft'``).
        use_odconv: ODConv in E2 and D5, else plain 3x3 convs (True; False is the ablation base).
        scf_mixer: spatial conv beside SCConv in the SCF blocks, see ``SCFBlock`` (``'pconv'``).
        scf_ema: EMA at the end of the SCF blocks (True).
        block_layer: builds the blocks of E4-E6 and D1-D3 as ``block_layer(in_chs, out_chs,
            decoder=...)``; None builds SCF blocks from ``gate``, ``scf_mixer`` and ``scf_ema`` (None).
        bridge_residual: residual of the bridge's channel attention, see ``SCAttentionBridge`` (``'sab'``).
        device: device of the parameters (None).
        dtype: dtype of the parameters (None).

    Shape:
        (B, in_chans, H, W) -> (B, num_classes, H, W)

    Note:
        ``use_odconv``, ``scf_mixer``, ``scf_ema``, ``block_layer`` and ``bridge_residual`` span the
        paper's ablations (Tables 2 and 3): with MALUNet's blocks this class is MALUNet, from
        which SCSONet was built by swapping blocks (see ``malunet.py`` and ``ablations.py``).
    """

    pad_multiple = 32
    # Layer names for the model card (timm's first_conv / classifier): loading adapts them.
    first_conv_name = "encoder.0.block"
    classifier_name = "segmentation_head"
    upsample2x = staticmethod(upsample2x)  # of the head's logits; see _DecoderStage

    def __init__(
        self,
        num_classes: int = 1,
        in_chans: int = 3,
        act_layer: LayerType = "gelu",
        embed_dims: Sequence[int] = (8, 16, 24, 32, 48, 64),
        kernel_num: int = 1,
        gate: str = "soft",
        use_odconv: bool = True,
        scf_mixer: str = "pconv",
        scf_ema: bool = True,
        block_layer: Callable[..., nn.Module] | None = None,
        bridge_residual: str = "sab",
        device=None,
        dtype=None,
    ):
        super().__init__()
        if len(embed_dims) != 6:
            raise ValueError(f"embed_dims needs 6 channel counts, got {len(embed_dims)}")
        act = get_act_layer(act_layer)
        c = list(embed_dims)
        if block_layer is None:
            block_layer = partial(SCFBlock, gate=gate, mixer=scf_mixer, use_ema=scf_ema)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.embed_dims = tuple(c)
        self.encoder = nn.ModuleList([
            _EncoderStage(nn.Conv2d(in_chans, c[0], 3, padding=1), c[0], act),
            _EncoderStage(_stem_block(c[0], c[1], use_odconv, kernel_num), c[1], act),
            _EncoderStage(nn.Conv2d(c[1], c[2], 3, padding=1), c[2], act),
            _EncoderStage(block_layer(c[2], c[3], decoder=False), c[3], act),
            _EncoderStage(block_layer(c[3], c[4], decoder=False), c[4], act),
            _EncoderStage(block_layer(c[4], c[5], decoder=False), c[5], act, downsample=False),
        ])
        self.bridge = SCAttentionBridge(c[:5], cab_residual=bridge_residual)
        self.decoder = nn.ModuleList([
            _DecoderStage(block_layer(c[5], c[4], decoder=True), c[4], act, upsample=False),
            _DecoderStage(block_layer(c[4], c[3], decoder=True), c[3], act),
            _DecoderStage(block_layer(c[3], c[2], decoder=True), c[2], act),
            _DecoderStage(nn.Conv2d(c[2], c[1], 3, padding=1), c[1], act),
            _DecoderStage(_stem_block(c[1], c[0], use_odconv, kernel_num), c[0], act),
        ])
        self.segmentation_head = nn.Conv2d(c[0], num_classes, 1)
        if device is not None or dtype is not None:
            self.to(device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        x = pad_to_multiple(x, self.pad_multiple)
        feats = _run_stages(self.encoder, x)
        x = feats[-1]
        skips = self.bridge(feats[:-1])
        for stage, skip in zip(self.decoder, reversed(skips)):
            x = stage(x, skip)
        return self.upsample2x(self.segmentation_head(x))[..., :h, :w]


def _create_scsonet(weights: SCSONet_Weights | str | None = None, reset_head: bool = False, **kwargs) -> SCSONet:
    return build_with_weights(SCSONet, SCSONet_Weights, weights, kwargs, reset_head)


@register_model
def scsonet(*, weights: SCSONet_Weights | str | None = None, reset_head: bool = False, **kwargs) -> SCSONet:
    """SCSONet from `SCSONet: spatial-channel synergistic optimization net for skin lesion
    segmentation <https://doi.org/10.3389/fphy.2024.1388364>`__ (0.16 M parameters).

    ``weights``: a ``SCSONet_Weights`` member, its name or the pretrained name (``'scsonet-isic2017'``);
    ``reset_head=True`` with a ``num_classes`` the weights lack keeps all but a fresh head.
    """
    return _create_scsonet(weights, reset_head, **kwargs)
