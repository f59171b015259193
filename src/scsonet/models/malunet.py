"""MALUNet.

`MALUNet: A Multi-Attention and Light-weight UNet for Skin Lesion Segmentation`
(Ruan, Xiang, Xie, Liu, Fu; BIBM 2022), https://arxiv.org/abs/2211.01784
Original code: https://github.com/JCruan519/MALUNet (not used here).

MALUNet is the skeleton SCSONet was built from: the same six encoder and five decoder stages,
GroupNorm/pool/GELU around each block and the spatial-channel attention bridge. Only the blocks
of E4-E6 and D1-D3 differ (MALUNet: inverted external attention + dilated gated attention), so
both models subclass ``SCBridgeUNet`` (``_unet.py``), which holds the skeleton, and give their blocks.
"""
from __future__ import annotations

from functools import partial
from typing import Callable, Sequence

import torch
import torch.nn as nn

from ..layers import LayerType, get_act_layer
from ._builder import build_with_weights
from ._registry import register_model
from ._unet import SCBridgeUNet
from ._weights import MALUNet_Weights

__all__ = ["MALUNet"]


class _DepthwiseSeparableConv(nn.Sequential):
    """Depthwise k x k conv -> GroupNorm -> pointwise 1x1 conv."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int = 3, norm_groups: int = 4):
        super().__init__(
            nn.Conv2d(in_chs, in_chs, kernel_size, padding=kernel_size // 2, groups=in_chs),
            nn.GroupNorm(norm_groups, in_chs),
            nn.Conv2d(in_chs, out_chs, 1),
        )


class _GatedAttentionUnit(nn.Module):
    """GAU: a sigmoid gate (3x3 branch) times a value (5x5 branch), projected, plus a 1x1 shortcut.

    y = act(DW3(sigmoid(DW3(x)) * act(DW5(x)))) + Conv1x1(x)
    """

    def __init__(self, in_chs: int, out_chs: int, act_layer: Callable[..., nn.Module] = nn.GELU):
        super().__init__()
        self.gate = _DepthwiseSeparableConv(in_chs, in_chs, 3)
        self.value = _DepthwiseSeparableConv(in_chs, in_chs, 5)
        self.proj = _DepthwiseSeparableConv(in_chs, out_chs, 3)
        self.shortcut = nn.Conv2d(in_chs, out_chs, 1)
        self.act = act_layer()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gated = torch.sigmoid(self.gate(x)) * self.act(self.value(x))
        return self.act(self.proj(gated)) + self.shortcut(x)


class _DilatedGatedAttention(nn.Module):
    """DGA: channel groups through depthwise 3x3 convs of different dilations, fused, then a GAU.

    y = GAU(act(Conv1x1(GN([DConv_d1(x_1), ..., DConv_d4(x_4)]))))

    Args:
        in_chs: input channels, divisible by the number of dilations.
        out_chs: output channels.
        dilations: one dilation per channel group ((7, 5, 2, 1)).
        act_layer: activation class (GELU).
    """

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        dilations: Sequence[int] = (7, 5, 2, 1),
        act_layer: Callable[..., nn.Module] = nn.GELU,
    ):
        super().__init__()
        if in_chs % len(dilations):
            raise ValueError(f"DGA needs in_chs ({in_chs}) divisible by {len(dilations)} dilation groups")
        g = in_chs // len(dilations)
        self.branches = nn.ModuleList(nn.Conv2d(g, g, 3, padding=d, dilation=d, groups=g) for d in dilations)
        self.norm = nn.GroupNorm(4, in_chs)
        self.fuse = nn.Conv2d(in_chs, in_chs, 1)
        self.act = act_layer()
        self.gau = _GatedAttentionUnit(in_chs, out_chs, act_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        groups = x.chunk(len(self.branches), dim=1)
        x = torch.cat([branch(g) for branch, g in zip(self.branches, groups)], dim=1)
        return self.gau(self.act(self.fuse(self.norm(x))))


class _InvertedExternalAttention(nn.Module):
    """IEA: external attention over two learned memories of ``expansion * C`` units, with residual.

    A = DoubleNorm(M_k Conv1x1(x)); y = act(x + GN(Conv1x1(M_v A))), where DoubleNorm is a
    softmax over positions followed by an L1 normalisation over the memory units.

    Args:
        channels: C.
        expansion: memory units per channel (4: wider than C, hence "inverted").
        act_layer: activation class (GELU).

    Note:
        M_v starts as the transpose of M_k, as in external attention; the published code even
        aliases the two tensors' storage, here they are independent parameters.
    """

    def __init__(self, channels: int, expansion: int = 4, act_layer: Callable[..., nn.Module] = nn.GELU):
        super().__init__()
        self.proj_in = nn.Conv2d(channels, channels, 1)
        self.memory_key = nn.Conv1d(channels, channels * expansion, 1, bias=False)
        self.memory_value = nn.Conv1d(channels * expansion, channels, 1, bias=False)
        with torch.no_grad():
            self.memory_value.weight.copy_(self.memory_key.weight.transpose(0, 1))
        self.proj_out = nn.Conv2d(channels, channels, 1, bias=False)
        self.norm = nn.GroupNorm(4, channels)
        self.act = act_layer()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        attn = self.memory_key(self.proj_in(x).flatten(2)).softmax(dim=-1)  # (B, kC, HW)
        attn = attn / (attn.sum(dim=1, keepdim=True) + 1e-9)
        y = self.memory_value(attn).reshape(b, c, h, w)
        return self.act(x + self.norm(self.proj_out(y)))


class _MALUNetBlock(nn.Sequential):
    """IEA then DGA in the encoder, DGA then IEA in the decoder (IEA on the narrower side)."""

    def __init__(self, in_chs: int, out_chs: int, decoder: bool = False, act_layer=nn.GELU):
        if decoder:
            super().__init__(
                _DilatedGatedAttention(in_chs, out_chs, act_layer=act_layer),
                _InvertedExternalAttention(out_chs, act_layer=act_layer),
            )
        else:
            super().__init__(
                _InvertedExternalAttention(in_chs, act_layer=act_layer),
                _DilatedGatedAttention(in_chs, out_chs, act_layer=act_layer),
            )


class MALUNet(SCBridgeUNet):
    """Light-weight U-Net: three plain conv stages, IEA + DGA blocks, spatial-channel attention bridge.

    Encoder E1-E3 3x3 convs, E4-E6 IEA + DGA; decoder D1-D3 DGA + IEA, D4-D5 3x3 convs;
    GroupNorm(4) / max-pool / GELU around every block, additive skips through the SC attention
    bridge, a 1x1 head upsampled x2. Returns logits; inputs of any size are padded to a multiple
    of 32 inside and cropped back.

    Args:
        num_classes: output channels (1).
        in_chans: input channels (3).
        act_layer: activation class or name (``'gelu'``).
        embed_dims: channels c0..c5 ((8, 16, 24, 32, 48, 64)).
        use_odconv: ODConv in E2 and D5, SCSONet's ConvStem (False; True is the ablation
            "Base + ConvStem").
        kernel_num: ODConv candidate kernels when ``use_odconv`` (1).
        bridge_residual: residual of the bridge's channel attention, see ``SCAttentionBridge``
            (``'attended'``, as published).
        device: device of the parameters (None).
        dtype: dtype of the parameters (None).

    Shape:
        (B, in_chans, H, W) -> (B, num_classes, H, W)

    Note:
        PyTorch's default initialisation (the published code re-initialises convs and linears);
        logits instead of the published sigmoid output.
    """

    def __init__(
        self,
        num_classes: int = 1,
        in_chans: int = 3,
        act_layer: LayerType = "gelu",
        embed_dims: Sequence[int] = (8, 16, 24, 32, 48, 64),
        use_odconv: bool = False,
        kernel_num: int = 1,
        bridge_residual: str = "attended",
        device=None,
        dtype=None,
    ):
        block_layer = partial(_MALUNetBlock, act_layer=get_act_layer(act_layer))
        super().__init__(block_layer, num_classes, in_chans, act_layer, embed_dims, use_odconv, kernel_num,
                         bridge_residual, device, dtype)


def _create_malunet(weights: MALUNet_Weights | str | None = None, reset_head: bool = False, **kwargs) -> MALUNet:
    return build_with_weights(MALUNet, MALUNet_Weights, weights, kwargs, reset_head)


@register_model
def malunet(*, weights: MALUNet_Weights | str | None = None, reset_head: bool = False, **kwargs) -> MALUNet:
    """MALUNet from `MALUNet: A Multi-Attention and Light-weight UNet for Skin Lesion Segmentation
    <https://arxiv.org/abs/2211.01784>`__ (0.178 M parameters); ``weights`` and ``reset_head`` as in
    ``scsonet``."""
    return _create_malunet(weights, reset_head, **kwargs)
