"""Spatial-channel attention bridge between encoder and decoder.

`MALUNet: A Multi-Attention and Light-weight UNet for Skin Lesion Segmentation`
(Ruan, Xiang, Xie, Liu, Fu; BIBM 2022), https://arxiv.org/abs/2211.01784
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


class SpatialAttentionBridge(nn.Module):
    """SAB: per stage, [mean over C, max over C] -> one shared dilated 7x7 conv -> sigmoid map.

    t_i' = t_i * sigmoid(DConv([AvgPool_C(t_i), MaxPool_C(t_i)])) + t_i

    Args:
        kernel_size: shared conv kernel (7).
        dilation: its dilation (3).

    Shape:
        list of (B, C_i, H_i, W_i) -> same shapes
    """

    def __init__(self, kernel_size: int = 7, dilation: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=dilation * (kernel_size // 2), dilation=dilation)

    def forward(self, feats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        out = []
        for t in feats:
            desc = torch.cat([t.mean(dim=1, keepdim=True), t.amax(dim=1, keepdim=True)], dim=1)
            out.append(t * torch.sigmoid(self.conv(desc)) + t)
        return out


class ChannelAttentionBridge(nn.Module):
    """CAB: pooled channels of all stages, mixed by a Conv1d, mapped back per stage.

    Eq. 3: T = Concat(GAP(t_1..t_L)); T' = Conv1D(T); Att_i = sigmoid(FC_i(T')); Out_i = t_i * Att_i

    Args:
        channels: C_i of each stage.
        kernel_size: Conv1d kernel across the concatenated channels (3).

    Shape:
        list of (B, C_i, H_i, W_i) -> same shapes
    """

    def __init__(self, channels: Sequence[int], kernel_size: int = 3):
        super().__init__()
        self.mix = nn.Conv1d(1, 1, kernel_size, padding=kernel_size // 2, bias=False)
        self.fcs = nn.ModuleList(nn.Linear(sum(channels), c) for c in channels)

    def forward(self, feats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        pooled = torch.cat([F.adaptive_avg_pool2d(t, 1).flatten(1) for t in feats], dim=1)
        mixed = self.mix(pooled.unsqueeze(1)).squeeze(1)  # (B, sum C)
        return [t * torch.sigmoid(fc(mixed))[:, :, None, None] for t, fc in zip(feats, self.fcs)]


class SCAttentionBridge(nn.Module):
    """SAB then CAB, each with a residual: out_i = CAB(SAB(t)_i)_i + SAB(t)_i.

    Args:
        channels: C_i of each bridged stage (for SCSONet: c0..c4).
        spatial_kernel_size: SAB kernel (7).
        spatial_dilation: SAB dilation (3).
        channel_kernel_size: CAB Conv1d kernel (3).

    Shape:
        list of (B, C_i, H_i, W_i) -> same shapes
    """

    def __init__(
        self,
        channels: Sequence[int],
        spatial_kernel_size: int = 7,
        spatial_dilation: int = 3,
        channel_kernel_size: int = 3,
    ):
        super().__init__()
        self.sab = SpatialAttentionBridge(spatial_kernel_size, spatial_dilation)
        self.cab = ChannelAttentionBridge(channels, channel_kernel_size)

    def forward(self, feats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        spatial = self.sab(feats)
        return [c + s for c, s in zip(self.cab(spatial), spatial)]


__all__ = ["SpatialAttentionBridge", "ChannelAttentionBridge", "SCAttentionBridge"]
